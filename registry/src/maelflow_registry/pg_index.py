"""The index on PostgreSQL: the same tables and queries as the SQLite one, shared by several processes.

Why: in production the catalogue is served by several worker processes (and possibly hosts) behind
one address, and they must see one index. SQLite stays the embedded default (one host, a file);
this is chosen by giving the catalogue a ``postgresql://`` URL instead of a file
(:func:`maelflow_registry.server.open_index`). S3 stays the store of record: the index is still a
cache that a rebuild reads back from S3 alone.

What differs from SQLite, and how it is met:

- one writer at a time across every process: a write transaction first takes a transaction-level
  advisory lock (``pg_advisory_xact_lock``), the counterpart of SQLite's ``BEGIN IMMEDIATE``; with
  it held, READ COMMITTED reads see every committed write, so the version check stays exact;
- placeholders are ``%s`` (the shared SQL is written with ``?`` and translated once per statement);
- text sorts byte-wise like SQLite's (``COLLATE "C"`` on every text column), whatever the
  database's locale, so pages and lists come back in the same order on both backends;
- PostgreSQL refuses a NUL character in text, which JSON (and so a request) may carry: it is
  stored as U+FFFD, in values and in queries alike, so a lookup of such a value still matches;
- summary columns are typed strictly (``BIGINT``: a dataset's size passes 2**31); a cell that is
  not an integer in an integer column is stored as NULL, as the web table shows it;
- the schema is created under the same lock, so workers starting together do not race.

The connection string is libpq's (``postgresql://user@host:port/db?passfile=...&sslmode=...``):
keep the password in a passfile (mode 0600), never in the URL, so it is in no config or argv.
Each thread has its own connection, as with SQLite.
"""

from __future__ import annotations

import contextlib
import re
import threading
from functools import lru_cache
from typing import Any, Iterator

from maelflow_registry import index as sqlite_index
from maelflow_registry.index import SCHEMA_VERSION, Index, Transaction

LOCK_ID = 0x6D61656C  # "mael": the advisory lock every writer takes
INT64 = (-(2**63), 2**63 - 1)

SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    collection TEXT COLLATE "C" NOT NULL, key TEXT COLLATE "C" NOT NULL, version BIGINT NOT NULL,
    created TEXT COLLATE "C" NOT NULL, updated TEXT COLLATE "C" NOT NULL, created_by TEXT COLLATE "C",
    updated_by TEXT COLLATE "C", record TEXT NOT NULL, original TEXT, search TEXT COLLATE "C" NOT NULL DEFAULT '',
    PRIMARY KEY (collection, key));
CREATE TABLE IF NOT EXISTS fields (
    collection TEXT COLLATE "C" NOT NULL, field TEXT COLLATE "C" NOT NULL, value TEXT COLLATE "C" NOT NULL,
    key TEXT COLLATE "C" NOT NULL, PRIMARY KEY (collection, field, value, key));
CREATE INDEX IF NOT EXISTS fields_entry ON fields (collection, key);
CREATE TABLE IF NOT EXISTS edges (owner TEXT COLLATE "C" NOT NULL, src TEXT COLLATE "C" NOT NULL,
    rel TEXT COLLATE "C" NOT NULL, dst TEXT COLLATE "C" NOT NULL);
CREATE INDEX IF NOT EXISTS edges_owner ON edges (owner);
CREATE INDEX IF NOT EXISTS edges_src ON edges (src);
CREATE INDEX IF NOT EXISTS edges_dst ON edges (dst);
CREATE TABLE IF NOT EXISTS identities (ref TEXT COLLATE "C" NOT NULL, collection TEXT COLLATE "C" NOT NULL,
    key TEXT COLLATE "C" NOT NULL, PRIMARY KEY (ref, collection, key));
CREATE INDEX IF NOT EXISTS identities_entry ON identities (collection, key);
CREATE TABLE IF NOT EXISTS meta (k TEXT COLLATE "C" PRIMARY KEY, v TEXT);
"""

TYPES = {"INTEGER": "BIGINT", "REAL": "DOUBLE PRECISION", "TEXT": 'TEXT COLLATE "C"'}


def table_schema(coll) -> str:
    columns = "".join(f", {name} {TYPES.get(kind.upper(), kind)}" for name, kind in coll.table.items())
    return (f'CREATE TABLE IF NOT EXISTS {coll.name} ({coll.main_key} TEXT COLLATE "C" PRIMARY KEY{columns}, '
            "search TEXT COLLATE \"C\" NOT NULL DEFAULT '');")


@lru_cache(maxsize=512)
def _pg_sql(sql: str) -> str:
    return sql.replace("?", "%s")


def _clean(value: Any) -> Any:
    if isinstance(value, str) and "\x00" in value:
        return value.replace("\x00", "\ufffd")
    return value


def _params(params: Any) -> Any:
    if params is None:
        return None
    return [_clean(v) for v in params]


class PgConnection:
    """The part of sqlite3.Connection's interface the index uses, over a psycopg connection."""

    def __init__(self, raw: Any):
        self.raw = raw

    def execute(self, sql: str, params: Any = None) -> Any:
        return self.raw.execute(_pg_sql(sql), _params(params))

    def executemany(self, sql: str, rows: Any) -> None:
        rows = [_params(r) for r in rows]
        if rows:
            with self.raw.cursor() as cur:
                cur.executemany(_pg_sql(sql), rows)

    def close(self) -> None:
        self.raw.close()


class PgTransaction(Transaction):
    @staticmethod
    def column_value(kind: str, value: Any) -> Any:
        kind = kind.upper()
        if value is None:
            return None
        if kind == "INTEGER":
            ok = isinstance(value, int) and not isinstance(value, bool) and INT64[0] <= value <= INT64[1]
            return value if ok else None
        if kind == "REAL":
            return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
        return _clean(value if isinstance(value, str) else str(value))


class PgIndex(Index):
    def __init__(self, url: str, *, connect_timeout: float = 10):
        self.url = url
        self.connect_timeout = connect_timeout
        self._local = threading.local()
        conn = self._connect()
        try:
            with self._locked(conn):
                for statement in _statements(SCHEMA + "\n".join(table_schema(c) for c in sqlite_index._tables())):
                    conn.execute(statement)
                conn.execute("INSERT INTO meta (k, v) VALUES ('schema', ?) ON CONFLICT DO NOTHING", (SCHEMA_VERSION,))
        finally:
            conn.close()

    @property
    def location(self) -> str:
        return redact(self.url)

    def _connect(self) -> PgConnection:  # type: ignore[override]
        import psycopg

        raw = psycopg.connect(self.url, autocommit=True, connect_timeout=max(1, int(self.connect_timeout)),
                              application_name="maelflow-catalogue")
        return PgConnection(raw)

    @property
    def conn(self) -> PgConnection:  # type: ignore[override]
        conn = getattr(self._local, "conn", None)
        if conn is None or conn.raw.closed:
            conn = self._local.conn = self._connect()
        return conn

    @contextlib.contextmanager
    def _locked(self, conn: PgConnection) -> Iterator[PgConnection]:
        conn.execute("BEGIN")
        try:
            conn.execute("SELECT pg_advisory_xact_lock(?)", (LOCK_ID,))
            yield conn
        except BaseException:
            if not conn.raw.closed:
                conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    @contextlib.contextmanager
    def write(self) -> Iterator[Transaction]:
        """One writer at a time across every process sharing the database: the advisory lock."""
        with self._locked(self.conn) as conn:
            yield PgTransaction(conn)  # type: ignore[arg-type]

    def drop(self) -> None:
        """Drop every table of the index (the next open creates them empty, and a rebuild follows)."""
        conn = self._connect()
        try:
            with self._locked(conn):
                names = ["entries", "fields", "edges", "identities", "meta", *(c.name for c in sqlite_index._tables())]
                conn.execute(f"DROP TABLE IF EXISTS {', '.join(names)}")
        finally:
            conn.close()


def _statements(script: str) -> list[str]:
    return [s.strip() for s in script.split(";") if s.strip()]


def redact(url: str) -> str:
    """A connection string fit for a log: any password in it replaced."""
    url = re.sub(r"(://[^:/@]+:)[^@]*@", r"\1***@", url)
    return re.sub(r"(password=)[^&\s]*", r"\1***", url)


def is_url(location: Any) -> bool:
    return isinstance(location, str) and location.startswith(("postgresql://", "postgres://"))

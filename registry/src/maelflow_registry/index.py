"""The SQLite index: answers every query fast, and can be rebuilt from the S3 documents alone.

Why SQLite: lookups must stay under a few milliseconds with 100 000 entries on 2 cores (an S3 GET
per lookup costs more), the catalogue is one process on one host, and WAL mode lets readers go on
while a writer holds the lock. The index is a cache of S3: nothing is only here (tokens and settings
are files of the workspace), so deleting it loses nothing.

No lost update: a write runs inside ``BEGIN IMMEDIATE`` (one writer at a time, across threads and
processes), re-reads the entry's version, writes the S3 document, then updates the row only if the
version is still the one it read. The S3 conditional writes that would do this in AWS are ignored
by rclone (reference/s3-servers.md), so the check lives here.

Each connection belongs to one thread (``threading.local``); SQLite connections are not meant to be
shared between threads that may use them at once.

What the index stores of an entry beyond its record comes from its collection's definition
(:mod:`maelflow_registry.collections`): the lineage edges it declares, the references that name it,
and, for a collection with a ``table``, a summary row that its web page sorts by.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import sqlite3
import threading
from pathlib import Path
from typing import Any, Iterable, Iterator

from maelflow_registry import collections, records
from maelflow_registry.collections import Collection
from maelflow_registry.errors import Conflict, PreconditionFailed
from maelflow_registry.refs import ref, run_ref
from maelflow_registry.store import dumps

LOG = logging.getLogger("maelflow_registry")
SCHEMA_VERSION = "1"

SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    collection TEXT NOT NULL, key TEXT NOT NULL, version INTEGER NOT NULL,
    created TEXT NOT NULL, updated TEXT NOT NULL, created_by TEXT, updated_by TEXT,
    record TEXT NOT NULL, original TEXT, search TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (collection, key)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS fields (
    collection TEXT NOT NULL, field TEXT NOT NULL, value TEXT NOT NULL, key TEXT NOT NULL,
    PRIMARY KEY (collection, field, value, key)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS fields_entry ON fields (collection, key);
CREATE TABLE IF NOT EXISTS edges (owner TEXT NOT NULL, src TEXT NOT NULL, rel TEXT NOT NULL, dst TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS edges_owner ON edges (owner);
CREATE INDEX IF NOT EXISTS edges_src ON edges (src);
CREATE INDEX IF NOT EXISTS edges_dst ON edges (dst);
CREATE TABLE IF NOT EXISTS identities (ref TEXT NOT NULL, collection TEXT NOT NULL, key TEXT NOT NULL,
    PRIMARY KEY (ref, collection, key)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS identities_entry ON identities (collection, key);
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT);
"""

ENTRY_SORTS = ("key", "created", "updated")


def table_schema(coll: Collection) -> str:
    """The summary table of a collection that declares one: its key, its columns, and the search words."""
    columns = "".join(f", {name} {kind}" for name, kind in coll.table.items())
    return (f"CREATE TABLE IF NOT EXISTS {coll.name} ({coll.main_key} TEXT PRIMARY KEY{columns}, "
            "search TEXT NOT NULL DEFAULT '');")


def table_sorts(coll: Collection) -> tuple[str, ...]:
    """What its web table may be sorted by."""
    return (coll.main_key, *coll.table, "usage")


def _tables() -> list[Collection]:
    return [c for c in collections.all_collections() if c.table]


class Index:
    def __init__(self, path: Path | str):
        self.path = Path(path)
        self._local = threading.local()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as conn:
            conn.executescript(SCHEMA + "\n".join(table_schema(c) for c in _tables()))
            conn.execute("INSERT INTO meta (k, v) VALUES ('schema', ?) ON CONFLICT DO NOTHING", (SCHEMA_VERSION,))

    @property
    def location(self) -> str:
        """Where the index lives, for messages."""
        return str(self.path)

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA busy_timeout=30000")
        conn.execute("PRAGMA cache_size=-65536")
        return conn

    @property
    def conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = self._connect()
        return conn

    def get_meta(self, k: str) -> str | None:
        row = self.conn.execute("SELECT v FROM meta WHERE k = ?", (k,)).fetchone()
        return row[0] if row else None

    # -- reads -----------------------------------------------------------------------------------
    def get(self, collection: str, key: str) -> dict | None:
        """The row of one entry: version, stamps, and the record/original as JSON text."""
        row = self.conn.execute(
            "SELECT version, created, updated, created_by, updated_by, record, original FROM entries "
            "WHERE collection = ? AND key = ?", (collection, key)).fetchone()
        if row is None:
            return None
        return dict(zip(("version", "created", "updated", "created_by", "updated_by", "record", "original"), row))

    def list(self, collection: str, filters: dict[str, str], limit: int, offset: int = 0) -> list[str]:
        """Record JSON texts matching every exact filter, in key order."""
        sql = ["SELECT record FROM entries WHERE collection = ?"]
        args: list[Any] = [collection]
        for field, value in filters.items():
            values = records.query_values(value)
            sql.append(f"AND key IN (SELECT key FROM fields WHERE collection = ? AND field = ? "
                       f"AND value IN ({','.join('?' * len(values))}))")
            args += [collection, field, *values]
        sql.append("ORDER BY key LIMIT ? OFFSET ?")
        args += [limit, offset]
        return [r[0] for r in self.conn.execute(" ".join(sql), args)]

    def keys(self) -> list[tuple[str, str]]:
        """(collection, key) of every entry (for comparing the index with S3's listing)."""
        return [tuple(r) for r in self.conn.execute("SELECT collection, key FROM entries")]

    def counts(self) -> dict[str, int]:
        return dict(self.conn.execute("SELECT collection, COUNT(*) FROM entries GROUP BY collection"))

    def page(self, collection: str, q: str, sort: str, descending: bool, limit: int, offset: int
             ) -> tuple[list[dict], int]:
        """Entries for a web table: (rows with parsed records, total matching)."""
        column = sort if sort in ENTRY_SORTS else "key"
        where, args = "collection = ?", [collection]
        if q:
            where += " AND search LIKE ? ESCAPE '\\'"
            args.append(f"%{_like(q.lower())}%")
        total = self.conn.execute(f"SELECT COUNT(*) FROM entries WHERE {where}", args).fetchone()[0]
        rows = self.conn.execute(
            f"SELECT key, created, updated, record FROM entries WHERE {where} "
            f"ORDER BY {column} {'DESC' if descending else 'ASC'}, key LIMIT ? OFFSET ?", args + [limit, offset])
        return [{"key": k, "created": c, "updated": u, "record": json.loads(r)} for k, c, u, r in rows], total

    def table_page(self, coll: Collection, q: str, sort: str, descending: bool, limit: int, offset: int
                   ) -> tuple[list[dict], int]:
        """Summary rows of a collection with a ``table`` (and ``usage``: edges leaving each entry), sorted."""
        key = coll.main_key
        column = sort if sort in table_sorts(coll) else key
        where, args = "1 = 1", []
        if q:
            where = "d.search LIKE ? ESCAPE '\\'"
            args.append(f"%{_like(q.lower())}%")
        total = self.conn.execute(f"SELECT COUNT(*) FROM {coll.name} d WHERE {where}", args).fetchone()[0]
        usage = f"(SELECT COUNT(*) FROM edges e WHERE e.src = '{coll.name}:' || d.{key})"
        order = f"{usage}" if column == "usage" else f"d.{column}"
        nulls = "" if column in (key, "usage") else f"d.{column} IS NULL, "
        names = (key, *coll.table, "usage")
        rows = self.conn.execute(
            f"SELECT {', '.join(f'd.{c}' for c in names[:-1])}, {usage} FROM {coll.name} d WHERE {where} "
            f"ORDER BY {nulls}{order} {'DESC' if descending else 'ASC'}, d.{key} LIMIT ? OFFSET ?",
            args + [limit, offset])
        return [dict(zip(names, row)) for row in rows], total

    # -- lineage ---------------------------------------------------------------------------------
    def edges_touching(self, refs: Iterable[str]) -> list[tuple[str, str, str]]:
        refs = list(refs)
        if not refs:
            return []
        marks = ",".join("?" * len(refs))
        rows = self.conn.execute(
            f"SELECT DISTINCT src, rel, dst FROM edges WHERE src IN ({marks}) OR dst IN ({marks}) "
            f"ORDER BY src, rel, dst LIMIT 2000", refs + refs)
        return [tuple(r) for r in rows]

    def targets(self, refs: Iterable[str], relation: str, collection: str) -> list[str]:
        """Keys of ``collection`` entries at the end of ``relation`` edges leaving any of ``refs``."""
        refs = list(refs)
        rows = self.conn.execute(
            f"SELECT DISTINCT dst FROM edges WHERE rel = ? AND src IN ({','.join('?' * len(refs))}) "
            f"AND dst LIKE ? ESCAPE '\\' ORDER BY dst LIMIT 1000", [relation, *refs, _like(collection) + ":%"])
        return [r[0].split(":", 1)[1] for r in rows]

    def resolve(self, reference: str) -> list[tuple[str, str, dict]]:
        rows = self.conn.execute(
            "SELECT e.collection, e.key, e.record FROM identities i JOIN entries e "
            "ON e.collection = i.collection AND e.key = i.key WHERE i.ref = ? ORDER BY e.key LIMIT 20",
            (reference,))
        return [(c, k, json.loads(r)) for c, k, r in rows]

    def find_any(self, key: str) -> list[tuple[str, str]]:
        """Entries whose key, or run_id, is ``key``, whatever their collection (for ``maelflow lineage ID``)."""
        rows = self.conn.execute("SELECT collection, key FROM entries WHERE key = ? ORDER BY collection",
                                 (key,)).fetchall()
        rows += self.conn.execute("SELECT collection, key FROM identities WHERE ref = ?",
                                  (run_ref(key),)).fetchall()
        return list(dict.fromkeys((c, k) for c, k in rows))

    # -- writes ----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def write(self) -> Iterator["Transaction"]:
        """One writer at a time: ``BEGIN IMMEDIATE`` takes SQLite's write lock before anything is read."""
        conn = self.conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield Transaction(conn)
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def drop(self) -> None:
        """Forget everything (the next open finds no completed build and rebuilds from S3)."""
        for suffix in ("", "-wal", "-shm"):
            self.path.with_name(self.path.name + suffix).unlink(missing_ok=True)

    def is_complete(self) -> bool:
        """Whether a rebuild from S3 ever finished here (a crash mid-rebuild leaves no mark)."""
        return self.get_meta("built") is not None

    def rebuild(self, documents: Iterable[dict], if_incomplete: bool = False) -> int | None:
        """Replace the whole index by the given documents, in one transaction (readers see old or new).

        Documents of a collection that is not registered here (any more) are left in S3 and skipped.
        With ``if_incomplete``, nothing is done (and None returned, ``documents`` never read) when a
        build has completed by the time the write lock is held: several server processes sharing one
        index (PostgreSQL) each find it new at their start, and only the first needs to read S3.
        """
        count = 0
        known = set(collections.names())
        with self.write() as tx:
            if if_incomplete and tx.conn.execute("SELECT v FROM meta WHERE k = 'built'").fetchone():
                return None
            for table in ("entries", "fields", "edges", "identities", *(c.name for c in _tables())):
                tx.conn.execute(f"DELETE FROM {table}")
            skipped: dict[str, int] = {}
            for doc in documents:
                if doc.get("collection") not in known:
                    skipped[str(doc.get("collection"))] = skipped.get(str(doc.get("collection")), 0) + 1
                    continue
                # one savepoint per document: one that the index cannot take is skipped, not half kept
                tx.conn.execute("SAVEPOINT doc")
                try:
                    tx.insert(doc)
                except Exception as exc:  # noqa: BLE001 - a bad document must not stop the rebuild
                    tx.conn.execute("ROLLBACK TO doc")
                    LOG.warning("rebuild: %s/%s skipped, not indexed: %s: %s", str(doc.get("collection"))[:60],
                                str(doc.get("key"))[:200], type(exc).__name__, str(exc)[:200])
                else:
                    count += 1
                tx.conn.execute("RELEASE doc")
            for name, n in skipped.items():
                LOG.warning("rebuild: %d documents of collection '%s', which is not registered, were skipped",
                            n, name[:60])
            tx.conn.execute("INSERT INTO meta (k, v) VALUES ('built', ?) ON CONFLICT (k) DO UPDATE SET v = excluded.v",
                            (datetime.datetime.now(datetime.timezone.utc).isoformat(),))
        return count


class Transaction:
    def __init__(self, conn: sqlite3.Connection):
        self.conn = conn

    def version(self, collection: str, key: str) -> int | None:
        row = self.conn.execute("SELECT version FROM entries WHERE collection = ? AND key = ?",
                                (collection, key)).fetchone()
        return row[0] if row else None

    def current(self, collection: str, key: str) -> dict | None:
        row = self.conn.execute(
            "SELECT version, created, created_by, record, original FROM entries WHERE collection = ? AND key = ?",
            (collection, key)).fetchone()
        if row is None:
            return None
        return {"version": row[0], "created": row[1], "created_by": row[2], "record": json.loads(row[3]),
                "original": json.loads(row[4]) if row[4] else None}

    def put(self, doc: dict, expect_version: int | None) -> None:
        """Store ``doc`` if the entry's version is still ``expect_version`` (None: must not exist)."""
        collection, key = doc["collection"], doc["key"]
        found = self.version(collection, key)
        if found != expect_version:
            if expect_version is None:
                raise Conflict(f"{collection} entry '{key}' already exists")
            raise PreconditionFailed(f"{collection} entry '{key}' changed while this write was prepared "
                                     f"(version {found}, expected {expect_version}); read it again and retry")
        self.remove(collection, key)
        self.insert(doc)

    def insert(self, doc: dict) -> None:
        collection, key, record = doc["collection"], doc["key"], doc["record"]
        coll = collections.get(collection)
        search = records.search_text(key, record)
        self.conn.execute(
            "INSERT INTO entries (collection, key, version, created, updated, created_by, updated_by, record, "
            "original, search) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (collection, key, doc["version"], doc["created"], doc["updated"], doc.get("created_by"),
             doc.get("updated_by"), dumps(record), dumps(doc["original"]) if doc.get("original") else None,
             search))
        self.conn.executemany("INSERT INTO fields (collection, field, value, key) VALUES (?, ?, ?, ?) "
                              "ON CONFLICT DO NOTHING", [(collection, f, v, key) for f, v in records.filter_fields(record)])
        owner = ref(collection, key)
        self.conn.executemany("INSERT INTO edges (owner, src, rel, dst) VALUES (?, ?, ?, ?)",
                              [(owner, s, r, d) for s, r, d in coll.edges(key, record)])
        self.conn.executemany("INSERT INTO identities (ref, collection, key) VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
                              [(r, collection, key) for r in coll.refs(key, record)])
        if coll.table:
            summary = coll.table_row(record, doc["created"])
            row = {coll.main_key: key, **{c: self.column_value(kind, summary.get(c)) for c, kind in coll.table.items()},
                   "search": search}
            self.conn.execute(f"INSERT INTO {collection} ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
                              list(row.values()))

    @staticmethod
    def column_value(kind: str, value: Any) -> Any:
        """A summary cell as its column takes it (SQLite takes any value; PostgreSQL overrides this)."""
        return value

    def remove(self, collection: str, key: str) -> None:
        self.conn.execute("DELETE FROM entries WHERE collection = ? AND key = ?", (collection, key))
        self.conn.execute("DELETE FROM fields WHERE collection = ? AND key = ?", (collection, key))
        self.conn.execute("DELETE FROM edges WHERE owner = ?", (ref(collection, key),))
        self.conn.execute("DELETE FROM identities WHERE collection = ? AND key = ?", (collection, key))
        coll = collections.get(collection)
        if coll.table:
            self.conn.execute(f"DELETE FROM {collection} WHERE {coll.main_key} = ?", (key,))


def _like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")

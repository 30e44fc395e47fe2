"""A PostgreSQL server of the workspace (``maelflow services up --with postgres``), for the catalogue.

Optional: SQLite is the catalogue's embedded index. With this service up before the catalogue, the
catalogue keeps its index here instead (``maelflow.services.catalogue``), as it does in production
on a shared server; the tests run the catalogue's API, web and client tests against both.

It is Debian's ``postgresql`` (``initdb`` and ``postgres`` from /usr/lib/postgresql/<version>/bin),
listening on 127.0.0.1 only (no Unix socket), with a superuser ``maelflow`` whose password is
generated once and kept in a libpq passfile (``<workspace>/postgres/pgpass``, 0600): connection
strings name that file, never the password. PostgreSQL refuses to run as root; started by root, it
runs as the ``postgres`` user, and since that user cannot enter a private (0700) workspace, its data
folder then lives under the postgres user's home (``/var/lib/postgresql/maelflow/<workspace id>``),
marked with the workspace it belongs to; the workspace's ``postgres/state.json`` names it.
:meth:`PostgresService.forget` deletes it (a test's workspace is thrown away, its data with it).
"""

from __future__ import annotations

import glob
import hashlib
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Sequence

from maelflow.services.base import (LOOPBACK, ManagedService, ServiceError, pid_alive, wait_until)
from maelflow.workspace import write_secret

SERVER_USER = "postgres"
SUPERUSER = "maelflow"
SHARED_HOME = Path("/var/lib/postgresql/maelflow")
MARKER = "maelflow-workspace"
INSTALL_HINT = "apt-get install postgresql (bash scripts/install.sh installs it)"


def bindir() -> Path | None:
    """The newest Debian PostgreSQL's bin folder (initdb and postgres are not on PATH there)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"),
                   key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0)
    if found:
        return Path(found[-1]).parent
    on_path = shutil.which("postgres")
    return Path(on_path).parent if on_path else None


class PostgresService(ManagedService):
    name = "postgres"
    optional = True
    start_timeout = 60.0  # the first start runs initdb

    # -- where things are ----------------------------------------------------------------------
    def as_other_user(self) -> bool:
        return os.geteuid() == 0

    @property
    def data_dir(self) -> Path:
        recorded = self.state().get("data_dir")
        if recorded:
            return Path(recorded)
        if self.as_other_user():
            ident = hashlib.sha256(str(self.ws.root).encode()).hexdigest()[:16]
            return SHARED_HOME / ident
        return self.dir / "data"

    @property
    def passfile(self) -> Path:
        return self.dir / "pgpass"

    def _password(self) -> str:
        try:
            return self.passfile.read_text().split("\n")[0].rsplit(":", 1)[1]
        except (FileNotFoundError, IndexError):
            return ""

    def url(self) -> str | None:
        port = self.state().get("port")
        return f"postgresql://{LOOPBACK}:{port}" if port else None

    def dsn(self, database: str = "postgres") -> str:
        """A libpq connection string for ``database``; the password stays in the passfile."""
        port = self.state().get("port")
        if not port:
            raise ServiceError("the postgres service has never been started in this workspace: "
                               "run 'maelflow services up --with postgres'")
        return f"postgresql://{SUPERUSER}@{LOOPBACK}:{port}/{database}?passfile={self.passfile}&connect_timeout=5"

    # -- start ---------------------------------------------------------------------------------
    def check_available(self) -> None:
        found = bindir()
        if not found or not (found / "initdb").exists():
            raise ServiceError(f"PostgreSQL's initdb and postgres were not found: {INSTALL_HINT}")
        if self.as_other_user():
            try:
                pwd.getpwnam(SERVER_USER)
            except KeyError:
                raise ServiceError(f"user '{SERVER_USER}' is missing: {INSTALL_HINT}") from None
            if not shutil.which("setpriv"):
                raise ServiceError("setpriv is missing: apt-get install util-linux")
        import importlib.util

        if importlib.util.find_spec("psycopg") is None:
            raise ServiceError("the psycopg package is missing: pip install 'psycopg[binary]' "
                               "(into maelflow's environment)")

    def _as_server(self, argv: list[str]) -> list[str]:
        if not self.as_other_user():
            return argv
        return [shutil.which("setpriv") or "setpriv", "--reuid", SERVER_USER, "--regid", SERVER_USER,
                "--init-groups", "--", *argv]

    def _initdb(self) -> None:
        data = self.data_dir
        if (data / "PG_VERSION").exists():
            return
        password = secrets.token_urlsafe(24)
        owner = pwd.getpwnam(SERVER_USER) if self.as_other_user() else None
        data.parent.mkdir(parents=True, exist_ok=True)
        if owner:
            for folder in (SHARED_HOME, data.parent):
                if folder.is_relative_to(SHARED_HOME):
                    os.chown(folder, owner.pw_uid, owner.pw_gid)
                    os.chmod(folder, 0o700)
        # the password reaches initdb through a file only the server's user can read, removed at once
        fd, pwfile = tempfile.mkstemp(prefix=".pw.", dir=data.parent)
        try:
            os.write(fd, (password + "\n").encode())
            os.close(fd)
            if owner:
                os.chown(pwfile, owner.pw_uid, owner.pw_gid)
            proc = subprocess.run(self._as_server([
                str(bindir() / "initdb"), "-D", str(data), "-U", SUPERUSER, f"--pwfile={pwfile}",
                "-E", "UTF8", "--locale=C", "--auth=scram-sha-256"]),
                capture_output=True, text=True, timeout=120, cwd="/")
        finally:
            Path(pwfile).unlink(missing_ok=True)
        if proc.returncode != 0:
            shutil.rmtree(data, ignore_errors=True)
            raise ServiceError(f"initdb failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
        (data / MARKER).write_text(str(self.ws.root) + "\n")
        if owner:
            os.chown(data / MARKER, owner.pw_uid, owner.pw_gid)
        write_secret(self.passfile, f"{LOOPBACK}:*:*:{SUPERUSER}:{password}\n")
        self.save_state(data_dir=str(data))

    def command(self, port: int) -> tuple[Sequence[str], dict[str, str]]:
        self._initdb()
        argv = [str(bindir() / "postgres"), "-D", str(self.data_dir), "-p", str(port),
                "-c", f"listen_addresses={LOOPBACK}", "-c", "unix_socket_directories=",
                "-c", "max_connections=300", "-c", "shared_buffers=64MB", "-c", "fsync=on",
                "-c", "logging_collector=off", "-c", "log_min_messages=warning"]
        # the server's user cannot open the workspace folder: run it from the root folder
        return self._as_server(argv), {"LANG": "C", "LC_ALL": "C", "TZ": "UTC", "PGTZ": "UTC"}

    def up(self):
        if not self.running():
            self.dir.mkdir(parents=True, exist_ok=True)
        return super().up()

    def healthy(self) -> bool:
        import psycopg

        with psycopg.connect(self.dsn("postgres"), connect_timeout=2) as conn:
            conn.execute("SELECT 1").fetchone()
        return True

    def ensure_database(self, name: str) -> str:
        """Create database ``name`` if missing; its connection string."""
        import psycopg
        from psycopg import sql

        with psycopg.connect(self.dsn("postgres"), autocommit=True) as conn:
            if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is None:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.dsn(name)

    def extra(self) -> dict[str, Any]:
        return {"host": LOOPBACK, "port": self.state().get("port"), "user": SUPERUSER,
                "passfile": str(self.passfile), "data_dir": str(self.data_dir),
                "catalogue_dsn": self.dsn("catalogue")}

    # -- stop ----------------------------------------------------------------------------------
    def _terminate(self, pid: int, grace: float = 20.0) -> None:
        """SIGINT is PostgreSQL's "fast" shutdown (SIGTERM waits for every client to leave); then
        the base class, and what is left of the process group (its backends) as a last resort."""
        try:
            os.kill(pid, signal.SIGINT)
        except ProcessLookupError:
            return
        if not wait_until(lambda: not pid_alive(pid), grace, interval=0.05):
            super()._terminate(pid, grace=5.0)
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass

    def forget(self) -> None:
        """Delete the data folder (stopped first), when it is this workspace's (its marker says so)."""
        self.down()
        data = self.data_dir
        marker = data / MARKER
        if marker.is_file() and marker.read_text().strip() == str(self.ws.root):
            shutil.rmtree(data, ignore_errors=True)

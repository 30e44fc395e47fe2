"""The workspace's private ecflow_server.

ecflow_server 5.9.2 has no bind option, so the loopback bind helper is preloaded; it starts HALTED
(no job is submitted until a restart command), and it recovers suites only from a checkpoint file
named after its host and port. This module deals with those three facts so callers only see "up"
and "down".

It also keeps other local users out. Without a white list and a password file any user of the
machine could ``--alter`` a suite's ECF_JOB_CMD and requeue a task, which then runs as the server's
user. The server therefore starts with a white list (ECF_LISTS) naming only the workspace owner,
read-write, and a password file (ECF_PASSWD, and the same as ECF_CUSTOM_PASSWD so that posing as the
owner with ``--user`` needs the password too) with a random password, both 0600 in the workspace.
Every maelflow client reads that file (``make_client``). Jobs are not affected: their child
commands are authenticated by the task's job password (ECF_PASS), not by user name.
"""

from __future__ import annotations

import os
import pwd
import random
import secrets
import shutil
import socket
import threading
from pathlib import Path
from typing import Any, Sequence

from maelflow.services.base import (LOOPBACK, ManagedService, ServiceError, pid_alive,
                                    port_accepts, port_is_free, wait_until)
from maelflow.services.loopback import preload_env
from maelflow.workspace import write_secret

SERVER_PATHS = ("/usr/sbin/ecflow_server",)
CHECKPOINT_INTERVAL_S = 10  # a crash loses at most this much state (server default: 120 s)
# ecflow_server refuses ports above 49151. Linux hands out 32768-60999 to outgoing connections by
# default (ip_local_port_range), so a port below that is far more likely to be free at the next
# restart, when the same port must be reused to find the checkpoint
PORT_RANGE = (20000, 32767)


def ecflow_server_binary() -> str | None:
    for candidate in SERVER_PATHS:
        if os.access(candidate, os.X_OK):
            return candidate
    return shutil.which("ecflow_server")


LISTS_FILE = "ecf.lists"
PASSWD_FILE = "ecf.passwd"
CUSTOM_PASSWD_FILE = "ecf.custom_passwd"
# the ecflow Client reads ECF_PASSWD from the environment at its first request: set it there only
# while one client picks it up, one client at a time
_ENV_LOCK = threading.Lock()


def make_client(host: str, port: int, attempts: int = 1, retry_period: int = 0,
                passwd_file: str | os.PathLike[str] | None = None) -> Any:
    """A Client that fails fast: the defaults retry after 10 s, far too long for a health check.

    With ``passwd_file`` (a server started with a password file) the client sends this user's
    password from it. The Python client has no password setter: it looks the password up in
    $ECF_PASSWD at its first request and keeps it, so that request (a ping, one attempt: instant
    when the server is down) is made here with the variable set.
    """
    import ecflow

    if not passwd_file:
        ci = ecflow.Client(host, str(port))
    else:
        with _ENV_LOCK:
            saved = os.environ.get("ECF_PASSWD")
            os.environ["ECF_PASSWD"] = str(passwd_file)
            try:
                ci = ecflow.Client(host, str(port))
                ci.set_connection_attempts(1)
                ci.set_retry_connection_period(0)
                try:
                    ci.ping()
                except RuntimeError:
                    pass  # down or halted: the password was read all the same
            finally:
                if saved is None:
                    os.environ.pop("ECF_PASSWD", None)
                else:
                    os.environ["ECF_PASSWD"] = saved
    ci.set_connection_attempts(attempts)
    ci.set_retry_connection_period(retry_period)
    return ci


def owner_name() -> str:
    """The login name ecflow_client sends for this process (from the real uid)."""
    return pwd.getpwuid(os.getuid()).pw_name


class EcflowService(ManagedService):
    name = "ecflow"
    start_timeout = 20.0

    @property
    def ecf_home(self) -> Path:
        return self.dir

    def _port(self) -> int | None:
        return self.state().get("port")

    def port(self) -> int:
        """The stored port while it is free, else a random free one that ecflow_server accepts."""
        stored = self._port()
        if stored and 1024 <= stored <= 49151 and port_is_free(stored):
            return stored
        for _ in range(200):
            port = random.randint(*PORT_RANGE)
            if port_is_free(port):
                self.save_state(port=port)
                return port
        raise ServiceError(f"no free port for ecflow_server in {PORT_RANGE[0]}-{PORT_RANGE[1]}")

    def check_available(self) -> None:
        if not ecflow_server_binary():
            raise ServiceError("ecflow_server not found (looked in /usr/sbin and on PATH): "
                               "apt-get install ecflow-server")
        try:
            import ecflow  # noqa: F401
        except ImportError as exc:
            raise ServiceError(
                f"the ecflow Python module cannot be imported ({exc}): apt-get install python3-ecflow, "
                "and use a virtual environment made with --system-site-packages "
                "(bash scripts/install.sh does both)") from exc

    @property
    def passwd_file(self) -> Path:
        return self.ecf_home / PASSWD_FILE

    def _write_access_files(self, port: int) -> None:
        """The white list (the owner, read-write; nobody else, not even read: the definitions hold
        the job passwords) and the password files, 0600 from their creation. The password is kept
        across restarts, so clients made before a restart still work after it."""
        user = owner_name()
        password = self._password() or secrets.token_hex(16)
        hosts = dict.fromkeys([LOOPBACK, "localhost", socket.gethostname()])
        lines = "".join(f"{user} {host} {port} {password}\n" for host in hosts)
        header = "# written by maelflow: the workspace owner's password for its ecflow_server\n"
        write_secret(self.passwd_file, "4.5.0\n" + header + lines)
        write_secret(self.ecf_home / CUSTOM_PASSWD_FILE, "4.5.0\n" + header + lines)
        write_secret(self.ecf_home / LISTS_FILE,
                     "4.4.14\n# written by maelflow: only the workspace owner, read-write\n" + user + "\n")

    def _password(self) -> str | None:
        try:
            for line in self.passwd_file.read_text().splitlines():
                parts = line.split("#", 1)[0].split()
                if len(parts) >= 4:
                    return parts[3]
        except FileNotFoundError:
            pass
        return None

    def client_passwd_file(self) -> Path | None:
        """The password file to give clients: only for a server started with one (a server from
        before would refuse a client that sends a password it does not know)."""
        return self.passwd_file if self.state().get("access_control") and self.passwd_file.exists() else None

    def command(self, port: int) -> tuple[Sequence[str], dict[str, str]]:
        self._adopt_checkpoint(port)
        self._write_access_files(port)
        self.save_state(access_control=True)
        env = {
            "ECF_HOME": str(self.ecf_home),
            "ECF_PORT": str(port),
            "ECF_LISTS": str(self.ecf_home / LISTS_FILE),
            "ECF_PASSWD": str(self.passwd_file),
            "ECF_CUSTOM_PASSWD": str(self.ecf_home / CUSTOM_PASSWD_FILE),
            "ECF_CHECKINTERVAL": str(CHECKPOINT_INTERVAL_S),
            # the server aborts on an invalid locale, and job timestamps should not follow the caller's TZ
            "LANG": "C", "LC_ALL": "C", "TZ": "UTC",
            **preload_env(),
        }
        return [ecflow_server_binary() or "ecflow_server", "--port", str(port)], env

    def _adopt_checkpoint(self, port: int) -> None:
        """Keep the suites when the port (or hostname) had to change since the last run.

        The server only loads ``<host>.<port>.ecf.check``; if the stored port was taken by someone
        else and we got a new one, the newest older checkpoint is copied to the name it will look for.
        """
        host = socket.gethostname()
        wanted = self.ecf_home / f"{host}.{port}.ecf.check"
        if wanted.exists():
            return
        older = sorted(self.ecf_home.glob("*.ecf.check"), key=lambda p: p.stat().st_mtime)
        if older:
            shutil.copy2(older[-1], wanted)

    def healthy(self) -> bool:
        port = self._port()
        # connect first: ping against a dead port is fast, but against a wedged one it takes 10 s
        if not port or not port_accepts(port):
            return False
        make_client(LOOPBACK, port, passwd_file=self.client_passwd_file()).ping()
        return True

    def url(self) -> str | None:
        port = self._port()
        return f"ecflow://{LOOPBACK}:{port}" if port else None

    def extra(self) -> dict[str, Any]:
        port = self._port()
        passwd = self.client_passwd_file()
        return {"host": LOOPBACK, "port": port, "ecf_home": str(self.ecf_home),
                "passwd_file": str(passwd) if passwd else None,
                "server_log": str(self.ecf_home / f"{socket.gethostname()}.{port}.ecf.log")}

    def after_start(self) -> None:
        """The server comes up HALTED even after loading a checkpoint: restart it so jobs run."""
        port = self._port()
        if port:
            make_client(LOOPBACK, port, attempts=2, retry_period=1,
                        passwd_file=self.client_passwd_file()).restart_server()

    def before_stop(self) -> None:
        """Halt, checkpoint, then terminate, so the next start resumes exactly where this one stopped."""
        port, pid = self._port(), self.pid()
        if not port:
            return
        ci = make_client(LOOPBACK, port, attempts=2, retry_period=1, passwd_file=self.client_passwd_file())
        ci.halt_server()
        ci.checkpt()
        ci.terminate_server()
        wait_until(lambda: not pid_alive(pid), 10.0, interval=0.05)

    def _terminate(self, pid: int, grace: float = 3.0) -> None:
        """Only reached when the server did not answer: ecflow_server treats SIGTERM as "write a
        checkpoint" and keeps running, so give it a moment to write, then the base class kills it."""
        super()._terminate(pid, grace=grace)

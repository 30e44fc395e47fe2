"""What every embedded service shares: a process we started, its PID file, log, port and health.

Each service (ecflow_server, the S3 server, MLflow, the catalogue, the daemons of the loopback HPC
site) is a subclass that says how to start, how to check health and how to stop. This base class
owns the rules the brief sets for all of them: listen on 127.0.0.1 only, keep state/logs/PID files
in the workspace, be idempotent, and stop only processes we started, by PID.

A server with no bind option (ecflow_server 5.9.2) is kept on 127.0.0.1 by an LD_PRELOAD helper
(``services/loopback.py``), compiled at install time.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import socket
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from maelflow.errors import ServiceFailure
from maelflow.workspace import Workspace

LOOPBACK = "127.0.0.1"

log = logging.getLogger("maelflow.services")


class ServiceError(ServiceFailure):
    """A service could not be started or reached; the message says what to do."""


@dataclass
class ServiceInfo:
    name: str
    url: str | None = None
    pid: int | None = None
    healthy: bool = False
    running: bool = False
    log: str | None = None
    detail: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(data.pop("extra"))
        return data


def free_port(preferred: int | None = None) -> int:
    """The preferred port if it is free on loopback, else one the kernel hands out."""
    if preferred:
        if port_is_free(preferred):
            return preferred
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


def port_accepts(port: int, host: str = LOOPBACK, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


LEDGER_ENV = "MAELFLOW_SERVICE_LEDGER"  # a file to which every service start appends "pid start folder"


def pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except OSError as exc:
        return exc.errno == errno.EPERM
    # a zombie child of ours counts as gone
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return True


def process_start(pid: int | None) -> int | None:
    """The start time of ``pid`` in clock ticks since boot (/proc/PID/stat field 22), or None."""
    if not pid:
        return None
    try:
        with open(f"/proc/{pid}/stat") as fh:
            # the command name (field 2) may hold spaces and parentheses: split after its last ')'
            return int(fh.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def reap_ledger(ledger: Path, grace: float = 5.0) -> list[int]:
    """Stop every process a ledger (``LEDGER_ENV``) lists that is still the one started then (same
    PID and start time), SIGTERM then SIGKILL; returns their PIDs. Anything else is left alone."""
    victims = []
    for line in ledger.read_text().splitlines():
        parts = line.split(maxsplit=2)
        if len(parts) == 3 and parts[0].isdigit() and parts[1].isdigit() and \
                process_start(int(parts[0])) == int(parts[1]) and pid_alive(int(parts[0])):
            victims.append(int(parts[0]))
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 2.0)):
        for pid in victims:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        if wait_until(lambda: not any(pid_alive(p) for p in victims), wait, interval=0.05):
            break
    return victims


def wait_until(predicate, timeout: float, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


# A torch rendezvous of the starting process (Lightning writes MASTER_PORT into the environment of
# a training run in it, e.g. a test session) must not reach a server: ecflow_server hands its
# environment to every job it starts, and trainings that all inherit one port collide (EADDRINUSE).
RENDEZVOUS_VARS = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK")


def service_environment(extra: dict[str, str]) -> dict[str, str]:
    """This process's environment without a rendezvous, with the service's own ``extra`` on top."""
    env = {k: v for k, v in os.environ.items() if k not in RENDEZVOUS_VARS}
    env.update(extra)
    return env


class ManagedService:
    """A long-running process of ours in ``<workspace>/<name>/`` with pid, log and state files."""

    name: str = "service"
    start_timeout: float = 30.0

    def __init__(self, workspace: Workspace):
        self.ws = workspace
        self.dir = workspace.path(self.name)

    # -- files --------------------------------------------------------------------------------
    @property
    def pid_file(self) -> Path:
        return self.dir / f"{self.name}.pid"

    @property
    def log_file(self) -> Path:
        return self.dir / f"{self.name}.log"

    @property
    def state_file(self) -> Path:
        return self.dir / "state.json"

    def state(self) -> dict[str, Any]:
        return self.ws.read_json(self.name, "state.json", default={}) or {}

    def save_state(self, **values: Any) -> None:
        data = self.state()
        data.update(values)
        self.ws.write_json(data, self.name, "state.json")

    def pid(self) -> int | None:
        try:
            return int(self.pid_file.read_text().split()[0])
        except (FileNotFoundError, ValueError, IndexError):
            return None

    def _recorded_start(self) -> int | None:
        try:
            return int(self.pid_file.read_text().split()[1])
        except (FileNotFoundError, ValueError, IndexError):
            return None

    def _write_pid(self, pid: int) -> None:
        start = process_start(pid)
        self.pid_file.write_text(f"{pid} {start}\n" if start is not None else f"{pid}\n")
        ledger = os.environ.get(LEDGER_ENV)
        if ledger and start is not None:
            # a supervisor (a test session, a CI job) that is killed before it stops its services
            # leaves them running; its successor reads this ledger and stops exactly these processes
            with open(ledger, "a") as fh:
                fh.write(f"{pid} {start} {self.dir}\n")

    def ours(self, pid: int | None = None) -> bool:
        """Whether the PID in the PID file (or ``pid``) is still the process we started.

        Its start time must match the recorded one; a PID file from before start times were
        recorded falls back to the working folder, which ``up`` sets to this service's folder.
        """
        pid = pid or self.pid()
        if not pid_alive(pid):
            return False
        recorded = self._recorded_start()
        if recorded is not None:
            return process_start(pid) == recorded
        try:
            return Path(os.readlink(f"/proc/{pid}/cwd")) == self.dir.resolve()
        except OSError:
            return False

    def port(self) -> int:
        """The workspace keeps its port, so restarts (and ecFlow checkpoints named after it) line up."""
        port = free_port(self.state().get("port"))
        if port != self.state().get("port"):
            self.save_state(port=port)
        return port

    # -- to be provided by each service --------------------------------------------------------
    def command(self, port: int) -> tuple[Sequence[str], dict[str, str]]:
        raise NotImplementedError

    def healthy(self) -> bool:
        raise NotImplementedError

    def url(self) -> str | None:
        port = self.state().get("port")
        return f"http://{LOOPBACK}:{port}" if port else None

    def after_start(self) -> None:
        """Hook run once the process is healthy (create a bucket, restart a halted server...)."""

    def before_stop(self) -> None:
        """Hook run before SIGTERM (ask a server to checkpoint...)."""

    def extra(self) -> dict[str, Any]:
        return {}

    def check_available(self) -> None:
        """Raise ServiceError naming the missing binary or package."""

    # -- lifecycle ----------------------------------------------------------------------------
    def running(self) -> bool:
        return self.ours()

    def status(self) -> ServiceInfo:
        pid = self.pid()
        running = self.ours(pid)
        healthy = bool(running and self._safe_healthy())
        return ServiceInfo(
            name=self.name, url=self.url() if running else None, pid=pid if running else None,
            healthy=healthy, running=running, log=str(self.log_file),
            detail="" if healthy else ("not healthy" if running else "stopped"),
            extra=self.extra() if running else {})

    def _safe_healthy(self) -> bool:
        try:
            return self.healthy()
        except Exception:
            return False

    def up(self) -> ServiceInfo:
        if self.running():
            if wait_until(self._safe_healthy, self.start_timeout):
                return self.status()
            raise ServiceError(f"{self.name}: process {self.pid()} runs but is not healthy; "
                               f"see {self.log_file}, or run 'maelflow services down' and retry")
        self.check_available()
        self.ws.create()  # the workspace root is private (0700) before anything of ours is in it
        self.dir.mkdir(parents=True, exist_ok=True)
        port = self.port()
        argv, env = self.command(port)
        full_env = service_environment(env)
        with open(self.log_file, "ab") as log:
            proc = subprocess.Popen(
                list(argv), cwd=self.dir, env=full_env, stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True)
        self._write_pid(proc.pid)

        def ready() -> bool:
            if proc.poll() is not None:
                return True
            return self._safe_healthy()

        wait_until(ready, self.start_timeout, interval=0.1)
        if proc.poll() is not None:
            self.pid_file.unlink(missing_ok=True)
            raise ServiceError(f"{self.name} exited with status {proc.returncode} at start; "
                               f"last log lines:\n{tail(self.log_file)}")
        if not self._safe_healthy():
            self._terminate(proc.pid)
            raise ServiceError(f"{self.name} did not become healthy within {self.start_timeout:.0f} s "
                               f"on port {port}; last log lines:\n{tail(self.log_file)}")
        self.after_start()
        return self.status()

    def down(self) -> ServiceInfo:
        pid = self.pid()
        if self.ours(pid):
            try:
                self.before_stop()
            except Exception as exc:  # noqa: BLE001 - stop it anyway, but say what was not done
                log.warning("%s: the orderly stop failed (%s: %s); terminating process %s",
                            self.name, type(exc).__name__, str(exc).strip()[:300], pid)
            self._terminate(pid)
        elif pid_alive(pid):
            log.warning("%s: process %s named in %s is not the one this workspace started "
                        "(its start time differs): left alone", self.name, pid, self.pid_file)
        self.pid_file.unlink(missing_ok=True)
        return self.status()

    def _terminate(self, pid: int, grace: float = 10.0) -> None:
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                return
            if wait_until(lambda: not pid_alive(pid), wait, interval=0.05):
                break
        try:  # reap it if it is our child
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass


def venv_binary(name: str) -> str | None:
    """A tool installed beside this interpreter (the venv's), else on PATH: the server then runs the
    same version as the clients that import it (and not, say, Debian's older rclone)."""
    import shutil
    import sys

    beside = Path(sys.executable).parent / name
    return str(beside) if beside.is_file() else shutil.which(name)


def http_healthy(port: int | None, path: str = "/health", timeout: float = 2.0) -> bool:
    """An HTTP service on loopback answers 200 on its health route."""
    import urllib.request

    if not port:
        return False
    with urllib.request.urlopen(f"http://{LOOPBACK}:{port}{path}", timeout=timeout) as resp:
        return resp.status == 200


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"

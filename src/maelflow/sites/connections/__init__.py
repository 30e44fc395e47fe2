"""How maelflow reaches a site: a ``Connection`` runs commands and moves files there.

A site is a connection × a scheduler (troika's ``connections/`` × ``sites/``). Connections are
found by name (the site's ``connection.type``) in the ``maelflow.connections`` entry-point group,
so a package can add one without touching maelflow. Two ship: ``local`` (this machine, through
bash) and ``ssh`` (the OpenSSH client on a ControlMaster: keys, agents, certificates, and 2FA
through a master the operator opened once).

Every remote side effect goes through one of these methods, and each honours ``dry_run`` (it
prints what it would do and does nothing), so ``--dry-run`` and tests see the exact commands.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, runtime_checkable

from maelflow import plugins

GROUP = plugins.CONNECTIONS


@dataclass(frozen=True)
class RemoteResult:
    rc: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.rc == 0


@runtime_checkable
class Connection(Protocol):
    """Commands and files on a site; errors are ``maelflow.errors.SiteError`` families."""

    site_name: str
    dry_run: bool
    local: bool         # the site's files are this machine's (callers may read them in place)

    @property
    def target(self) -> str: ...

    def run(self, command: str, *, input: bytes | None = None, timeout: float = 60, check: bool = True,
            retry: bool = True) -> RemoteResult: ...

    def run_lines(self, command: str, on_line: Callable[[str], None], *, timeout: float = 86400,
                  check: bool = True) -> RemoteResult: ...

    def put_text(self, remote_path: str, text: str, mode: int | None = None) -> None: ...
    def put_file(self, local: str, remote_path: str, mode: int | None = None) -> None: ...
    def read_bytes(self, remote_path: str, offset: int = 0, limit: int | None = None) -> bytes: ...
    def exists(self, remote_path: str) -> bool: ...
    def makedirs(self, remote_path: str) -> None: ...
    def rename(self, src: str, dst: str) -> None: ...
    def check(self) -> None: ...
    def close(self) -> None: ...


def connection_class(kind: str) -> type:
    """The class registered as ``kind`` in the ``maelflow.connections`` group."""
    from maelflow.errors import ConfigurationError

    found = plugins.find(GROUP, kind)
    if found is None:
        raise ConfigurationError(f"no connection type {kind!r} (known: {', '.join(plugins.names(GROUP))})",
                                 hint="install the package that provides it, or fix connection.type")
    return found.load()


def connect(site_name: str, site, *, dry_run: bool = False) -> Connection:
    """The connection to ``site`` (a ``maelflow.config.models.Site``), by its ``connection.type``.

    Each class builds itself from the site (``for_site``): the SSH one reuses one session per
    process and login, so the commands of one process share one handshake.
    """
    return connection_class(site.connection.type).for_site(site_name, site, dry_run=dry_run)


def is_local(site) -> bool:
    """The site is this machine (its connection class says so: its files can be read in place, a job
    of it writes where ecFlow reads); a question asked here once, not of ``connection.type``."""
    return bool(getattr(connection_class(site.connection.type), "local", False))

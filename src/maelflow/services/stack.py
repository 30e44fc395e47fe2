"""The embedded stack: which services exist, in which order they start, and how callers find them.

Order matters: later services may use earlier ones (the catalogue stores into S3), so ``up`` goes
down the list and ``down`` goes back up it. Entries are "module:Class" strings so that listing or
stopping the stack never imports a service module (and its dependencies) that is not needed.

An entry is built with the workspace and offers ``up()``, ``status()`` and ``down()``. Each returns
a ServiceInfo (a ManagedService) or a dict of them (a group of daemons, such as the loopback HPC
site); the stack flattens groups into one dict keyed by the members' names.

Other distributions add services through the ``maelflow.services`` entry-point group (name =
"module:Class"), so the core names none of them: maelflow-sandbox registers ``hpc``, the loopback
HPC site. They take their place just before the relay, which reaches the sites they may provide:
up after them, down before them.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib
from functools import cache
from importlib.metadata import entry_points
from typing import Any, Callable, Iterable, Iterator

from maelflow.services.base import ServiceError, ServiceInfo
from maelflow.workspace import Workspace

# Registration is one line here. A class with ``optional = True`` starts only when named.
SERVICES: dict[str, str] = {
    "ecflow": "maelflow.services.ecflow:EcflowService",
    "s3": "maelflow.services.s3:S3Service",
    "mlflow": "maelflow.services.mlflow:MlflowService",
    "postgres": "maelflow.services.postgres:PostgresService",  # optional: the catalogue's index with --with postgres
    "catalogue": "maelflow.services.catalogue:CatalogueService",
    "relay": "maelflow.services.relay:RelayService",
}

GROUP = "maelflow.services"
PLUGINS_BEFORE = "relay"
# services that maelflow's own CLI and configs name but another distribution provides
NOT_INSTALLED = {"hpc": "maelflow-sandbox"}

Infos = dict[str, ServiceInfo]


@cache
def _plugins() -> dict[str, str]:
    return {ep.name: ep.value for ep in sorted(entry_points(group=GROUP), key=lambda ep: ep.name)}


def table() -> dict[str, Any]:
    """Every service in stack order: SERVICES, with the entry-point ones just before the relay."""
    plugins = {n: t for n, t in _plugins().items() if n not in SERVICES}
    merged: dict[str, Any] = {}
    for name, target in SERVICES.items():
        if name == PLUGINS_BEFORE:
            merged.update(plugins)
        merged[name] = target
    merged.update(plugins)  # keeps the place of those already in (no relay: at the end)
    return merged


def service_class(name: str) -> type:
    services = table()
    try:
        target: Any = services[name]
    except KeyError:
        if name in NOT_INSTALLED:
            raise ServiceError(f"the '{name}' service comes with {NOT_INSTALLED[name]}, "
                               "which is not installed",
                               hint=".venv/bin/python -m pip install -e ./sandbox "
                                    "(bash scripts/install.sh installs it)") from None
        raise ServiceError(f"unknown service '{name}'; known: {', '.join(services)}") from None
    if not isinstance(target, str):
        return target
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def service(ws: Workspace, name: str) -> Any:
    return service_class(name)(ws)


def _optional(name: str) -> bool:
    return bool(getattr(service_class(name), "optional", False))


def _flat(name: str, result: ServiceInfo | Infos) -> Infos:
    return dict(result) if isinstance(result, dict) else {name: result}


@contextlib.contextmanager
def _locked(ws: Workspace) -> Iterator[None]:
    """Serialise up/down per workspace: two concurrent ``up`` calls must not start two servers."""
    with open(ws.ensure() / ".services.lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def selected(names: Iterable[str] | None = None, extra: Iterable[str] = ()) -> list[str]:
    """The names to act on, in stack order: the given ones, or every non-optional one, plus ``extra``."""
    services = table()
    wanted = set(names) if names is not None else {n for n in services if not _optional(n)}
    wanted |= set(extra)
    for name in wanted:
        service_class(name)  # unknown names fail before anything starts
    return [n for n in services if n in wanted]


def up(ws: Workspace, names: Iterable[str] | None = None, extra: Iterable[str] = (),
       on_start: Callable[[str], None] | None = None) -> Infos:
    """Start what is not running; leave what is running alone (same PIDs, same ports).

    Stops at the first failure, leaving the earlier services up: a second ``up`` carries on.
    """
    infos: Infos = {}
    chosen = selected(names, extra)
    with _locked(ws):
        for name in chosen:
            if _external(ws, name):  # the services profile's: checked, never started here
                infos[name] = _checked_external(ws, name)
                continue
            if on_start:
                on_start(name)
            infos.update(_flat(name, service(ws, name).up()))
    return infos


def _external(ws: Workspace, name: str) -> bool:
    from maelflow.services import profile

    return profile.is_external(ws, name)


def _checked_external(ws: Workspace, name: str) -> ServiceInfo:
    from maelflow.services import profile

    info = profile.check(ws, name)
    if not info.healthy:
        raise ServiceError(f"{name} (external, from the services profile) is not usable: {info.detail}",
                           hint="check the profile (maelflow services use) and the service itself; "
                                "maelflow services status lists every problem")
    return info


def status(ws: Workspace, names: Iterable[str] | None = None) -> Infos:
    """Every default service, plus optional ones that run in this workspace."""
    infos: Infos = {}
    for name in selected(names if names is not None else list(table())):
        if _external(ws, name):
            from maelflow.services import profile

            infos[name] = profile.check(ws, name)
            continue
        current = _flat(name, service(ws, name).status())
        if names is None and _optional(name) and not any(i.running for i in current.values()):
            continue
        infos.update(current)
    return infos


def down(ws: Workspace, names: Iterable[str] | None = None) -> Infos:
    """Stop in reverse order; each info's ``detail`` says what was done, for the CLI to print."""
    infos: Infos = {}
    chosen = selected(names if names is not None else list(table()))
    if not ws.root.is_dir():  # nothing was ever started here; don't create the folder to say so
        infos = status(ws, chosen)
        for info in infos.values():
            info.detail = "was not running"
        return dict(reversed(infos.items()))
    with _locked(ws):
        for name in reversed(chosen):
            if _external(ws, name):
                infos[name] = ServiceInfo(name=name, detail="external (services profile): left alone")
                continue
            svc = service(ws, name)
            before = _flat(name, svc.status())
            for member, info in _flat(name, svc.down()).items():
                pid = before[member].pid if member in before and before[member].running else None
                if pid is None:
                    info.detail = "was not running"
                elif info.running:
                    info.detail = f"process {pid} is still running; see {info.log}"
                else:
                    info.detail = f"stopped (pid {pid})"
                infos[member] = info
    return infos


def discover(ws: Workspace, name: str) -> ServiceInfo:
    """A healthy service's connection details, or a ServiceError saying how to start it.

    For a group, every member must be healthy; the group's info lists them under ``extra``. A service
    that the workspace's services profile makes external is described from the profile (with its
    credentials), not started and not checked here (``maelflow services status`` checks it).
    """
    if _external(ws, name):
        from maelflow.services import profile

        return profile.info(ws, name)
    result = service(ws, name).status()
    if isinstance(result, dict):
        members = result
        info = ServiceInfo(name=name, healthy=all(i.healthy for i in members.values()),
                           running=any(i.running for i in members.values()),
                           extra={m: i.to_json() for m, i in members.items()})
    else:
        info = result
    if not info.healthy:
        state = "runs but is not healthy" if info.running else "is not running"
        raise ServiceError(f"{name} {state} in workspace {ws.root}: run 'maelflow services up' "
                           f"(with --workspace {ws.root} if that is not your default)")
    return info


def s3_settings(ws: Workspace, role: str = "write") -> dict[str, Any]:
    """The workspace's S3 store as ``role`` reaches it (endpoint, that role's keys, bucket): the one
    place a caller beside the server gets S3 settings from service discovery."""
    from maelflow.s3 import settings_from_service

    return settings_from_service(discover(ws, "s3").extra, role)

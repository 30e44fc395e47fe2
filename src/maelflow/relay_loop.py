"""The relay's loop: which spools to watch (every relay-mode site of every suite on the workspace's
server), replaying them, mirroring job outputs, resubmitting timed-out trainings.

Failures back off instead of being retried every second. While the ecFlow server is down, halted or
restarting, no spool is read (lines stay where they are, in order) and the server is asked again
after 1, 2, 4... up to ``SERVER_RETRY_MAX_S`` seconds. A site whose connection fails (a login node
down, a refused or expired credential) is left alone for 5, 10, 20... up to ``SITE_RETRY_MAX_S``
seconds, so a down site is not hammered (EuroHPC login nodes lock accounts out after repeated
failures) while the other sites go on. Each change of state (failing, back) is logged once.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from maelflow.config.loader import ResolvedExperiment
from maelflow.relay import (LocalSpool, RelayState, Sender, ServerUnavailable, SpoolSource, SshSpool, replay,
                            state_path)
from maelflow.sites.connections import connect, is_local
from maelflow.workspace import Workspace, write_atomic

log = logging.getLogger("maelflow.relay")

_configs: dict[str, tuple[float, ResolvedExperiment]] = {}

SERVER_RETRY_FIRST_S, SERVER_RETRY_MAX_S = 1.0, 8.0
SITE_RETRY_FIRST_S, SITE_RETRY_MAX_S = 5.0, 300.0


@dataclass
class Backoff:
    """Exponential back-off for one thing that fails (the server, one site): when to try next."""

    first: float
    cap: float
    delay: float = 0.0
    next_at: float = 0.0
    failing: bool = False

    def ready(self, now: float) -> bool:
        return now >= self.next_at

    def failure(self, now: float) -> bool:
        """Record a failure; True when this starts a failing spell (log it then, not every time)."""
        self.delay = min(self.cap, self.delay * 2) if self.failing else self.first
        self.next_at = now + self.delay
        started = not self.failing
        self.failing = True
        return started

    def success(self) -> bool:
        """Record a success; True when it ends a failing spell."""
        ended = self.failing
        self.failing, self.delay, self.next_at = False, 0.0, 0.0
        return ended


class _Unreachable:
    """The spool source of a site whose connection could not even be set up."""

    def __init__(self, exc: Exception):
        self.exc = exc

    def listing(self, spool_dir: str) -> dict[str, int]:
        raise self.exc

    def read(self, path: str, offset: int) -> bytes:
        raise self.exc


@dataclass
class Target:
    suite: str
    site: str
    spool_dir: str
    source: SpoolSource
    sender: Sender
    after_replay: Callable[[], None] = field(default=lambda: None)


def _load(path: str) -> ResolvedExperiment | None:
    p = Path(path)
    try:
        mtime = p.stat().st_mtime
    except FileNotFoundError:
        return None
    cached = _configs.get(path)
    if cached and cached[0] == mtime:
        return cached[1]
    rx = ResolvedExperiment.from_json(json.loads(p.read_text()))
    _configs[path] = (mtime, rx)
    return rx


def source_for(rx: ResolvedExperiment, site: str) -> SpoolSource:
    s = rx.sites[site]
    if is_local(s):
        return LocalSpool()
    return SshSpool(connect(site, s))


def targets(ws: Workspace) -> list[Target]:
    from maelflow.ecf import client_for
    from maelflow.services.stack import discover
    from maelflow.suite.builder import spool_dir

    info = discover(ws, "ecflow")
    client = client_for(ws)
    client.sync_local()
    defs = client.get_defs()
    if defs is None:
        return []
    sender = Sender(info.extra["host"], info.extra["port"], passwd_file=info.extra.get("passwd_file"),
                    server_id=info.pid)
    out = []
    for suite in defs.suites:
        var = suite.find_variable("MAELFLOW_SUITE_CONFIG")
        if var.empty():
            continue
        rx = _load(var.value())
        if rx is None:
            continue
        for site_name, site in rx.sites.items():
            if site.reporting == "relay":
                try:
                    source: SpoolSource = source_for(rx, site_name)
                except Exception as exc:  # noqa: BLE001 - that site backs off, the others go on
                    source = _Unreachable(exc)
                t = Target(suite.name(), site_name, spool_dir(rx, site_name), source, sender)
                if not is_local(site):
                    t.after_replay = _mirror(suite, rx, site_name)
                out.append(t)
    return out


_final: set[str] = set()


def _mirror(suite, rx: ResolvedExperiment, site: str) -> Callable[[], None]:
    """Copy what remote jobs printed into their local ECF_JOBOUT, so ecFlow UI shows job output
    while a job runs and after; a finished job's output is fetched one last time, then left alone."""

    def mirror() -> None:
        import ecflow

        from maelflow.sites.jobs import load_record
        from maelflow.sites.runner import runner_for

        ecf_home = Path(suite.find_variable("ECF_HOME").value())
        from maelflow.config.names import node_name

        family = suite.find_family(node_name(site))
        if family is None:
            return
        nodes = family.get_all_nodes()
        runner = None   # output is read through the site's connection, whatever the job's scheduler
        for node in nodes:
            if not isinstance(node, ecflow.Task):
                continue
            state = str(node.get_state())
            try_no = node.get_try_no()
            if state in ("queued", "unknown") or not try_no:
                continue
            base = ecf_home / node.get_abs_node_path().lstrip("/")
            job, jobout = Path(f"{base}.job{try_no}"), Path(f"{base}.{try_no}")
            key = str(jobout)
            if key in _final:
                continue
            handle = load_record(job)
            if handle is None or not handle.remote_out:
                continue
            runner = runner or runner_for(rx, site)
            added = runner.fetch_output(handle, jobout)
            if state in ("complete", "aborted") and added == 0:
                _final.add(key)

    return mirror


def relay_forever(ws: Workspace, interval: float = 1.0, once: bool = False,
                  find_targets: Callable[[Workspace], list[Target]] | None = None) -> None:
    """Watch every deployed suite's relay sites, mirror job outputs, resubmit timed-out trainings.

    ``find_targets`` replaces the discovery of spools from the deployed suites (fault tests use it
    to relay one hand-made suite through this same loop)."""
    from maelflow.resubmit import resubmit_timeouts

    heartbeat = ws.path("relay", "heartbeat")
    server = Backoff(SERVER_RETRY_FIRST_S, SERVER_RETRY_MAX_S)
    sites: dict[tuple[str, str], Backoff] = {}
    while True:
        t0 = time.monotonic()
        if server.ready(t0):
            try:
                unavailable = None
                for target in (find_targets or targets)(ws):
                    key = (target.suite, target.site)
                    site = sites.setdefault(key, Backoff(SITE_RETRY_FIRST_S, SITE_RETRY_MAX_S))
                    if not site.ready(time.monotonic()):
                        continue
                    try:
                        state = RelayState.load(state_path(ws, target.suite, target.site))
                        replay(target.source, target.spool_dir, target.sender, state)
                        target.after_replay()
                    except ServerUnavailable as exc:
                        unavailable = exc
                        break  # the server is the same for every site: stop the pass, keep the order
                    except Exception as exc:  # noqa: BLE001 - one broken site must not stop the others
                        if site.failure(time.monotonic()):
                            log.warning("relay %s/%s: %s: %s; retrying with back-off (up to %.0f s)",
                                        target.suite, target.site, type(exc).__name__, exc, site.cap)
                        continue
                    if site.success():
                        log.warning("relay %s/%s: the site is reachable again", target.suite, target.site)
                if unavailable is not None:
                    raise unavailable
                from maelflow.ecf import client_for

                resubmit_timeouts(client_for(ws))
                if server.success():
                    log.warning("relay: the ecFlow server takes commands again; replaying")
            except Exception as exc:  # noqa: BLE001 - the server may be halted, restarting or down
                if server.failure(time.monotonic()):
                    log.warning("relay: %s; lines stay in the spools, retrying with back-off (up to %.0f s)",
                                exc, server.cap)
        write_atomic(heartbeat, f"{time.time():.0f}\n")
        if once:
            return
        time.sleep(max(0.0, interval - (time.monotonic() - t0)))

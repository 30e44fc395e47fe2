"""The relay's loop: which spools to watch (every relay-mode site of every suite on the workspace's
server), replaying them, mirroring job outputs, resubmitting timed-out trainings."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from maelflow.config.loader import ResolvedExperiment
from maelflow.relay import LocalSpool, RelayState, Sender, SpoolSource, SshSpool, replay, state_path
from maelflow.workspace import Workspace, write_atomic

log = logging.getLogger("maelflow.relay")

_configs: dict[str, tuple[float, ResolvedExperiment]] = {}


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
    if s.connection.type == "local":
        return LocalSpool()
    from maelflow.sites.ssh import session_for

    return SshSpool(session_for(site, s.connection.ssh))


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
    sender = Sender(info.extra["host"], info.extra["port"])
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
                t = Target(suite.name(), site_name, spool_dir(rx, site_name), source_for(rx, site_name), sender)
                if site.connection.type == "ssh":
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
        runners: dict[str, object] = {}
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
            runner = runners.setdefault(handle.kind, runner_for(rx, site, where="site" if handle.kind == "slurm" else "login"))
            added = runner.fetch_output(handle, jobout)
            if state in ("complete", "aborted") and added == 0:
                _final.add(key)

    return mirror


def relay_forever(ws: Workspace, interval: float = 1.0, once: bool = False) -> None:
    """Watch every deployed suite's relay sites, mirror job outputs, resubmit timed-out trainings."""
    from maelflow.resubmit import resubmit_timeouts

    heartbeat = ws.path("relay", "heartbeat")
    while True:
        t0 = time.monotonic()
        try:
            found = targets(ws)
            for target in found:
                try:
                    state = RelayState.load(state_path(ws, target.suite, target.site))
                    replay(target.source, target.spool_dir, target.sender, state)
                    target.after_replay()
                except Exception as exc:  # noqa: BLE001 - one broken site must not stop the others
                    log.warning("relay %s/%s: %s", target.suite, target.site, exc)
            from maelflow.ecf import client_for

            resubmit_timeouts(client_for(ws))
        except Exception as exc:  # noqa: BLE001 - the server may be restarting
            log.warning("relay: %s", exc)
        write_atomic(heartbeat, f"{time.time():.0f}\n")
        if once:
            return
        time.sleep(max(0.0, interval - (time.monotonic() - t0)))

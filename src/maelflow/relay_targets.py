"""Which spools the relay watches: every relay-mode site of every suite on the workspace's server."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from maelflow.config.loader import ResolvedExperiment
from maelflow.relay import LocalSpool, Sender, SpoolSource, SshSpool
from maelflow.workspace import Workspace

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
                out.append(Target(suite.name(), site_name, spool_dir(rx, site_name), source_for(rx, site_name), sender))
    return out

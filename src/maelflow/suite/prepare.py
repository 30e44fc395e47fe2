"""Get a site ready for a suite at deploy time: folders, the resolved config, EWC credentials.

Done once per deploy rather than in every job submission, and over the same SSH connection the jobs
use, so a site that cannot be reached fails the deploy with the credential message, before any
task is queued.
"""

from __future__ import annotations

import json
from pathlib import Path

from maelflow.config.loader import ResolvedExperiment
from maelflow.sites.connections import connect, is_local
from maelflow.workspace import Workspace


def prepare_site(rx: ResolvedExperiment, site: str, config_file: Path, ws: Workspace) -> str:
    from maelflow.ewc import SITE_ROLE, site_credentials_path
    from maelflow.services.stack import s3_settings
    from maelflow.suite.builder import site_config_path, spool_dir

    s = rx.sites[site]
    root = s.paths.root.rstrip("/")
    folders = [f"{root}/jobs", spool_dir(rx, site), f"{root}/suites/{rx.name}", s.paths.datasets, s.paths.outputs]
    if is_local(s):
        for f in folders:
            Path(f).mkdir(parents=True, exist_ok=True)
        return f"{site}: folders ready under {root}"
    from maelflow.services.base import ServiceError

    conn = connect(site, s)
    for f in folders:
        conn.makedirs(f)
    conn.put_text(site_config_path(rx, site), config_file.read_text(), mode=0o644)
    note = ""
    try:
        creds = s3_settings(ws, SITE_ROLE)   # read-only keys: a job on a site never writes the store
    except ServiceError:
        creds = None
    if creds is not None:
        conn.makedirs(f"{root}/.maelflow")
        conn.put_text(site_credentials_path(root), json.dumps(creds), mode=0o600)
        note = ", EWC credentials"
    return f"{site}: folders, config{note} ready under {root} on {s.connection.ssh.host}"

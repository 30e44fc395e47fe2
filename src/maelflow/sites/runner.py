"""A site runs jobs through a connection (how we reach it) and a scheduler (how jobs start there).

The local site is a process on this machine; an HPC site is SLURM reached over SSH, or a process on
its login node. ``runner_for`` picks the runner; each answers the same three questions ecFlow asks.
"""

from __future__ import annotations

from maelflow.config.loader import ResolvedExperiment
from maelflow.sites.base import Runner
from maelflow.sites.local_runner import LocalProcessRunner


def runner_for(rx: ResolvedExperiment, site: str, dry_run: bool = False, where: str = "site") -> Runner:
    """The runner for a job of ``site``: on its scheduler ("site"), as a process on its login node
    ("login"), or as a process beside the ecFlow server ("local")."""
    if where == "local":
        return LocalProcessRunner(site, dry_run=dry_run)
    s = rx.sites.get(site)
    if s is None:
        raise KeyError(f"site {site!r} is not part of experiment {rx.name!r} ({', '.join(rx.sites)})")
    if s.connection.type == "local" and (where == "login" or s.scheduler == "local"):
        return LocalProcessRunner(site, dry_run=dry_run)
    if s.connection.type == "ssh" and (where == "login" or s.scheduler == "local"):
        from maelflow.sites.login_runner import SshLoginRunner

        return SshLoginRunner(site, s, dry_run=dry_run)
    if s.connection.type == "ssh" and s.scheduler == "slurm":
        from maelflow.sites.slurm_runner import SshSlurmRunner

        return SshSlurmRunner(site, s, dry_run=dry_run)
    raise NotImplementedError(f"site {site!r}: {s.connection.type} connection with {s.scheduler} scheduler "
                              "is not supported (SLURM must be reached over ssh)")

"""A many-task suite: N jobs that do almost nothing, on one site, for scale tests and benchmarks.

maelflow's suites have a few jobs per training; a campaign (benchmark repeats, operations cycles,
many trainings) has hundreds. What has to hold then is the plumbing, not the training: every task
submitted once (ECF_JOB_CMD through the site's connection x scheduler, the submit-once guard), the
site's jobs limit honoured, and the relay keeping up with the child commands of hundreds of jobs.

``deploy_many`` deploys the experiment's ordinary suite (``maelflow build``: its variables, the site
family with its jobs limit and its connection, scheduler and reporting) with one family more in the
site family, ``many``, holding N families ``nNNNN`` of one task ``noop`` each: the ordinary job header
and trailer (init, complete; relayed on a relay site) around an ``echo``. Tests and bench/many_tasks.py
use it; maelflow itself never does.
"""

from __future__ import annotations

from pathlib import Path

from maelflow.config.loader import ResolvedExperiment
from maelflow.config.names import node_name
from maelflow.suite.builder import CONFIG_FILE, BuiltSuite, build_suite
from maelflow.workspace import Workspace

FAMILY = "many"
TASK = "noop"
SCRIPT = """%include <head.h>
# A task of a many-task suite (maelflow_sandbox.manytasks): it does almost nothing, on purpose.
echo "noop %ECF_NAME% try %ECF_TRYNO% on $(hostname) job ${SLURM_JOB_ID:-none}"
%include <tail.h>
"""


def task_paths(suite: str, site: str, n: int) -> list[str]:
    return [f"/{suite}/{node_name(site)}/{FAMILY}/n{i:04d}/{TASK}" for i in range(n)]


def build_many(rx: ResolvedExperiment, ws: Workspace, n: int, site: str | None = None,
               out_dir: Path | None = None) -> BuiltSuite:
    """The experiment's suite with ``n`` no-op tasks in ``site``'s family (default: its first site)."""
    site = site or rx.experiment.sites[0]
    built = build_suite(rx, out_dir or ws.suites_dir / rx.name, ws)
    (built.out_dir / "tasks" / f"{TASK}.ecf").write_text(SCRIPT)
    family = built.defs.find_abs_node(f"/{built.name}/{node_name(site)}")
    if family is None:
        raise ValueError(f"suite {built.name} has no family for site {site!r}")
    many = family.add_family(FAMILY)
    for i in range(n):
        many.add_family(f"n{i:04d}").add_task(TASK)
    problems = built.defs.check()
    if problems:
        raise ValueError(f"ecFlow rejected the many-task suite: {problems}")
    built.defs.save_as_defs(str(built.def_file))
    return built


def deploy_many(rx: ResolvedExperiment, ws: Workspace, client, n: int, site: str | None = None) -> BuiltSuite:
    """Build as ``build_many`` and deploy as ``maelflow deploy`` does (a new suite: load and begin)."""
    from maelflow.suite.prepare import prepare_site
    from maelflow.suite.server import DEPLOY_ID_VAR, deploy_id

    built = build_many(rx, ws, n, site)
    (built.out_dir / "jobs").mkdir(exist_ok=True)
    for name in rx.experiment.sites:
        prepare_site(rx, name, built.out_dir / CONFIG_FILE, ws)
    client.sync_local()
    defs = client.get_defs()
    if defs is not None and defs.find_suite(built.name) is not None:
        client.delete(f"/{built.name}", True)
    client.load(str(built.def_file))
    client.alter(f"/{built.name}", "add", "variable", DEPLOY_ID_VAR, deploy_id())
    client.begin_suite(built.name)
    return built


__all__ = ["FAMILY", "TASK", "build_many", "deploy_many", "task_paths"]

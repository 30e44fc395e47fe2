"""A suite of 200 short jobs on the loopback SLURM site: each task runs exactly once, the site's jobs
limit is never exceeded, and the relay keeps up with their child commands.

The suite is the experiment's ordinary one (ecflow_server, ECF_JOB_CMD over SSH to SLURM, relay
reporting) with 200 tasks that do almost nothing (maelflow_sandbox.manytasks). SLURM's own record
(``sacct --completion``: the job-completion log of the site) is the witness for "exactly once" and
for the limit; the server's limit counter is watched too.
"""

from __future__ import annotations

import subprocess
import time
from datetime import datetime

import pytest

from maelflow.config.loader import load_experiment
from maelflow.ecf import client_for
from maelflow.placeholders import placeholders_for
from maelflow.suite.layout import jobs_limit
from maelflow.suite.server import tree
from maelflow_sandbox import hpc
from maelflow_sandbox.manytasks import FAMILY, deploy_many, task_paths
from tests.conftest import write_yaml

pytestmark = pytest.mark.integration

SUITE = "h_many"
N = 200
LIMIT = 4          # the loopback site's default (configs/sites/localhpc.yaml), written out: it is checked


def slurm_jobs(ws, prefix: str) -> list[dict[str, str]]:
    """Every job SLURM ran whose name starts with ``prefix``, from its job-completion log."""
    proc = subprocess.run(hpc.LoopbackHpc(ws).ssh_argv("sacct --completion -n -P -o JobID,JobName,State,Start,End"),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    rows = [dict(zip(("id", "name", "state", "start", "end"), ln.split("|"))) for ln in proc.stdout.splitlines()]
    return [r for r in rows if r.get("name", "").startswith(prefix)]


def most_at_once(rows: list[dict[str, str]]) -> int:
    """The most jobs running at one time ([start, end) in SLURM's whole seconds)."""
    spans = [(datetime.fromisoformat(r["start"]), datetime.fromisoformat(r["end"])) for r in rows]
    return max(sum(1 for s, e in spans if s <= t < e) for t, _ in spans)


def test_two_hundred_tasks_each_run_once_within_the_jobs_limit(hpc_stack, config_root):
    ws = hpc_stack
    exp = write_yaml(config_root / "experiments" / f"{SUITE}.yaml", {"name": SUITE, "sites": ["localhpc"]})
    rx = load_experiment(str(exp), [f"site.localhpc.limits.jobs={LIMIT}"], placeholders=placeholders_for(ws))
    client = client_for(ws)
    t0 = time.monotonic()
    deploy_many(rx, ws, client, N)
    limit_name = jobs_limit("localhpc")
    peak, state = 0, None
    while time.monotonic() - t0 < 600:
        data = tree(client, SUITE)
        suite = data["suites"][0]
        peak = max(peak, suite["limits"][limit_name]["value"])
        state = suite["state"]
        if state in ("complete", "aborted"):
            done_at = datetime.now()
            break
        time.sleep(0.5)
    elapsed = time.monotonic() - t0
    assert state == "complete", f"{SUITE} is {state} after {elapsed:.0f} s"
    assert suite["limits"][limit_name]["limit"] == LIMIT and 0 < peak <= LIMIT, suite["limits"]

    rows = slurm_jobs(ws, f"{SUITE}.localhpc.{FAMILY}.")
    names = sorted(r["name"] for r in rows)
    expected = sorted(p.lstrip("/").replace("/", ".") for p in task_paths(SUITE, "localhpc", N))
    assert names == expected                          # every task, each exactly once
    assert {r["state"] for r in rows} == {"COMPLETED"}
    assert most_at_once(rows) <= LIMIT
    # the relay kept up: the suite was complete soon after SLURM's last job ended
    last_end = max(datetime.fromisoformat(r["end"]) for r in rows)
    lag = (done_at - last_end).total_seconds()
    assert lag < 60, f"the suite completed {lag:.0f} s after the last job ended"
    print(f"{N} tasks in {elapsed:.0f} s ({N / elapsed * 60:.0f} tasks/min), at most {peak} at once, "
          f"suite complete {lag:.1f} s after the last job ended")

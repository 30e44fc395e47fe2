#!/usr/bin/env python3
"""Benchmark: tasks per minute through a maelflow suite on the loopback SLURM site, against a bare
sbatch loop on the same site.

maelflow   N tasks that do almost nothing (maelflow_sandbox.manytasks), in the site family of an
           ordinary suite: ecflow_server submits each through ECF_JOB_CMD (``maelflow job submit``:
           SSH to the site, the submit-once guard, sbatch), within the site's jobs limit; each job
           reports init and complete through the relay (the site's spool, replayed to the server).
           Timed from the deploy to the suite's completion.
bare       the same number of jobs by ``sbatch --wrap 'echo'`` in one shell loop over one SSH
           session, timed until SLURM has ended them all: what SLURM alone sustains here, with no
           workflow, no limit and no reporting.
Both run on the loopback site's two nodes (2 CPUs each on a 2-core machine: 4 jobs at once).
The last line is maelflow's figure and its ratio to the bare loop's. BENCH_SMALL=1 runs 40 tasks
(about a minute in all) instead of 200; BENCH_LIMIT sets the site's jobs limit (default 4).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))


def sacct_rows(site, prefix: str) -> list[dict[str, str]]:
    proc = subprocess.run(site.ssh_argv("sacct --completion -n -P -o JobID,JobName,State,Start,End"),
                          capture_output=True, text=True, timeout=60, check=True)
    rows = [dict(zip(("id", "name", "state", "start", "end"), ln.split("|"))) for ln in proc.stdout.splitlines()]
    return [r for r in rows if r.get("name", "").startswith(prefix)]


def main() -> None:
    from maelflow.config.loader import load_experiment
    from maelflow.ecf import client_for
    from maelflow.placeholders import placeholders_for
    from maelflow.services import stack as stack_mod
    from maelflow.suite.layout import jobs_limit
    from maelflow.suite.server import tree
    from maelflow.workspace import Workspace
    from maelflow_sandbox import hpc
    from maelflow_sandbox.manytasks import FAMILY, deploy_many

    n = 40 if os.environ.get("BENCH_SMALL") else 200
    limit = int(os.environ.get("BENCH_LIMIT", "4"))
    tmp = Path(tempfile.mkdtemp(prefix="maelflow-bench-many-"))
    ws = Workspace(tmp / "ws")
    name = "bench_many"
    try:
        stack_mod.up(ws, extra=["hpc"])
        site = hpc.LoopbackHpc(ws)
        shutil.copytree(REPO / "configs", tmp / "configs")     # the project's sites, beside this experiment
        exp = tmp / "configs" / "experiments" / f"{name}.yaml"
        exp.write_text(f"name: {name}\nsites: [localhpc]\n")
        rx = load_experiment(str(exp), [f"site.localhpc.limits.jobs={limit}"], placeholders=placeholders_for(ws))
        client = client_for(ws)

        # maelflow: deploy, follow until complete
        t0 = time.monotonic()
        deploy_many(rx, ws, client, n)
        peak, state = 0, None
        while time.monotonic() - t0 < 3600:
            suite = tree(client, name)["suites"][0]
            peak = max(peak, suite["limits"][jobs_limit("localhpc")]["value"])
            state = suite["state"]
            if state in ("complete", "aborted"):
                break
            time.sleep(0.5)
        done_at = datetime.now()
        mf_s = time.monotonic() - t0
        if state != "complete":
            raise SystemExit(f"the many-task suite ended {state} after {mf_s:.0f} s")
        rows = sacct_rows(site, f"{name}.localhpc.{FAMILY}.")
        lag = (done_at - max(datetime.fromisoformat(r["end"]) for r in rows)).total_seconds()
        once = len(rows) == len({r["name"] for r in rows}) == n

        # bare: one loop of sbatch over one SSH session, then wait for SLURM to end them all
        t0 = time.monotonic()
        subprocess.run(site.ssh_argv(f"mkdir -p bench-bare && cd bench-bare && for i in $(seq {n}); do "
                                     "sbatch -Q -p debug --job-name=bare.$i -o /dev/null --wrap 'echo bare'; done"),
                       check=True, capture_output=True, timeout=600)
        while time.monotonic() - t0 < 3600:
            left = subprocess.run(site.ssh_argv("squeue -h -t PD,R,CG,CF -o %i"), capture_output=True, text=True,
                                  timeout=60).stdout.split()
            if not left and len(sacct_rows(site, "bare.")) >= n:
                break
            time.sleep(0.3)
        bare_s = time.monotonic() - t0
    finally:
        stack_mod.down(ws)
        hpc.forget(ws)
        shutil.rmtree(tmp, ignore_errors=True)
    mf_rate, bare_rate = n / mf_s * 60, n / bare_s * 60
    print(f"{n} tasks on the loopback SLURM site (2 nodes), load average {os.getloadavg()[0]:.1f}")
    print(f"  maelflow suite (limit {limit}, relay)  {mf_s:7.1f} s  {mf_rate:6.0f} tasks/min  "
          f"(at most {peak} at once; every task once: {once}; complete {lag:.1f} s after the last job ended)")
    print(f"  bare sbatch loop                 {bare_s:7.1f} s  {bare_rate:6.0f} tasks/min")
    print(f"maelflow: {mf_rate:.0f} tasks/min vs bare sbatch loop {bare_rate:.0f} tasks/min: {mf_rate / bare_rate:.2f}x")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Benchmark: the cost of submitting a suite job with maelflow, against a bare ``ssh host sbatch``.

On the loopback HPC site (real sshd + SLURM on 127.0.0.1), N small jobs are submitted three ways,
interleaved (one of each per round, so a neighbour's load falls on all three alike):
  bare ssh      a new ``ssh host sbatch job`` process per job (what a hand-written ECF_JOB_CMD does)
  maelflow CLI  ``maelflow job submit`` per job: what ecFlow runs (new Python process, the suite's
                built config read without the config models, job file sent with #SBATCH directives
                and the guarded sbatch in one command over the user's shared SSH master, job record)
  maelflow lib  ``BatchRunner.submit`` (ssh x slurm) in one process (what a long-lived submitter pays)
Also the CLI with no master open (the first submission after ``PERSIST_S`` idle pays the handshake).
The headline (last line) is the CLI's median against bare ssh's and their ratio; the target is 1.3x.
BENCH_SMALL=1 submits 10 jobs per way instead of 40.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

JOB = "#!/bin/bash\necho hello from $SLURM_JOB_ID\n"


def main() -> None:
    from maelflow.config.loader import load_experiment
    from maelflow.placeholders import placeholders_for
    from maelflow_sandbox import hpc
    from maelflow.sites.runner import runner_for
    from maelflow.workspace import Workspace

    n = 10 if os.environ.get("BENCH_SMALL") else 40
    tmp = Path(tempfile.mkdtemp(prefix="maelflow-bench-"))
    ws = Workspace(tmp / "ws")
    hpc.up(ws)
    try:
        info = hpc.connection_info(ws)
        rx = load_experiment("demo", ["sites=[localhpc]"], placeholders=placeholders_for(ws))
        site = rx.sites["localhpc"]
        cfg = tmp / "experiment.json"
        import json

        cfg.write_text(json.dumps(rx.to_json()))
        jobs_dir = tmp / "suite" / "jobs"
        (jobs_dir).mkdir(parents=True)
        (tmp / "suite" / "tasks").mkdir()
        ssh = ["ssh", *info["ssh_options"], f"{info['user']}@127.0.0.1"]
        remote_dir = f"{site.paths.root}/bench"
        subprocess.run([*ssh, f"mkdir -p {remote_dir} && printf '{JOB}' > {remote_dir}/bare.sh"], check=True)

        def bare() -> float:
            t0 = time.perf_counter()
            subprocess.run([*ssh, f"sbatch -p debug -o {remote_dir}/bare.out {remote_dir}/bare.sh"], check=True,
                           capture_output=True)
            return time.perf_counter() - t0

        mf = str(Path(sys.executable).with_name("maelflow"))

        def cli(i: int) -> float:
            job = jobs_dir / f"cli{i}.job1"
            job.write_text(JOB + f"# {i}\n")
            t0 = time.perf_counter()
            subprocess.run([mf, "job", "submit", "--site", "localhpc", "--config", str(cfg), str(job),
                            str(jobs_dir / f"cli{i}.1")], check=True, capture_output=True)
            return time.perf_counter() - t0

        runner = runner_for(rx, "localhpc")

        def lib(i: int) -> float:
            job = jobs_dir / f"lib{i}.job1"
            job.write_text(JOB + f"# lib {i}\n")
            t0 = time.perf_counter()
            runner.submit(job, jobs_dir / f"lib{i}.1")
            return time.perf_counter() - t0

        bare(); cli(-1); lib(-1)  # warm caches, the first SSH handshake, imports on the site
        ways: dict[str, list[float]] = {"bare ssh sbatch": [], "maelflow job submit (CLI)": [],
                                        "maelflow runner (lib)": []}
        for i in range(n):
            ways["bare ssh sbatch"].append(bare())
            ways["maelflow job submit (CLI)"].append(cli(i))
            ways["maelflow runner (lib)"].append(lib(i))
        cold = []
        for i in range(3):
            runner.connection.close(stop=True)    # the shared master gone: this one opens it again
            time.sleep(0.2)
            cold.append(cli(1000 + i))
        ways["CLI, no master open (cold)"] = cold
        subprocess.run([*ssh, "scancel -u $(id -un)"], check=False)
    finally:
        hpc.down(ws)
        hpc.forget(ws)
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"{n} submissions per way to the loopback SLURM site over SSH (load average {os.getloadavg()[0]:.1f})")
    for name, times in ways.items():
        print(f"  {name:28s} median {statistics.median(times) * 1000:7.1f} ms   "
              f"p90 {sorted(times)[int(0.9 * (len(times) - 1))] * 1000:7.1f} ms")
    b = statistics.median(ways["bare ssh sbatch"])
    c = statistics.median(ways["maelflow job submit (CLI)"])
    l = statistics.median(ways["maelflow runner (lib)"])
    print(f"with a reused session (lib) {l * 1000:.0f} ms ({l / b:.2f}x); cold CLI "
          f"{statistics.median(cold) * 1000:.0f} ms ({statistics.median(cold) / b:.2f}x)")
    print(f"maelflow job submit: {c * 1000:.0f} ms per job vs bare ssh sbatch {b * 1000:.0f} ms: "
          f"{c / b:.2f}x ({(c - b) * 1000:+.0f} ms; target 1.3x)")


if __name__ == "__main__":
    main()

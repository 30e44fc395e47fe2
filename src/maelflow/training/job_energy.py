"""SLURM's energy of finished jobs, asked on their site and added to their MLflow runs.

Why: inside a job SLURM has not recorded ``ConsumedEnergy`` yet (it does once the job ends, and only
where the site gathers energy), so a training can only say "not yet" (tag ``energy.sacct``). Someone
has to ask ``sacct`` afterwards, on the site where the accounting is: the benchmark report task
does, for every run it compares that names its SLURM job, before it reads the runs
(:func:`maelflow.training.energy.record_job_energy` does the reading and the logging).
"""

from __future__ import annotations

import shlex
import subprocess
from typing import Any, Callable, Iterable

from maelflow.training.energy import record_job_energy

JOB_TAG = "maelflow.slurm_job_id"


def connection_runner(conn: Any) -> Callable[..., subprocess.CompletedProcess]:
    """``subprocess.run``'s shape over a site connection (exit 127: no sacct there)."""

    def run(argv: list[str], timeout: float = 60, **_: Any) -> subprocess.CompletedProcess:
        res = conn.run(" ".join(shlex.quote(a) for a in argv), timeout=timeout, check=False)
        return subprocess.CompletedProcess(argv, res.rc, res.stdout, res.stderr)

    return run


def record_site_jobs(tracking_uri: str, runs: Iterable[Any], connect: Callable[[str], Any]) -> list[str]:
    """Record sacct's energy for every run naming a SLURM job that has no measured one yet, one
    connection per site (``connect(site_name)``); what could not be asked, one line each."""
    notes: list[str] = []
    by_site: dict[str, list[Any]] = {}
    for run in runs:
        tags = run.data.tags
        if tags.get(JOB_TAG) and not tags.get("energy.sacct", "").startswith("measured"):
            by_site.setdefault(tags.get("maelflow.site", ""), []).append(run)
    for site, site_runs in by_site.items():
        conn = None
        try:
            conn = connect(site)
            runner = connection_runner(conn)
            for run in site_runs:
                record_job_energy(tracking_uri, run.info.run_id, run.data.tags[JOB_TAG], run=runner,
                                  which=lambda _: "sacct")   # looked up on the site: exit 127 if missing
        except Exception as exc:                  # noqa: BLE001 - energy after the fact never stops a report
            notes.append(f"sacct energy of {len(site_runs)} run(s) on {site or '?'}: {type(exc).__name__}: {exc}")
        finally:
            if conn is not None:
                conn.close()
    return notes

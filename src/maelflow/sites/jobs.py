"""The ECF_JOB_CMD / ECF_KILL_CMD / ECF_STATUS_CMD entry points, whatever the site.

ecFlow calls ``maelflow job submit|kill|status`` with the job file; this module builds the site's
``BatchRunner`` (connection x scheduler, or local processes for ``--runner login|local``) and keeps
a small record beside the job file (``<job>.sub``) so kill and status find the job again even after
the server restarted.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from maelflow.sites.runner import JobHandle, runner_for
from maelflow.workspace import write_atomic

if TYPE_CHECKING:     # the job entry points run without the config models (sites/suiteconfig.py)
    from maelflow.config.loader import ResolvedExperiment


def record_path(job: Path) -> Path:
    return job.with_name(job.name + ".sub")


def load_record(job: Path) -> JobHandle | None:
    try:
        return JobHandle(**json.loads(record_path(job).read_text()))
    except (FileNotFoundError, ValueError, TypeError):
        return None


def _runner(rx: ResolvedExperiment, site: str, dry_run: bool, runner: str):
    return runner_for(rx, site, where=runner, dry_run=dry_run)


def submit(rx: ResolvedExperiment, site: str, job: Path, jobout: Path, dry_run: bool = False,
           runner: str = "site") -> JobHandle:
    runner = _runner(rx, site, dry_run, runner)
    handle = runner.submit(job, jobout)
    if not dry_run:
        write_atomic(record_path(job), json.dumps(handle.__dict__) + "\n")
    return handle


def kill(rx: ResolvedExperiment, site: str, job: Path, rid: str | None, child_env: dict[str, str] | None = None,
         dry_run: bool = False, runner: str = "site") -> str:
    handle = load_record(job) or JobHandle(site=site, job_id=rid or "", kind="unknown")
    return _runner(rx, site, dry_run, runner).kill(handle, rid, child_env or {})


def status(rx: ResolvedExperiment, site: str, job: Path, rid: str | None, dry_run: bool = False,
           runner: str = "site") -> tuple[bool, str]:
    handle = load_record(job) or JobHandle(site=site, job_id=rid or "", kind="unknown")
    return _runner(rx, site, dry_run, runner).status(handle, rid)

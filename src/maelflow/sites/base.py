"""What every site runner answers, whatever the connection and scheduler: ecFlow's three questions
(submit this job, kill it, is it still there?), with a handle that finds the job again."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol


@dataclass
class JobHandle:
    site: str
    job_id: str
    kind: str  # "process" or "slurm"
    remote_job: str | None = None   # the job file on the site (remote sites only)
    remote_out: str | None = None   # its output file on the site, tailed into ECF_JOBOUT


class Runner(Protocol):
    def submit(self, job: Path, jobout: Path) -> JobHandle: ...
    def kill(self, handle: JobHandle, rid: str | None, child_env: dict[str, str]) -> str: ...
    def status(self, handle: JobHandle, rid: str | None) -> tuple[bool, str]: ...

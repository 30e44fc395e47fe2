"""Suite tasks as SLURM jobs on a site reached over SSH (connection ssh x scheduler slurm).

ecFlow writes the job file on the server's host; the site cannot read that disk. So the job is
copied under ``<site.paths.root>/jobs/`` keeping its path relative to ECF_HOME, with ``#SBATCH``
lines added after the shebang, and submitted there. Its output stays on the site's filesystem;
``fetch_output`` appends what is new to the local ECF_JOBOUT so ecFlow UI can show it.

A submission must never happen twice, even when the connection drops after ``sbatch`` was sent
and before its answer came back: the remote command is guarded by an atomic ``mkdir`` marker per
submission and the job carries ``--comment=maelflow:<token>``, so a retry finds the first job
instead of queueing a second one.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path, PurePosixPath

from maelflow.config.models import Site
from maelflow.sites.base import JobHandle
from maelflow.sites.slurm import ALIVE, PENDING, Slurm, TaskResources, directives, parse_state
from maelflow.sites.ssh import ConnectionLost, SshSession, session_for, shell_path

SUBMIT_WAIT_S = 60          # how long a retried submission waits for the first sbatch to answer
UNANSWERED = 75             # exit code of the guarded submit when that wait ran out
_TRY_SUFFIX_RE = re.compile(r"\.job\d+$")


class SubmitError(RuntimeError):
    """sbatch refused the job (bad partition, account, time limit...): its message says why."""


def local_ecf_home(job: Path) -> Path:
    """ECF_HOME of a job file: the suite builder's ``<out>/jobs`` (beside ``<out>/tasks``), else the
    nearest folder named ``jobs``, else the job's own folder."""
    job = Path(job).absolute()
    named = [p for p in job.parents if p.name == "jobs"]
    for p in named:
        if (p.parent / "tasks").is_dir():
            return p
    return named[0] if named else job.parent


def submission_token(relative: str, text: str) -> str:
    """Same job file, same token (so a retry recognises its job); ecFlow writes a new ECF_PASS into
    every submission, so a rerun or a requeued try 1 gets a new token even under the same name."""
    h = hashlib.sha1(relative.encode())
    h.update(b"\0")
    h.update(text.encode())
    return h.hexdigest()[:16]


def with_directives(text: str, lines: list[str]) -> str:
    """The job with ``lines`` right after its shebang (sbatch reads directives only before the first
    command; a script without a shebang gets bash's, which sbatch requires)."""
    head, sep, rest = text.partition("\n")
    if head.startswith("#!"):
        return head + "\n" + "\n".join(lines) + "\n" + rest
    return "#!/bin/bash\n" + "\n".join(lines) + "\n" + text


class SshSlurmRunner:
    """submit / kill / status for ecFlow, plus ``fetch_output`` for the relay."""

    def __init__(self, site_name: str, site: Site, dry_run: bool = False, *, session: SshSession | None = None,
                 ecf_home: Path | None = None, scheduler: Slurm | None = None):
        if site.connection.ssh is None or site.slurm is None:
            raise ValueError(f"site {site_name!r} needs an ssh connection and a slurm section")
        self.site_name = site_name
        self.site = site
        self.dry_run = dry_run
        self.session = session or session_for(site_name, site.connection.ssh, dry_run=dry_run)
        self.ecf_home = Path(ecf_home) if ecf_home else None
        self.slurm = scheduler or Slurm()

    @property
    def remote_jobs(self) -> str:
        return f"{self.site.paths.root.rstrip('/')}/jobs"

    # -- submit ---------------------------------------------------------------------------------
    def submit(self, job: Path, jobout: Path) -> JobHandle:
        job, jobout = Path(job), Path(jobout)
        text = job.read_text()
        relative = job.absolute().relative_to(self.ecf_home.absolute() if self.ecf_home
                                              else local_ecf_home(job)).as_posix()
        remote_job = f"{self.remote_jobs}/{relative}"
        remote_dir = str(PurePosixPath(remote_job).parent)
        remote_out = f"{remote_dir}/{jobout.name}"
        token = submission_token(relative, text)
        job_name = _TRY_SUFFIX_RE.sub("", relative).replace("/", ".")
        lines = directives(self.site, TaskResources.from_script(text), job_name=job_name,
                           output=remote_out, token=token)
        if self.dry_run:
            print("\n".join(lines), flush=True)
        self.session.put_text(remote_job, with_directives(text, lines), mode=0o755)
        cmd = self._guarded_sbatch(remote_dir, PurePosixPath(remote_job).name, token)
        if self.dry_run:
            self.session.run(self.slurm.submit_command(remote_job), retry=False)
            return JobHandle(self.site_name, "0", "slurm", remote_job=remote_job, remote_out=remote_out)
        try:
            result = self.session.run(cmd, retry=False, check=False, timeout=SUBMIT_WAIT_S + 60)
        except ConnectionLost as exc:
            if not exc.sent:
                raise
            job_id = self.find(token)
            if job_id:
                return JobHandle(self.site_name, job_id, "slurm", remote_job=remote_job, remote_out=remote_out)
            # not queued (yet): the same guarded command either reports the first sbatch's answer
            # (waiting for it if it is still running) or, if that never reached the site, submits now
            result = self.session.run(cmd, retry=True, check=False, timeout=SUBMIT_WAIT_S + 60)
        answer = (result.stdout + result.stderr).strip()
        job_id = self.slurm.parse_job_id(answer)
        if result.rc == UNANSWERED:
            raise SubmitError(f"sbatch {remote_job} on {self.site_name} gave no answer within {SUBMIT_WAIT_S} s; "
                              f"the job may exist: look for comment maelflow:{token} in squeue before retrying")
        if result.rc != 0 or not job_id:
            # nothing was queued: drop the marker so that submitting this file again really submits
            self.session.run(f"rm -rf {shell_path(self._marker(remote_dir, remote_job, token))}", check=False)
            raise SubmitError(f"sbatch {remote_job} on {self.site_name} failed (rc {result.rc}): {answer}")
        return JobHandle(self.site_name, job_id, "slurm", remote_job=remote_job, remote_out=remote_out)

    @staticmethod
    def _marker(remote_dir: str, remote_job: str, token: str) -> str:
        return f"{remote_dir}/.{PurePosixPath(remote_job).name}.{token}.sbatch"

    def _guarded_sbatch(self, remote_dir: str, name: str, token: str) -> str:
        """sbatch at most once per token: ``mkdir`` of the marker is atomic, and a repeat of this
        command waits for the first one's answer (kept in the marker) instead of submitting."""
        mark = shell_path(f".{name}.{token}.sbatch")
        submit = self.slurm.submit_command(name)
        return (f"cd {shell_path(remote_dir)} || exit 1; "
                f"if mkdir {mark} 2>/dev/null; then {submit} >{mark}/out 2>&1; echo $? >{mark}/rc; fi; "
                f"i=0; while [ ! -s {mark}/rc ] && [ $i -lt {SUBMIT_WAIT_S * 10} ]; do sleep 0.1; i=$((i+1)); done; "
                f"cat {mark}/out 2>/dev/null; exit $(cat {mark}/rc 2>/dev/null || echo {UNANSWERED})")

    def find(self, token: str) -> str | None:
        """The job already submitted with this token, if SLURM still knows it."""
        result = self.session.run(self.slurm.find_command(), check=False, retry=True)
        ids = self.slurm.jobs_with_token(result.stdout, token)
        return ids[0] if ids else None

    # -- kill / status --------------------------------------------------------------------------
    @staticmethod
    def _job_id(handle: JobHandle, rid: str | None) -> str | None:
        for candidate in (handle.job_id, rid):
            if candidate and re.fullmatch(r"\d+", str(candidate)) and int(candidate) > 0:
                return str(candidate)
        return None

    def kill(self, handle: JobHandle, rid: str | None, child_env: dict[str, str]) -> str:
        job_id = self._job_id(handle, rid)
        if job_id is None:
            return "no SLURM job recorded for this job"
        result = self.session.run(self.slurm.kill_command(job_id), check=False, retry=True)
        if self.dry_run:
            return "dry run"
        before = parse_state(result.stdout)
        text = f"scancel {job_id} on {self.site_name} (job was {before})"
        if result.rc != 0 or result.stderr.strip():
            text += f": {result.stderr.strip()}"
        if before == PENDING:
            # troika's abort_on_ecflow: a job that never started cannot report its own end
            from maelflow.reporting import child_abort

            if child_env.get("ECF_NAME"):
                child_abort(child_env, "cancelled before it started (scancel)")
                text += f"; {child_env['ECF_NAME']} aborted on its behalf"
            else:
                text += "; it never started, and no ECF_NAME was given to abort the task on its behalf"
        return text

    def status(self, handle: JobHandle, rid: str | None) -> tuple[bool, str]:
        job_id = self._job_id(handle, rid)
        if job_id is None:
            return False, "no SLURM job recorded for this job"
        result = self.session.run(self.slurm.status_command(job_id), check=False, retry=True)
        if self.dry_run:
            return True, "dry run"
        text = result.stdout.strip() or f"{job_id} UNKNOWN (neither squeue nor sacct knows it)"
        return parse_state(text) in ALIVE, text

    # -- output ---------------------------------------------------------------------------------
    def fetch_output(self, handle: JobHandle, local_jobout: Path) -> int:
        """Append the remote output's new bytes to the local ECF_JOBOUT; return how many."""
        if not handle.remote_out:
            return 0
        local_jobout = Path(local_jobout)
        offset = local_jobout.stat().st_size if local_jobout.exists() else 0
        try:
            data = self.session.read_bytes(handle.remote_out, offset=offset)
        except FileNotFoundError:
            return 0            # the job has not started yet
        if not data:
            return 0
        local_jobout.parent.mkdir(parents=True, exist_ok=True)
        with open(local_jobout, "ab") as fh:
            fh.write(data)
        return len(data)

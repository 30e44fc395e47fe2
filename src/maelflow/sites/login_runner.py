"""Tasks as plain processes on a site's login node, over SSH (connection ssh x scheduler direct).

Some work belongs on the login node, not on a compute node: staging a dataset from the object store
needs the internet, which login nodes have and compute nodes lack. The job file is copied exactly as
for SLURM, then started with ``setsid nohup`` so it outlives the SSH session; its process group id
is the job id, which kill and status use.
"""

from __future__ import annotations

import time
from pathlib import Path, PurePosixPath

from maelflow.sites.base import JobHandle
from maelflow.sites.slurm_runner import SshSlurmRunner, SubmitError, local_ecf_home, submission_token
from maelflow.sites.ssh import ConnectionLost, shell_path


class SshLoginRunner(SshSlurmRunner):
    def __init__(self, site_name, site, dry_run=False, **kwargs):
        super().__init__(site_name, site, dry_run, **kwargs)

    def submit(self, job: Path, jobout: Path) -> JobHandle:
        job, jobout = Path(job), Path(jobout)
        text = job.read_text()
        relative = job.absolute().relative_to(self.ecf_home or local_ecf_home(job)).as_posix()
        remote_job = f"{self.remote_jobs}/{relative}"
        remote_dir = str(PurePosixPath(remote_job).parent)
        remote_out = f"{remote_dir}/{jobout.name}"
        mark = shell_path(f".{PurePosixPath(remote_job).name}.{submission_token(relative, text)}.start")
        self.session.put_text(remote_job, text, mode=0o755)
        # started at most once per token: mkdir is atomic; a repeat prints the first start's pid
        cmd = (f"cd {shell_path(remote_dir)} || exit 1; if mkdir {mark} 2>/dev/null; then "
               f"setsid nohup bash {shell_path(PurePosixPath(remote_job).name)} > {shell_path(remote_out)} 2>&1 "
               f"< /dev/null & echo $! > {mark}/pid; fi; sleep 0.1; cat {mark}/pid")
        try:
            res = self.session.run(cmd, retry=False, check=False, timeout=60)
        except ConnectionLost as exc:
            if not exc.sent:
                raise
            res = self.session.run(cmd, retry=True, check=False, timeout=60)
        pid = res.stdout.strip()
        if self.dry_run:
            return JobHandle(self.site_name, "0", "process", remote_job=remote_job, remote_out=remote_out)
        if res.rc != 0 or not pid.isdigit():
            raise SubmitError(f"starting {remote_job} on the login node of {self.site_name} failed: "
                              f"{(res.stdout + res.stderr).strip()}")
        return JobHandle(self.site_name, pid, "process", remote_job=remote_job, remote_out=remote_out)

    def kill(self, handle: JobHandle, rid: str | None, child_env: dict[str, str]) -> str:
        pid = self._job_id(handle, rid)
        if pid is None:
            return "no process recorded for this job"
        self.session.run(f"kill -TERM -- -{pid} 2>/dev/null || true", check=False)
        if self.dry_run:
            return "dry run"
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            alive, _ = self.status(handle, rid)
            if not alive:
                return f"process group {pid} on {self.site_name} stopped with SIGTERM"
            time.sleep(0.5)
        self.session.run(f"kill -KILL -- -{pid} 2>/dev/null || true", check=False)
        from maelflow.reporting import child_abort

        child_abort(child_env, "killed with SIGKILL after SIGTERM was ignored for 10 s")
        return f"process group {pid} on {self.site_name} killed with SIGKILL"

    def status(self, handle: JobHandle, rid: str | None) -> tuple[bool, str]:
        pid = self._job_id(handle, rid)
        if pid is None:
            return False, "no process recorded for this job"
        res = self.session.run(f"ps -o pid=,stat=,etime=,args= -g {pid} || true", check=False)
        lines = [ln for ln in res.stdout.splitlines() if ln.strip() and " Z" not in ln]
        text = "\n".join(lines) or f"process group {pid} on {self.site_name}: no process"
        return bool(lines), text


__all__ = ["SshLoginRunner", "SubmitError"]

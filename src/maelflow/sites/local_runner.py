"""Jobs as detached process groups on this machine (the local site, and server-side tasks)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from maelflow.sites.base import JobHandle


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return True


class LocalProcessRunner:
    """Jobs as detached process groups on this machine: the job's bash is the group leader."""

    def __init__(self, site: str, dry_run: bool = False):
        self.site = site
        self.dry_run = dry_run

    def submit(self, job: Path, jobout: Path) -> JobHandle:
        if self.dry_run:
            print(f"bash {job} > {jobout} 2>&1 &   # new session, on this machine")
            return JobHandle(self.site, "0", "process")
        jobout.parent.mkdir(parents=True, exist_ok=True)
        # ecflow_server runs with the loopback bind shim preloaded and its children inherit it: a job
        # must not (it would move, say, torch.distributed's store to ::1, where its clients never look)
        env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
        with open(jobout, "ab") as out:
            proc = subprocess.Popen(["bash", str(job)], stdin=subprocess.DEVNULL, stdout=out, env=env,
                                    stderr=subprocess.STDOUT, start_new_session=True, cwd=job.parent)
        return JobHandle(self.site, str(proc.pid), "process")

    def _pgid(self, handle: JobHandle, rid: str | None) -> int | None:
        for candidate in (handle.job_id, rid):
            if candidate and candidate.isdigit() and int(candidate) > 1:
                return int(candidate)
        return None

    def kill(self, handle: JobHandle, rid: str | None, child_env: dict[str, str]) -> str:
        pgid = self._pgid(handle, rid)
        if pgid is None:
            return "no process recorded for this job"
        if self.dry_run:
            print(f"kill -TERM -{pgid}")
            return "dry run"
        if not _group_alive(pgid):
            # the job died without telling the server (SIGKILL, OOM, reboot): say so for it
            from maelflow.reporting import child_abort

            child_abort(child_env, "the job's processes had ended without reporting (killed or crashed); "
                                   "see the job output")
            return f"process group {pgid} had already ended: task aborted on its behalf"
        try:
            os.killpg(pgid, signal.SIGTERM)
        except ProcessLookupError:
            return f"process group {pgid} had already ended"
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _group_alive(pgid):
            time.sleep(0.1)
        if _group_alive(pgid):
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            from maelflow.reporting import child_abort
            child_abort(child_env, "killed with SIGKILL after SIGTERM was ignored for 10 s")
            return f"process group {pgid} killed with SIGKILL"
        return f"process group {pgid} stopped with SIGTERM"

    def status(self, handle: JobHandle, rid: str | None) -> tuple[bool, str]:
        pgid = self._pgid(handle, rid)
        if pgid is None:
            return False, "no process recorded for this job"
        if self.dry_run:
            print(f"ps -o pid,stat,etime,args -g {pgid}")
            return True, "dry run"
        out = subprocess.run(["ps", "-o", "pid,stat,etime,args", "-g", str(pgid)], capture_output=True, text=True)
        alive = _group_alive(pgid)
        text = out.stdout.strip() or f"process group {pgid}: no process"
        return alive, text


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # only zombies left?
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                fields = fh.read().split(") ", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False

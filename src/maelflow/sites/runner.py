"""One batch runner for every site: a connection (how we reach it) × a scheduler (how jobs start).

ecFlow asks three questions of every job (submit it, kill it, is it still there?); ``BatchRunner``
answers them for any pair, cylc's and troika's shape: the scheduler gives the commands and reads
their answers, the connection runs them (and prints them instead, in a dry run), and this module
keeps what is the same everywhere:

* the job file on the site: ecFlow writes it on the server's host, which a remote site cannot
  read, so it is copied under ``<site.paths.root>/jobs/`` keeping its path relative to ECF_HOME,
  with the scheduler's directives after the shebang; its output stays there and ``fetch_output``
  appends what is new to the local ECF_JOBOUT. On this machine (the local connection) the job
  runs where ecFlow wrote it and writes straight into ECF_JOBOUT.
* the submit-once guard: a submission must never happen twice, even when the connection drops
  after the submit command was sent and before its answer came back. The remote command is
  guarded by an atomic ``mkdir`` marker per submission (a repeat waits for the first one's answer
  instead of submitting), and the job carries the submission token in its comment or name, so a
  retry finds the first job where the scheduler can list jobs.
* kill: a job that never started (or, reporting directly, had already died) cannot report its own
  end, so the task is aborted on its behalf (troika's ``abort_on_ecflow``).
"""

from __future__ import annotations

import hashlib
import re
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from maelflow.errors import ConnectionLost, SubmitError
from maelflow.sites.connections import Connection, connect, connection_class
from maelflow.sites.connections.shell import shell_path
from maelflow.sites.schedulers import ALIVE, COMPLETED, PENDING, Scheduler, TaskResources, scheduler_for, \
    scheduler_named

if TYPE_CHECKING:     # the job entry points run without the config models (sites/suiteconfig.py)
    from maelflow.config.loader import ResolvedExperiment

SUBMIT_WAIT_S = 60          # how long a retried submission waits for the first submit to answer
UNANSWERED = 75             # exit code of the guarded submit when that wait ran out
SITE_WAIT_S = 600           # how long a submission waits for a site that cannot be reached at all
SITE_RETRY_S = (5.0, 60.0)  # first and longest pause between those tries (login nodes lock accounts out)
_TRY_SUFFIX_RE = re.compile(r"\.job\d+$")


@dataclass
class JobHandle:
    """What finds a job again (kept beside the job file as ``<job>.sub`` by ``sites/jobs.py``)."""

    site: str
    job_id: str
    kind: str                       # the scheduler's name
    remote_job: str | None = None   # the job file as the site sees it
    remote_out: str | None = None   # its output on the site, tailed into ECF_JOBOUT (remote sites only)


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
    """The job with ``lines`` right after its shebang (batch systems read directives only before the
    first command; a script without a shebang gets bash's, which sbatch requires)."""
    if not lines:
        return text
    head, _, rest = text.partition("\n")
    if head.startswith("#!"):
        return head + "\n" + "\n".join(lines) + "\n" + rest
    return "#!/bin/bash\n" + "\n".join(lines) + "\n" + text


class BatchRunner:
    """submit / kill / status for ecFlow on one site, plus ``fetch_output`` for the relay.

    ``site`` (a ``maelflow.config.models.Site``) gives the directives' settings and the job folder;
    None for jobs beside the server. ``relay``: the job reports through the site's spool, replayed
    later, so a job found already gone at kill time may have reported an end not yet replayed, and
    is not aborted on its behalf. ``shares_files``: the site sees this machine's files (by default,
    when the connection is the local one).
    """

    def __init__(self, connection: Connection, scheduler: Scheduler, *, site_name: str, site=None,
                 relay: bool = False, shares_files: bool | None = None):
        self.connection = connection
        self.scheduler = scheduler
        self.site_name = site_name
        self.site = site
        self.relay = relay
        # the local connection shares this machine's files: jobs run where ecFlow wrote them
        self.shares_files = (isinstance(connection, connection_class("local")) if shares_files is None
                             else shares_files)

    @property
    def dry_run(self) -> bool:
        return bool(self.connection.dry_run)

    @property
    def remote_jobs(self) -> str:
        if self.site is None:
            raise ValueError(f"{self.site_name}: jobs beside the server have no site folder")
        return f"{self.site.paths.root.rstrip('/')}/jobs"

    # -- submit ---------------------------------------------------------------------------------
    def submit(self, job: Path, jobout: Path) -> JobHandle:
        job, jobout = Path(job).absolute(), Path(jobout).absolute()
        text = job.read_text()
        relative = job.relative_to(local_ecf_home(job)).as_posix()
        token = submission_token(relative, text)
        if self.shares_files:
            out, remote_out = str(jobout), None
            remote_job = str(job)
        else:
            remote_job = f"{self.remote_jobs}/{relative}"
            out = remote_out = f"{PurePosixPath(remote_job).parent}/{jobout.name}"
        lines = self.scheduler.directives(self.site, TaskResources.from_script(text),
                                          job_name=_TRY_SUFFIX_RE.sub("", relative).replace("/", "."),
                                          output=out, token=token) if self.site is not None else []
        if self.shares_files and lines:
            remote_job = f"{job}.{self.scheduler.name}"   # ecFlow's own file stays as it wrote it
        if self.dry_run and lines:
            print("\n".join(lines), flush=True)
        job_text = with_directives(text, lines)
        # a remote site gets the job file on the stdin of the submitting command: one round trip
        copy_inline = remote_job != str(job) and not self.shares_files and not self.dry_run
        if remote_job != str(job) and not copy_inline:
            self.connection.put_text(remote_job, job_text, mode=0o755)
        remote_dir, name = str(PurePosixPath(remote_job).parent), PurePosixPath(remote_job).name
        if self.shares_files:
            self.connection.makedirs(str(jobout.parent))
        submit = self.scheduler.submit_command(name, out, token)
        handle = JobHandle(self.site_name, "0", self.scheduler.name, remote_job=remote_job, remote_out=remote_out)
        if self.dry_run:
            self.connection.run(f"cd {shell_path(remote_dir)} && {submit}", retry=False)
            return handle
        cmd = self.guarded_submit(remote_dir, name, token, submit, copy_job=copy_inline)
        stdin = job_text.encode() if copy_inline else None
        try:
            result = self._when_reachable(lambda: self.connection.run(cmd, input=stdin, retry=False, check=False,
                                                                      timeout=SUBMIT_WAIT_S + 60))
        except ConnectionLost as exc:
            if not exc.sent:
                raise
            job_id = self.find(token)
            if job_id:
                handle.job_id = job_id
                return handle
            # not known (yet): the same guarded command either reports the first submission's answer
            # (waiting for it if it is still running) or, if that never reached the site, submits now
            result = self.connection.run(cmd, input=stdin, retry=True, check=False, timeout=SUBMIT_WAIT_S + 60)
        answer = (result.stdout + result.stderr).strip()
        job_id = self.scheduler.parse_job_id(answer)
        what = f"{self.scheduler.name} submission of {remote_job} on {self.site_name}"
        if result.rc == UNANSWERED:
            raise SubmitError(f"{what} gave no answer within {SUBMIT_WAIT_S} s; the job may exist",
                              hint=f"look for maelflow:{token} in the {self.scheduler.name} queue before retrying")
        if result.rc != 0 or not self.scheduler.valid_job_id(job_id):
            # nothing was queued: drop the marker so that submitting this file again really submits
            self.connection.run(f"rm -rf {shell_path(self.marker(remote_dir, name, token))}", check=False)
            raise SubmitError(f"{what} failed (rc {result.rc}): {answer}")
        handle.job_id = job_id
        return handle

    def _when_reachable(self, op):
        """``op()``, tried again while the site cannot be reached at all (nothing was sent, so
        nothing can run twice), with exponential back-off, for up to ``SITE_WAIT_S``: a login node
        down for a minute delays the submission (the task stays 'submitted') instead of aborting it.
        A connection lost after the command was sent is the caller's to sort out (the guard)."""
        import sys

        first, cap = SITE_RETRY_S
        delay, deadline = first, time.monotonic() + SITE_WAIT_S
        while True:
            try:
                return op()
            except ConnectionLost as exc:
                if exc.sent or time.monotonic() + delay > deadline:
                    raise
                print(f"maelflow: {self.site_name} cannot be reached ({str(exc).strip()[:200]}); "
                      f"trying again in {delay:.0f} s", file=sys.stderr, flush=True)
                time.sleep(delay)
                delay = min(cap, delay * 2)

    @staticmethod
    def marker(remote_dir: str, name: str, token: str) -> str:
        return f"{remote_dir}/.{name}.{token}.submit"

    def guarded_submit(self, remote_dir: str, name: str, token: str, submit: str, copy_job: bool = False) -> str:
        """The scheduler's submit command at most once per token: ``mkdir`` of the marker is atomic,
        and a repeat of this command waits for the first one's answer (kept in the marker) instead
        of submitting. A job never inherits a preload of the shell that submits it (ecflow_server may
        run under the loopback site's bind shim). ``copy_job``: the job file comes on stdin and is
        put in place first (beside it, then renamed: a repeat writes the same bytes, as the token
        is their hash), so a submission is one round trip to the site."""
        mark = shell_path(f".{name}.{token}.submit")
        copy = ""
        if copy_job:
            tmp, job = shell_path(f".{name}.{token}.tmp"), shell_path(name)
            copy = f"cat >{tmp} && chmod 755 {tmp} && mv -f {tmp} {job} || exit 1; "
        return (f"mkdir -p {shell_path(remote_dir)} && cd {shell_path(remote_dir)} || exit 1; {copy}unset LD_PRELOAD; "
                f"if mkdir {mark} 2>/dev/null; then ( {submit} ) >{mark}/out 2>&1; echo $? >{mark}/rc; fi; "
                f"i=0; while [ ! -s {mark}/rc ] && [ $i -lt {SUBMIT_WAIT_S * 10} ]; do sleep 0.1; i=$((i+1)); done; "
                f"cat {mark}/out 2>/dev/null; exit $(cat {mark}/rc 2>/dev/null || echo {UNANSWERED})")

    def find(self, token: str) -> str | None:
        """The job already submitted with this token, if the scheduler can list jobs and still knows it."""
        command = self.scheduler.find_command()
        if not command:
            return None
        result = self.connection.run(command, check=False, retry=True)
        ids = self.scheduler.jobs_with_token(result.stdout, token)
        return ids[0] if ids else None

    # -- kill / status --------------------------------------------------------------------------
    def _job_id(self, handle: JobHandle, rid: str | None) -> str | None:
        for candidate in (handle.job_id, rid):
            if self.scheduler.valid_job_id(candidate):
                return str(candidate)
        return None

    def _poll(self, job_id: str) -> tuple[str, str]:
        result = self.connection.run(self.scheduler.poll_command(job_id), check=False, retry=True)
        text = result.stdout.strip() or f"{job_id} UNKNOWN ({self.scheduler.name} does not know it)"
        return self.scheduler.parse_state(text), text

    def kill(self, handle: JobHandle, rid: str | None, child_env: dict[str, str]) -> str:
        job_id = self._job_id(handle, rid)
        if job_id is None:
            return f"no {self.scheduler.name} job recorded for this job"
        before, _ = self._poll(job_id)
        result = self.connection.run(self.scheduler.kill_command(job_id), check=False, retry=True)
        if self.dry_run:
            return "dry run"
        text = f"{self.scheduler.name} job {job_id} on {self.site_name} killed (it was {before})"
        if result.rc != 0 or result.stderr.strip():
            text += f": {result.stderr.strip()}"
        if before == PENDING:
            return text + self._abort_for(child_env, "cancelled before it started", "it never started")
        if before not in ALIVE:
            if self.relay or before == COMPLETED:
                return text
            # the job died without telling the server (SIGKILL, OOM, reboot): say so for it
            return text + self._abort_for(child_env, "the job had ended without reporting (killed or crashed); "
                                                     "see the job output", "it had already ended")
        hard = self.scheduler.hard_kill_command(job_id)
        if hard is None:
            return text
        deadline = time.monotonic() + self.scheduler.KILL_GRACE_S
        while time.monotonic() < deadline:
            if self._poll(job_id)[0] not in ALIVE:
                return text
            time.sleep(0.2)
        self.connection.run(hard, check=False, retry=True)
        grace = f"{self.scheduler.KILL_GRACE_S:g} s"
        return text + self._abort_for(child_env, f"killed hard after the kill was ignored for {grace}",
                                      f"it ignored the kill for {grace} and was killed hard")

    @staticmethod
    def _abort_for(child_env: dict[str, str], reason: str, said: str) -> str:
        """troika's abort_on_ecflow: a job that cannot report its own end is aborted on its behalf."""
        if not child_env.get("ECF_NAME"):
            return f"; {said}, and no ECF_NAME was given to abort the task on its behalf"
        from maelflow.reporting import child_abort

        child_abort(child_env, reason)
        return f"; {said}: {child_env['ECF_NAME']} aborted on its behalf"

    def status(self, handle: JobHandle, rid: str | None) -> tuple[bool, str]:
        job_id = self._job_id(handle, rid)
        if job_id is None:
            return False, f"no {self.scheduler.name} job recorded for this job"
        state, text = self._poll(job_id)
        if self.dry_run:
            return True, "dry run"
        return state in ALIVE, text

    # -- output ---------------------------------------------------------------------------------
    def fetch_output(self, handle: JobHandle, local_jobout: Path) -> int:
        """Append the remote output's new bytes to the local ECF_JOBOUT; return how many."""
        if not handle.remote_out:
            return 0
        local_jobout = Path(local_jobout)
        offset = local_jobout.stat().st_size if local_jobout.exists() else 0
        try:
            data = self.connection.read_bytes(handle.remote_out, offset=offset)
        except FileNotFoundError:
            return 0            # the job has not started yet
        if not data:
            return 0
        local_jobout.parent.mkdir(parents=True, exist_ok=True)
        with open(local_jobout, "ab") as fh:
            fh.write(data)
        return len(data)


def runner_for(rx: ResolvedExperiment, site_name: str, *, where: str = "site", dry_run: bool = False) -> BatchRunner:
    """The runner for a job of ``site_name``: on its scheduler ("site"), as a process on its login
    node ("login"), or as a process beside the ecFlow server ("local")."""
    if where == "local":      # tasks outside any site family name no site of the experiment
        return BatchRunner(connection_class("local").for_site(site_name, None, dry_run=dry_run),
                           scheduler_named("local"), site_name=site_name)
    site = rx.sites.get(site_name)
    if site is None:
        raise KeyError(f"site {site_name!r} is not part of experiment {rx.name!r} ({', '.join(rx.sites)})")
    scheduler = scheduler_named("local") if where == "login" else scheduler_for(site_name, site)
    return BatchRunner(connect(site_name, site, dry_run=dry_run), scheduler, site_name=site_name, site=site,
                       relay=site.reporting == "relay")

"""How jobs start on a site: a ``Scheduler`` is the vocabulary of one batch system, as data.

A site is a connection × a scheduler. The connection (``sites/connections``) runs commands and
moves files; the scheduler only says *which* commands and how to read their answers, like cylc's
job runner handlers (``job_runner_handlers/pbs.py`` is a few class attributes). One
``BatchRunner`` (``sites/runner.py``) composes the two and owns what is the same everywhere: the
job file copy, the submit-once guard, retries, dry-run, output tailing.

Schedulers are found by name (the site's ``scheduler``) in the ``maelflow.schedulers`` entry-point
group, so a package adds one without touching maelflow (docs/extending.md, with a PBS example).
Two ship: ``slurm`` and ``local`` (plain background processes).

The job side asks the scheduler too: the suite builder renders ``job_variables`` into each site
family (the header reads the job id and traps the warning signal through them), and code running
inside a job finds its scheduler with ``current()`` (MAELFLOW_SCHEDULER, exported by the header).
"""

from __future__ import annotations

import os
import re
import shlex
from dataclasses import dataclass, fields
from typing import ClassVar, Mapping, Protocol, runtime_checkable

from maelflow import plugins

GROUP = plugins.SCHEDULERS

# The few states a suite task cares about, whatever the scheduler calls them.
PENDING, RUNNING, COMPLETED, FAILED, CANCELLED, TIMEOUT, UNKNOWN = (
    "PENDING", "RUNNING", "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "UNKNOWN")
STATES = (PENDING, RUNNING, COMPLETED, FAILED, CANCELLED, TIMEOUT, UNKNOWN)
ALIVE = frozenset({PENDING, RUNNING})

# The submission token's mark in a job's comment or name (the submit-once guard looks for it).
TOKEN_PREFIX = "maelflow:"


@dataclass(frozen=True)
class TaskResources:
    """What one suite task asks of the site; the scheduler and the site decide how it is spelled."""

    nodes: int = 1
    tasks_per_node: int = 1
    gpus_per_node: int = 0
    cpus_per_task: int | None = None
    time: str = "00:30:00"

    @classmethod
    def from_script(cls, text: str) -> "TaskResources":
        """Read ``# maelflow name=value`` lines of a job (as troika reads ``# troika name=value``), so
        a task template asks for GPUs without knowing the site's directive dialect."""
        known = {f.name for f in fields(cls)}
        values: dict[str, object] = {}
        for m in re.finditer(r"^#\s*maelflow\s+(\w+)=(\S+)\s*$", text, re.M):
            key, value = m.group(1), m.group(2)
            if key in known:
                values[key] = value if key == "time" else int(value)
        return cls(**values)  # type: ignore[arg-type]


@dataclass(frozen=True)
class JobEnvironment:
    """Names of the environment variables a job of this scheduler reads about itself (None: the
    scheduler sets no such variable)."""

    job_id: str | None = None       # the scheduler's id of the running job
    node_list: str | None = None    # the nodes the job holds
    ntasks: str | None = None       # tasks (processes) in the job
    procid: str | None = None       # this process's rank among them
    submit_dir: str | None = None   # where the job was submitted from


@runtime_checkable
class Scheduler(Protocol):
    """One batch system. Subclass ``CommandScheduler`` and fill in its class attributes; the methods
    below are what ``BatchRunner``, the suite builder and jobs call.

    Commands run in the site's shell, in the folder of the job file (``job`` is its name there).
    Every value put into a template is shell-quoted, and a job id is checked against ``JOB_ID_RE``
    first, so a command never runs what a file or an answer smuggled in.
    """

    name: str
    ENV: JobEnvironment               # what a job reads about itself
    WARNING_SIGNAL: str | None        # sent before the time limit (the header traps it: TIMEOUT)
    LAUNCH: str | None                # prefix starting one process per task across the job's nodes
    KILL_GRACE_S: float               # after the kill, how long before ``hard_kill_command``

    def directives(self, site, task: TaskResources, *, job_name: str, output: str | None,
                   token: str) -> list[str]:
        """Lines put after the job's shebang; empty for a scheduler without directives."""
        ...

    def submit_command(self, job: str, output: str, token: str) -> str: ...
    def parse_job_id(self, answer: str) -> str | None: ...
    def valid_job_id(self, job_id: str | None) -> bool: ...
    def kill_command(self, job_id: str) -> str: ...
    def hard_kill_command(self, job_id: str) -> str | None: ...
    def poll_command(self, job_id: str) -> str: ...
    def parse_state(self, answer: str) -> str: ...
    def find_command(self) -> str | None: ...
    def jobs_with_token(self, answer: str, token: str) -> list[str]: ...
    def lightning_environment(self): ...
    def job_id_in(self, environ: Mapping[str, str] | None = None) -> str | None: ...
    def rank_in(self, environ: Mapping[str, str] | None = None) -> int | None: ...


class CommandScheduler:
    """A scheduler written as class attributes (cylc's job runner handler shape).

    Templates are ``%``-style: ``SUBMIT_CMD_TMPL`` gets ``%(job)s``, ``%(output)s`` and
    ``%(token)s``; ``KILL_CMD_TMPL``, ``HARD_KILL_CMD_TMPL`` and ``POLL_CMD_TMPL`` get
    ``%(job_id)s``. ``STATES`` maps the scheduler's state words (as the poll command prints them)
    to the states above; ``REC_ID_FROM_SUBMIT_OUT`` finds the job id in the submit command's answer;
    ``FIND_CMD`` lists the user's jobs as ``<id> <comment or name>`` lines, where the submission
    token shows (None: the scheduler cannot, the runner's marker alone guards the submission).
    """

    name: ClassVar[str] = ""
    SUBMIT_CMD_TMPL: ClassVar[str] = ""
    KILL_CMD_TMPL: ClassVar[str] = ""
    HARD_KILL_CMD_TMPL: ClassVar[str | None] = None
    KILL_GRACE_S: ClassVar[float] = 0.0
    POLL_CMD_TMPL: ClassVar[str] = ""
    FIND_CMD: ClassVar[str | None] = None
    REC_ID_FROM_SUBMIT_OUT: ClassVar[re.Pattern[str]] = re.compile(r"^\s*(\d+)\s*$", re.M)
    JOB_ID_RE: ClassVar[re.Pattern[str]] = re.compile(r"[1-9]\d*")
    STATES: ClassVar[Mapping[str, str]] = {}
    ENV: ClassVar[JobEnvironment] = JobEnvironment()
    WARNING_SIGNAL: ClassVar[str | None] = None
    LAUNCH: ClassVar[str | None] = None

    def directives(self, site, task: TaskResources, *, job_name: str, output: str | None,
                   token: str) -> list[str]:
        return []

    def submit_command(self, job: str, output: str, token: str) -> str:
        return self.SUBMIT_CMD_TMPL % {"job": shlex.quote(job), "output": shlex.quote(output),
                                       "token": shlex.quote(token)}

    def parse_job_id(self, answer: str) -> str | None:
        m = self.REC_ID_FROM_SUBMIT_OUT.search(answer)
        return m.group(1) if m else None

    def valid_job_id(self, job_id: str | None) -> bool:
        return bool(job_id) and self.JOB_ID_RE.fullmatch(str(job_id)) is not None

    def _with_id(self, template: str, job_id: str) -> str:
        if not self.valid_job_id(job_id):
            raise ValueError(f"not a {self.name} job id: {job_id!r}")
        return template % {"job_id": job_id}

    def kill_command(self, job_id: str) -> str:
        return self._with_id(self.KILL_CMD_TMPL, job_id)

    def hard_kill_command(self, job_id: str) -> str | None:
        return self._with_id(self.HARD_KILL_CMD_TMPL, job_id) if self.HARD_KILL_CMD_TMPL else None

    def poll_command(self, job_id: str) -> str:
        return self._with_id(self.POLL_CMD_TMPL, job_id)

    def parse_state(self, answer: str) -> str:
        """The first word of ``answer`` that ``STATES`` knows (a trailing ``+`` is dropped)."""
        for word in answer.split():
            state = self.STATES.get(word.upper().rstrip("+"))
            if state:
                return state
        return UNKNOWN

    def find_command(self) -> str | None:
        return self.FIND_CMD

    def jobs_with_token(self, answer: str, token: str) -> list[str]:
        mark = TOKEN_PREFIX + token
        return [ln.split()[0] for ln in answer.splitlines() if ln.split()[1:2] == [mark]]

    def lightning_environment(self):
        """Lightning's cluster environment for a job of this scheduler, with the scheduler's own
        requeue off (the suite resubmits a timed-out job itself); None: Lightning's default."""
        return None

    def job_id_in(self, environ: Mapping[str, str] | None = None) -> str | None:
        """The job id when called inside a job of this scheduler (None elsewhere)."""
        env = os.environ if environ is None else environ
        return env.get(self.ENV.job_id) if self.ENV.job_id else None

    def rank_in(self, environ: Mapping[str, str] | None = None) -> int | None:
        """This process's rank among the job's tasks, where the scheduler says it."""
        env = os.environ if environ is None else environ
        value = env.get(self.ENV.procid, "") if self.ENV.procid else ""
        return int(value) if value.isdigit() else None


# ------------------------------------------------------------------------------------- loading
def known() -> list[str]:
    return plugins.names(GROUP)


def scheduler_class(name: str, *, site: str | None = None) -> type:
    """The class registered as ``name`` in the ``maelflow.schedulers`` group."""
    found = plugins.find(GROUP, name)
    if found is None:
        from maelflow.errors import ConfigurationError

        where = f"site {site!r}: " if site else ""
        raise ConfigurationError(f"{where}no scheduler {name!r} (known: {', '.join(known()) or 'none'})",
                                 hint="install the package that provides it, or fix the site's 'scheduler'")
    return found.load()


def scheduler_named(name: str, *, site: str | None = None) -> Scheduler:
    return scheduler_class(name, site=site)()


def scheduler_for(site_name: str, site) -> Scheduler:
    """The scheduler of ``site`` (a ``maelflow.config.models.Site``)."""
    return scheduler_named(site.scheduler, site=site_name)


def current(environ: Mapping[str, str] | None = None) -> Scheduler:
    """Inside a job: the scheduler it runs under (the header exports MAELFLOW_SCHEDULER); outside
    one, ``local``."""
    env = os.environ if environ is None else environ
    return scheduler_named(env.get("MAELFLOW_SCHEDULER") or "local")


def process_rank(environ: Mapping[str, str] | None = None) -> int:
    """This process's global rank in a job of several processes: torch's RANK (torchrun), else the
    rank its scheduler's launcher gave it (SLURM_PROCID under srun), else LOCAL_RANK, else 0. Only
    rank 0 of a training creates its MLflow run and writes its run record; reporting to ecFlow
    follows MAELFLOW_RANK_VAR (``maelflow.reporting``)."""
    env = os.environ if environ is None else environ
    if env.get("RANK", "").isdigit():
        return int(env["RANK"])
    rank = current(env).rank_in(env)
    if rank is not None:
        return rank
    return int(env["LOCAL_RANK"]) if env.get("LOCAL_RANK", "").isdigit() else 0


def job_variables(scheduler: Scheduler) -> dict[str, str]:
    """The ecFlow variables through which a job's header (suites/include/head.h) and templates
    ask their scheduler: its name, the job id (the shell's own pid where the scheduler gives none),
    the warning signal to trap, the launcher of a multi-task step, and the name of the variable that
    holds a task's rank under that launcher (only rank 0 reports to ecFlow)."""
    job_id = f"${{{scheduler.ENV.job_id}:-$$}}" if scheduler.ENV.job_id else "$$"
    return {"MAELFLOW_SCHEDULER": scheduler.name, "MAELFLOW_JOB_ID": job_id,
            "MAELFLOW_WARNING_SIGNAL": scheduler.WARNING_SIGNAL or "", "MAELFLOW_LAUNCH": scheduler.LAUNCH or "",
            "MAELFLOW_RANK_VAR": scheduler.ENV.procid or ""}


__all__ = ["ALIVE", "CANCELLED", "COMPLETED", "CommandScheduler", "FAILED", "GROUP", "JobEnvironment", "PENDING",
           "RUNNING", "STATES", "Scheduler", "TIMEOUT", "TOKEN_PREFIX", "TaskResources", "UNKNOWN", "current",
           "job_variables", "known", "process_rank", "scheduler_class", "scheduler_for", "scheduler_named"]

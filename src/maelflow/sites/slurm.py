"""The SLURM scheduler as data: commands to run on the login node and how to read their answers.

Kept declarative (like cylc's job runner handlers and troika's site classes) so that another
scheduler (PBS, say) is one more small file: the runner owns the connection, retries and dry-run;
this module only knows SLURM's vocabulary.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass

from maelflow.config.models import Site, parse_slurm_time

PENDING, RUNNING, COMPLETED, FAILED, CANCELLED, TIMEOUT, UNKNOWN = (
    "PENDING", "RUNNING", "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "UNKNOWN")
ALIVE = frozenset({PENDING, RUNNING})

# SLURM's long and short (%t) state names -> the few states a suite task cares about. A job that
# has not started its script yet (configuring nodes, held for requeue) counts as PENDING: it cannot
# report its own abort, so a kill must report it on its behalf.
_STATES = {
    PENDING: ("PENDING", "PD", "CONFIGURING", "CF", "REQUEUED", "RQ", "REQUEUE_HOLD", "RH",
              "REQUEUE_FED", "RF", "RESV_DEL_HOLD", "RD", "RESIZING", "RS"),
    RUNNING: ("RUNNING", "R", "COMPLETING", "CG", "SUSPENDED", "S", "STOPPED", "ST", "SIGNALING", "SI",
              "STAGE_OUT", "SO", "SPECIAL_EXIT", "SE"),
    COMPLETED: ("COMPLETED", "CD"),
    FAILED: ("FAILED", "F", "NODE_FAIL", "NF", "OUT_OF_MEMORY", "OOM", "BOOT_FAIL", "BF",
             "DEADLINE", "DL", "PREEMPTED", "PR"),
    CANCELLED: ("CANCELLED", "CA", "REVOKED", "RV"),
    TIMEOUT: ("TIMEOUT", "TO"),
}
_STATE_OF = {name: state for state, names in _STATES.items() for name in names}


def parse_state(text: str) -> str:
    """The state in a squeue or sacct line ("123 RUNNING None 0:05 30:00", "123 CANCELLED by 0 0:0")."""
    for token in text.split():
        state = _STATE_OF.get(token.upper().rstrip("+"))
        if state:
            return state
    return UNKNOWN


@dataclass(frozen=True)
class TaskResources:
    """What one suite task asks of the site; the site config decides how that is spelled."""

    nodes: int = 1
    tasks_per_node: int = 1
    gpus_per_node: int = 0
    cpus_per_task: int | None = None
    time: str = "00:30:00"

    _KEYS = ("nodes", "tasks_per_node", "gpus_per_node", "cpus_per_task", "time")

    @classmethod
    def from_script(cls, text: str) -> "TaskResources":
        """Read ``# maelflow name=value`` lines of a job (as troika reads ``# troika name=value``), so
        a task template can ask for GPUs without knowing the site's directive dialect."""
        values: dict[str, object] = {}
        for m in re.finditer(r"^#\s*maelflow\s+(\w+)=(\S+)\s*$", text, re.M):
            key, value = m.group(1), m.group(2)
            if key in cls._KEYS:
                values[key] = value if key == "time" else int(value)
        return cls(**values)  # type: ignore[arg-type]


def _cap_time(wanted: str, limit: str) -> str:
    return wanted if parse_slurm_time(wanted) <= parse_slurm_time(limit) else limit


def warning_seconds(time_limit: str) -> int:
    """Seconds before the time limit at which SLURM sends USR1: a tenth of it, 30 s to 5 min."""
    from maelflow.config.models import parse_slurm_time

    return max(30, min(300, parse_slurm_time(time_limit) // 10))


def directives(site: Site, task: TaskResources, *, job_name: str = "maelflow", output: str | None = None,
               token: str | None = None) -> list[str]:
    """``#SBATCH`` lines for ``task`` on ``site``. One output file (stderr joins stdout, which is
    sbatch's default when no --error is given), and ``--comment=maelflow:<token>`` so a submission
    whose answer was lost can be found again."""
    slurm = site.slurm
    if slurm is None:
        raise ValueError(f"site {site.name!r} has no slurm section")
    lines = [f"--job-name={job_name}"]
    if output:
        lines.append(f"--output={output}")
    lines += [f"--nodes={task.nodes}", f"--ntasks-per-node={task.tasks_per_node}"]
    if task.gpus_per_node:
        if slurm.gpu_directive == "gres":
            lines.append(f"--gres=gpu:{task.gpus_per_node}")
        else:
            lines.append(f"--gpus-per-node={task.gpus_per_node}")
    if task.cpus_per_task:
        lines.append(f"--cpus-per-task={task.cpus_per_task}")
    time_limit = _cap_time(task.time, slurm.max_time)
    lines.append(f"--time={time_limit}")
    # warn the batch shell before the limit, so the job reports TIMEOUT (suites/include/head.h)
    lines.append(f"--signal=B:USR1@{warning_seconds(time_limit)}")
    if slurm.account:
        lines.append(f"--account={slurm.account}")
    partition = (slurm.gpu_partition or slurm.partition) if task.gpus_per_node else slurm.partition
    if partition:
        lines.append(f"--partition={partition}")
    if slurm.qos:
        lines.append(f"--qos={slurm.qos}")
    lines += list(slurm.extra_directives)
    if token:
        lines.append(f"--comment=maelflow:{token}")
    return [ln if ln.startswith("#SBATCH") else f"#SBATCH {ln}" for ln in lines]


class Slurm:
    """Commands run in the login node's shell, and the regex that reads sbatch's answer."""

    name = "slurm"
    JOB_ID_RE = re.compile(r"Submitted batch job (\d+)")
    STATUS_FORMAT = "%i %T %r %M %l"

    def submit_command(self, job_path: str) -> str:
        return f"sbatch {shlex.quote(job_path)}"

    def kill_command(self, job_id: str) -> str:
        """scancel, printing first the state the job was in: a job cancelled while PENDING never ran
        its script, so nobody else will tell ecFlow it is gone."""
        jid = _job_id(job_id)
        return f"squeue -h -t all -j {jid} -o %T 2>/dev/null; scancel {jid}"

    def status_command(self, job_id: str) -> str:
        """squeue knows a job until MinJobAge after its end; then sacct, or ``sacct --completion``
        where there is no accounting database (the loopback site, some test clusters)."""
        jid = _job_id(job_id)
        fields = "JobID,State,ExitCode"
        return (f"out=$(squeue -h -t all -j {jid} -o '{self.STATUS_FORMAT}' 2>/dev/null); "
                f'if [ -n "$out" ]; then echo "$out"; '
                f"else sacct -X -n -P -j {jid} -o {fields} 2>/dev/null | tr '|' ' ' | grep . "
                f"|| sacct --completion -j {jid} -n -o {fields}; fi")

    def find_command(self) -> str:
        """Every job the user still has in squeue, with its comment (for the submission token)."""
        return "squeue -h -t all -o '%i %k'"

    def parse_job_id(self, text: str) -> str | None:
        m = self.JOB_ID_RE.search(text)
        return m.group(1) if m else None

    def jobs_with_token(self, text: str, token: str) -> list[str]:
        marker = f"maelflow:{token}"
        return [ln.split()[0] for ln in text.splitlines()
                if len(ln.split()) >= 2 and ln.split()[1] == marker]


def _job_id(job_id: str) -> str:
    if not re.fullmatch(r"\d+(_\d+)?", str(job_id)):
        raise ValueError(f"not a SLURM job id: {job_id!r}")
    return str(job_id)

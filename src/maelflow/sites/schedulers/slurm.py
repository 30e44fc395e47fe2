"""SLURM as data: the commands run on the login node, how to read their answers, ``#SBATCH`` lines.

The runner owns the connection, retries, the submit-once guard and dry-run; this file only knows
SLURM's vocabulary (cylc's ``job_runner_handlers/slurm.py`` is the model).
"""

from __future__ import annotations

import re

from maelflow.config.slurmtime import parse_slurm_time
from maelflow.sites.schedulers import (CANCELLED, COMPLETED, FAILED, PENDING, RUNNING, TIMEOUT, TOKEN_PREFIX,
                                       CommandScheduler, JobEnvironment, TaskResources)

# SLURM's long and short (%t) state names. A job that has not started its script yet (configuring
# nodes, held for requeue) counts as PENDING: it cannot report its own abort, so a kill must report
# it on its behalf.
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


def warning_seconds(time_limit: str) -> int:
    """Seconds before the time limit at which SLURM sends the warning: a tenth of it, 30 s to 5 min."""
    return max(30, min(300, parse_slurm_time(time_limit) // 10))


def _cap_time(wanted: str, limit: str) -> str:
    return wanted if parse_slurm_time(wanted) <= parse_slurm_time(limit) else limit


class Slurm(CommandScheduler):
    name = "slurm"
    SUBMIT_CMD_TMPL = "sbatch %(job)s"
    KILL_CMD_TMPL = "scancel %(job_id)s"          # SIGTERM, then SIGKILL after the cluster's KillWait
    # squeue knows a job until MinJobAge after its end; then sacct, or ``sacct --completion`` where
    # there is no accounting database (the loopback site, some test clusters)
    POLL_CMD_TMPL = ("out=$(squeue -h -t all -j %(job_id)s -o '%%i %%T %%r %%M %%l' 2>/dev/null); "
                     'if [ -n "$out" ]; then echo "$out"; '
                     "else sacct -X -n -P -j %(job_id)s -o JobID,State,ExitCode 2>/dev/null | tr '|' ' ' | grep . "
                     "|| sacct --completion -j %(job_id)s -n -o JobID,State,ExitCode; fi")
    FIND_CMD = "squeue -h -t all -o '%i %k'"       # every job of the user, with its comment
    REC_ID_FROM_SUBMIT_OUT = re.compile(r"Submitted batch job (\d+)")
    JOB_ID_RE = re.compile(r"[1-9]\d*(_\d+)?")
    STATES = {word: state for state, words in _STATES.items() for word in words}
    ENV = JobEnvironment(job_id="SLURM_JOB_ID", node_list="SLURM_JOB_NODELIST", ntasks="SLURM_NTASKS",
                         procid="SLURM_PROCID", submit_dir="SLURM_SUBMIT_DIR")
    WARNING_SIGNAL = "USR1"
    LAUNCH = "srun --kill-on-bad-exit=1"

    def directives(self, site, task: TaskResources, *, job_name: str = "maelflow", output: str | None = None,
                   token: str | None = None) -> list[str]:
        """``#SBATCH`` lines for ``task`` on ``site``: one output file (stderr joins stdout, sbatch's
        default without --error), the warning signal before the (capped) time limit, and
        ``--comment=maelflow:<token>`` so a submission whose answer was lost is found again."""
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
        lines.append(f"--signal=B:{self.WARNING_SIGNAL}@{warning_seconds(time_limit)}")
        if slurm.account:
            lines.append(f"--account={slurm.account}")
        partition = (slurm.gpu_partition or slurm.partition) if task.gpus_per_node else slurm.partition
        if partition:
            lines.append(f"--partition={partition}")
        if slurm.qos:
            lines.append(f"--qos={slurm.qos}")
        lines += list(slurm.extra_directives)
        if token:
            lines.append(f"--comment={TOKEN_PREFIX}{token}")
        return [ln if ln.startswith("#SBATCH") else f"#SBATCH {ln}" for ln in lines]

    def lightning_environment(self):
        from lightning_fabric.plugins.environments import SLURMEnvironment

        # Lightning's default in a SLURM job is its own `scontrol requeue`, which would race the suite
        return SLURMEnvironment(auto_requeue=False)

"""Jobs as plain background processes: the local site, a login node's own work, server-side tasks.

Some work has no batch system to go to: the local site, staging on a login node (it has the
internet, compute nodes do not), tasks beside the ecFlow server. The job's bash is started in a
session of its own, so its pid is the process group a kill signals and a poll lists; it outlives
the shell (or SSH session) that started it.
"""

from __future__ import annotations

from maelflow.sites.schedulers import RUNNING, UNKNOWN, CommandScheduler


class LocalProcesses(CommandScheduler):
    name = "local"
    # in a shell without job control a background job is no group leader, so setsid execs in place
    # and $! is the job's bash: its own session and process group
    SUBMIT_CMD_TMPL = "setsid nohup bash %(job)s > %(output)s 2>&1 < /dev/null & echo $!"
    KILL_CMD_TMPL = "kill -TERM -- -%(job_id)s 2>/dev/null || true"
    HARD_KILL_CMD_TMPL = "kill -KILL -- -%(job_id)s 2>/dev/null || true"
    KILL_GRACE_S = 10.0
    POLL_CMD_TMPL = "ps -o pid=,stat=,etime=,args= -g %(job_id)s || echo 'no process in group %(job_id)s'"

    def parse_state(self, answer: str) -> str:
        """RUNNING while a process of the group is more than a zombie; the end leaves no state."""
        for line in answer.splitlines():
            words = line.split()
            if len(words) >= 2 and words[0].isdigit() and not words[1].startswith("Z"):
                return RUNNING
        return UNKNOWN

"""Resubmit training jobs that their scheduler stopped at their time limit, up to the configured number.

The job header reports such a stop as an abort whose reason starts with "TIMEOUT": a scheduler with
time limits sends its warning signal first (``Scheduler.WARNING_SIGNAL``, SLURM's USR1), which the
header traps, whatever the scheduler. Only those are resubmitted: a real failure stays aborted for
an operator to read.
The count lives in a server variable of the task (MAELFLOW_RESUBMITS), so it survives the requeue
and a server restart, and shows in ecFlow UI; the job puts it on its ``resubmits`` meter.
"""

from __future__ import annotations

import logging

from maelflow.sites.schedulers import TIMEOUT

log = logging.getLogger("maelflow.resubmit")

MAX_VAR = "MAELFLOW_RESUBMIT_MAX"
COUNT_VAR = "MAELFLOW_RESUBMITS"


def resubmissions_left(node) -> int:
    """How many more times the task ``node`` (an ecflow node) will be resubmitted: 0 unless it is
    aborted at its time limit with resubmissions configured and not all used. Its abort is then not
    an end: the next resubmission pass requeues it (which a caller waiting for a suite to settle
    must know)."""
    import ecflow

    if not isinstance(node, ecflow.Task) or str(node.get_state()) != "aborted":
        return 0
    limit = node.find_variable(MAX_VAR)
    if limit.empty() or not node.get_aborted_reason().startswith(TIMEOUT):
        return 0
    return max(0, int(limit.value()) - _count(node))


def _count(node) -> int:
    var = node.find_variable(COUNT_VAR)
    return int(var.value()) if not var.empty() else 0


def resubmit_timeouts(client) -> list[str]:
    """Requeue every timed-out task with resubmissions left; returns their paths."""
    client.sync_local()
    defs = client.get_defs()
    if defs is None:
        return []
    done = []
    for node in defs.get_all_nodes():
        left = resubmissions_left(node)
        if not left:
            continue
        count = _count(node)
        path = node.get_abs_node_path()
        action = "add" if node.find_variable(COUNT_VAR).empty() else "change"
        client.alter(path, action, "variable", COUNT_VAR, str(count + 1))
        client.requeue(path)
        log.info("%s stopped at its time limit: resubmitted (%d of %d)", path, count + 1, count + left)
        done.append(path)
    return done

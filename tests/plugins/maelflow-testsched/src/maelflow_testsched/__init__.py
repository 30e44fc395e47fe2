"""A third scheduler, registered from a package of its own: proof that a site's scheduler is a plugin.

``testsched`` is a tiny at(1)-like queue: ``python -m maelflow_testsched submit`` files the job in a
spool folder (one folder per job id, holding its token and state files) and answers
``job <id> at <time>``; a detached runner starts it a moment later with ``TESTSCHED_JOB_ID`` set
and records ``running``, then ``done <rc>``, ``failed <rc>`` or ``cancelled``. Nothing of it is
known to maelflow except through the ``maelflow.schedulers`` entry point in this package's
pyproject.toml; maelflow's tests install it and run a suite task through it.
"""

from __future__ import annotations

import re
import shlex
import sys

from maelflow.sites.schedulers import (CANCELLED, COMPLETED, FAILED, PENDING, RUNNING, CommandScheduler,
                                       JobEnvironment)

_QUEUE = f"{shlex.quote(sys.executable)} -m maelflow_testsched"


class AtQueue(CommandScheduler):
    name = "testsched"
    SUBMIT_CMD_TMPL = _QUEUE + " submit %(job)s %(output)s %(token)s"
    KILL_CMD_TMPL = _QUEUE + " cancel %(job_id)s"
    POLL_CMD_TMPL = _QUEUE + " status %(job_id)s"
    FIND_CMD = _QUEUE + " list"
    REC_ID_FROM_SUBMIT_OUT = re.compile(r"^job (\d+) at ", re.M)
    STATES = {"QUEUED": PENDING, "RUNNING": RUNNING, "DONE": COMPLETED, "FAILED": FAILED, "CANCELLED": CANCELLED}
    ENV = JobEnvironment(job_id="TESTSCHED_JOB_ID")

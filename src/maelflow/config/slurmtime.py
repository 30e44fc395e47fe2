"""SLURM time limits ([D-]HH:MM[:SS]) in seconds, without the configuration models.

The models validate time limits with it, and the SLURM scheduler caps a job's limit with it in
``maelflow job submit``, a process per job that does not import the models (sites/suiteconfig.py).
"""

from __future__ import annotations

import re

TIME_RE = re.compile(r"^(?:(\d+)-)?(\d{1,3}):([0-5]\d)(?::([0-5]\d))?$")


def parse_slurm_time(value: str) -> int:
    """Seconds in a SLURM time limit written [D-]HH:MM[:SS]."""
    m = TIME_RE.match(value.strip())
    if not m:
        raise ValueError("must be a SLURM time limit such as 01:30:00 or 2-00:00:00")
    days, hours, minutes, seconds = (int(g) if g else 0 for g in m.groups())
    return ((days * 24 + hours) * 60 + minutes) * 60 + seconds

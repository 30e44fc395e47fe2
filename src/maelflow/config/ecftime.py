"""ecFlow's time attributes as a config writes them (a benchmark's ``cron``, an operations family's
``late``), parsed into ecFlow's own objects.

Why here: the config models check these strings when an experiment is loaded (so ``maelflow
validate`` names a bad one with its file and field), and the suite builder turns the same strings
into the suite's attributes; both need one parser, and the config must not import the builder.
"""

from __future__ import annotations

import ecflow


def parse_late(text: str) -> ecflow.Late:
    """An ecFlow late flag as written in a .def (``-s +00:15 -a 20:00 -c +02:00``: submitted, active,
    complete; ``+`` relative to the task's start or its family's cycle)."""
    import re

    words = text.split()
    if not words or len(words) % 2:
        raise ValueError(f"late {text!r}: pairs of -s/-a/-c and a time, e.g. '-s +00:15 -c +02:00'")
    late = ecflow.Late()
    for flag, value in zip(words[::2], words[1::2]):
        m = re.match(r"^(\+?)(\d{1,2}):([0-5]\d)$", value)
        if flag not in ("-s", "-a", "-c") or not m:
            raise ValueError(f"late {text!r}: {flag} {value} is not one of -s/-a/-c with a time [+]HH:MM")
        hours, minutes = int(m.group(2)), int(m.group(3))
        if flag == "-s":
            if not m.group(1):
                raise ValueError(f"late {text!r}: -s (submitted) takes a relative time, +HH:MM")
            late.submitted(hours, minutes)
        elif flag == "-a":
            if m.group(1):
                raise ValueError(f"late {text!r}: -a (active) takes a time of day, HH:MM")
            late.active(hours, minutes)
        else:
            late.complete(hours, minutes, bool(m.group(1)))
    return late


def parse_cron(text: str) -> ecflow.Cron:
    """An ecFlow cron as written in a .def (``[-w 0,6] [-d 1,15] [-m 1,4,7,10] TIME_SERIES``)."""
    words = text.split()
    setters = {"-w": "set_week_days", "-d": "set_days_of_month", "-m": "set_months"}
    lists: dict[str, list[int]] = {}
    while words and words[0] in setters:
        if len(words) < 2:
            raise ValueError(f"cron {text!r}: {words[0]} needs a comma-separated list")
        try:
            lists[setters[words[0]]] = [int(x) for x in words[1].split(",")]
        except ValueError:
            raise ValueError(f"cron {text!r}: {words[0]} {words[1]} is not a list of numbers") from None
        words = words[2:]
    if not words:
        raise ValueError(f"cron {text!r}: no time (e.g. 03:00)")
    try:
        cron = ecflow.Cron(" ".join(words))
        for setter, values in lists.items():
            getattr(cron, setter)(values)
    except (RuntimeError, IndexError) as exc:
        raise ValueError(f"cron {text!r}: {exc}") from None
    return cron

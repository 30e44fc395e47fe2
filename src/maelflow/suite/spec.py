"""The nodes a suite is made of, as data: tasks, families and the suite, with their ecFlow attributes.

Kept apart from the layout (which families an experiment gets, suite/layout.py) and from the ecFlow
API calls (builder.py), so that a feature adding families of its own (suite/operations_layout.py) builds
them from these without importing the layout that calls it.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TaskSpec:
    name: str
    script: str
    variables: dict[str, str] = field(default_factory=dict)
    meters: list[tuple[str, int, int]] = field(default_factory=list)
    labels: list[tuple[str, str]] = field(default_factory=list)
    events: list[str] = field(default_factory=list)
    trigger: str | None = None
    inlimits: list[str] = field(default_factory=list)
    # "site": the job runs on the site's scheduler; "login": as a process on the site's login node
    # (it has the internet, compute nodes do not); "server": beside the ecFlow server, for work that
    # needs what the site lacks (syncing offline runs to MLflow, pushing to a site without internet)
    runs_on: str = "site"
    late: str | None = None   # an ecFlow late flag, as in a .def: -s +00:15 -a 20:00 -c +02:00
    complete: str | None = None   # an ecFlow complete expression: when it holds, the task is set complete unrun


@dataclass
class FamilySpec:
    name: str
    variables: dict[str, str] = field(default_factory=dict)
    children: list["FamilySpec | TaskSpec"] = field(default_factory=list)
    trigger: str | None = None
    inlimits: list[str] = field(default_factory=list)
    labels: list[tuple[str, str]] = field(default_factory=list)
    cron: str | None = None   # an ecFlow cron, as in a .def: [-w D,..] [-d D,..] [-m M,..] TIME_SERIES
    # an ecFlow repeat date: (variable, first YYYYMMDD, last YYYYMMDD, days from one to the next)
    repeat: tuple[str, int, int, int] | None = None


@dataclass
class SuiteSpec:
    name: str
    variables: dict[str, str]
    limits: list[tuple[str, int]]
    children: list[FamilySpec | TaskSpec]
    labels: list[tuple[str, str]] = field(default_factory=list)

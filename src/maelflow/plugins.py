"""The entry points of maelflow's plugin groups (schedulers, connections), looked up cheaply.

Below everything that names a plugin: the configuration checks a site's scheduler name here, the
site layer loads the classes.

``importlib.metadata.entry_points()`` reads the metadata of every installed distribution on each
call: 20 to 40 ms in maelflow's environment (torch, mlflow and their dependencies). ``maelflow job
submit`` runs once per suite job and asked five times (the config's scheduler check, the
connection, the runner, the scheduler), a quarter of its own time. So a name is first looked for
among maelflow's own entry points (one distribution's metadata, a few ms: the ``slurm``, ``local``
and ``ssh`` every site uses); only a name maelflow does not ship, or a listing of every name, scans
all distributions, once per process. A name still not found triggers one fresh scan, so a plugin
installed while a long-lived process runs (the relay) is found too. maelflow's own names win over a
plugin registering the same name.
"""

from __future__ import annotations

from functools import lru_cache
from importlib.metadata import EntryPoint, PackageNotFoundError, distribution, entry_points

OWN = "maelflow"
SCHEDULERS = "maelflow.schedulers"
CONNECTIONS = "maelflow.connections"


@lru_cache(maxsize=1)
def _own() -> tuple[EntryPoint, ...]:
    try:
        return tuple(distribution(OWN).entry_points)
    except PackageNotFoundError:        # running from a source tree without installing it
        return ()


@lru_cache(maxsize=1)
def _scan() -> dict[str, tuple[EntryPoint, ...]]:
    every = entry_points()              # one scan; ``select`` then filters it in memory
    return {name: tuple(every.select(group=name)) for name in every.groups}


def group(name: str) -> tuple[EntryPoint, ...]:
    """Every entry point of the group ``name`` (a scan of all distributions, once per process)."""
    return _scan().get(name, ())


def find(group_name: str, name: str) -> EntryPoint | None:
    """The entry point ``name`` of ``group_name``: maelflow's own, else a plugin's; None if none."""
    for ep in _own():
        if ep.group == group_name and ep.name == name:
            return ep
    for attempt in range(2):
        for ep in group(group_name):
            if ep.name == name:
                return ep
        if attempt == 0:
            _scan.cache_clear()
    return None


def names(group_name: str) -> list[str]:
    """The names registered in ``group_name``, sorted (for messages that list what is known)."""
    return sorted({ep.name for ep in group(group_name)})


__all__ = ["CONNECTIONS", "SCHEDULERS", "find", "group", "names"]

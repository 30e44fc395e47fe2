"""The suite's resolved configuration as the job entry points read it: the built file, not the models.

ecFlow starts a process for every ECF_JOB_CMD, ECF_KILL_CMD and ECF_STATUS_CMD (``maelflow job
submit|kill|status``), hundreds in a campaign. Validating the whole experiment again there cost that
process more than half its CPU (importing pydantic and the configuration schema: 0.12 of 0.23 CPU-s,
docs/benchmarks.md), for a file that ``maelflow build`` wrote from models it had just validated
(``ResolvedExperiment.to_json``: every field, its default included). So these entry points read the
site they act on as attribute views over that file. A file that lacks a setting they read (written
by an older maelflow, or by hand) is validated the full way instead, which also fills the defaults:
the views never guess.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# What the job entry points read of a site (runner, connections, schedulers): checked to be present
# before the views are used; a plugin scheduler or connection reads the same file's other fields
_SITE_KEYS = {"name", "scheduler", "reporting", "connection", "paths", "slurm"}
_CONNECTION_KEYS = {"type", "ssh"}
_SSH_KEYS = {"host", "port", "user", "auth", "identity_file", "certificate_file", "known_hosts", "proxy_jump",
             "connect_timeout", "renew_hint"}
_SLURM_KEYS = {"partition", "gpu_partition", "account", "qos", "max_time", "gpu_directive", "extra_directives"}


class View:
    """Read-only attribute access to one JSON object (nested objects are views too)."""

    __slots__ = ("_data",)

    def __init__(self, data: dict[str, Any]):
        object.__setattr__(self, "_data", data)

    def __getattr__(self, name: str) -> Any:
        try:
            return _wrap(self._data[name])
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"{name}: the suite's configuration is read-only")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, View) and self._data == other._data

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"View({self._data!r})"


def _wrap(value: Any) -> Any:
    if isinstance(value, dict):
        return View(value)
    if isinstance(value, list):
        return [_wrap(v) for v in value]
    return value


@dataclass(frozen=True)
class SuiteSites:
    """What ``runner_for`` needs of a ``ResolvedExperiment``: its name and its sites."""

    name: str
    sites: dict[str, Any] = field(default_factory=dict)


def complete(site: dict[str, Any]) -> bool:
    """Whether ``site`` (a site as ``to_json`` dumps it) holds every setting the entry points read."""
    if not _SITE_KEYS <= site.keys() or not isinstance(site["connection"], dict):
        return False
    conn = site["connection"]
    if not _CONNECTION_KEYS <= conn.keys() or not isinstance(site["paths"], dict) or "root" not in site["paths"]:
        return False
    if isinstance(conn["ssh"], dict) and not _SSH_KEYS <= conn["ssh"].keys():
        return False
    return not (isinstance(site["slurm"], dict) and not _SLURM_KEYS <= site["slurm"].keys())


def load(path: str | Path):
    """The suite's experiment for the job entry points: attribute views over the built file when it
    is complete, else the validated ``ResolvedExperiment`` (raises ValueError on a bad file)."""
    data = json.loads(Path(path).read_text())
    try:
        name, sites = data["experiment"]["name"], data["sites"]
    except (KeyError, TypeError) as exc:
        raise ValueError(f"not a suite configuration: missing {exc}") from None
    if isinstance(sites, dict) and all(isinstance(s, dict) and complete(s) for s in sites.values()):
        return SuiteSites(name, {k: View(v) for k, v in sites.items()})
    from maelflow.config.loader import ResolvedExperiment

    return ResolvedExperiment.from_json(data)


__all__ = ["SuiteSites", "View", "complete", "load"]

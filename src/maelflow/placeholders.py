"""Values that site and dataset files may name as ``{placeholder}``: they differ per workspace.

``{workspace}`` is the workspace folder; ``{maelflow}`` the maelflow command of this installation.
Other distributions add their own through the ``maelflow.placeholders`` entry-point group, so the
core knows none of them: maelflow-sandbox registers ``{hpc_*}`` (the loopback HPC site's SSH port,
key, user and home, known only once ``maelflow services up --with-hpc`` has run). A provider is an
object with ``prefix`` (every name it gives starts with it), ``hint`` (what to do when its values
are missing) and ``values(ws)`` (a dict, empty when it has nothing for this workspace); it should
import little until the workspace has something to say, since every config load asks it.
"""

from __future__ import annotations

from functools import cache
from importlib.metadata import entry_points
from typing import Protocol

from maelflow.workspace import Workspace

GROUP = "maelflow.placeholders"

# placeholders in maelflow's own configs whose provider ships in another distribution
NOT_INSTALLED = {
    "hpc_": "the loopback HPC site's placeholders come from maelflow-sandbox, which is not installed: "
            ".venv/bin/python -m pip install -e ./sandbox (bash scripts/install.sh installs it)",
}


class PlaceholderProvider(Protocol):
    prefix: str
    hint: str

    def values(self, ws: Workspace) -> dict[str, str]: ...


@cache
def providers() -> tuple[PlaceholderProvider, ...]:
    return tuple(ep.load() for ep in sorted(entry_points(group=GROUP), key=lambda ep: ep.name))


def placeholders_for(ws: Workspace) -> dict[str, str]:
    from maelflow.installation import maelflow_command

    values = {"workspace": str(ws.root), "maelflow": maelflow_command()}
    for provider in providers():
        values.update({k: v for k, v in provider.values(ws).items() if k.startswith(provider.prefix)})
    return values


def hint(name: str) -> str:
    """Why ``{name}`` has no value, and what to do about it."""
    for provider in providers():
        if name.startswith(provider.prefix):
            return provider.hint
    for prefix, text in NOT_INSTALLED.items():
        if name.startswith(prefix):
            return text
    known = ["workspace", "maelflow", *(p.prefix + "*" for p in providers())]
    return f"unknown placeholder; known: {', '.join(known)}"

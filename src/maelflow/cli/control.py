"""maelflow suspend|resume|requeue|kill PATH: act on one node of a suite."""

from __future__ import annotations

import click

from maelflow.cli.common import console
from maelflow.cli.options import resolve_workspace, workspace_option


def _make(action: str, help_text: str) -> click.Command:
    @click.command(action, help=help_text)
    @click.argument("path")
    @workspace_option
    def cmd(path: str, workspace: str | None) -> None:
        from maelflow.ecf import client_for
        from maelflow.suite.server import control

        node = path if path.startswith("/") else "/" + path
        control(client_for(resolve_workspace(workspace)), action, node)
        console.print(f"{action}: {node}")

    return cmd


commands = {
    "suspend": _make("suspend", "Suspend PATH: nothing under it is submitted until it is resumed."),
    "resume": _make("resume", "Resume a suspended PATH."),
    "requeue": _make("requeue", "Requeue PATH: an aborted or complete task (or family) runs again from try 1."),
    "kill": _make("kill", "Kill the running jobs under PATH (the site's kill command: kill, scancel)."),
}

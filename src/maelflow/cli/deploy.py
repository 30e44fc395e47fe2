"""maelflow deploy: build an experiment's suite and load (or replace) and begin it on the server."""

from __future__ import annotations

import click

from maelflow.cli.common import console, experiment_argument, fail, load_or_exit, overrides_argument
from maelflow.cli.options import resolve_workspace, workspace_option


@click.command("deploy")
@experiment_argument
@overrides_argument
@workspace_option
@click.option("--wait", is_flag=True, help="Follow the suite until it completes or aborts.")
@click.option("--timeout", type=float, default=900, show_default=True, help="Seconds to wait with --wait.")
def command(experiment: str, overrides: tuple[str, ...], workspace: str | None, wait: bool, timeout: float) -> None:
    """Deploy EXPERIMENT to the workspace's ecFlow server and begin it."""
    from maelflow.cli.status import follow
    from maelflow.ecf import client_for
    from maelflow.suite.server import deploy

    ws = resolve_workspace(workspace)
    rx = load_or_exit(experiment, overrides, ws)
    client = client_for(ws)
    built = deploy(rx, ws, client)         # a maelflow error: the CLI's one handler reports it
    console.print(f"deployed suite [bold]/{built.name}[/] from {built.def_file}")
    if wait:
        state = follow(client, built.name, timeout)
        if state != "complete":
            fail(f"suite /{built.name} ended {state}; see 'maelflow status {built.name}'")

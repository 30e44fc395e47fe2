"""Options shared by several subcommands, defined once."""

from __future__ import annotations

import click

from maelflow.workspace import Workspace

workspace_option = click.option(
    "--workspace", "workspace", envvar="MAELFLOW_WORKSPACE", type=click.Path(file_okay=False),
    default=None, help="Workspace folder of the embedded services [env MAELFLOW_WORKSPACE].")


def resolve_workspace(value: str | None) -> Workspace:
    return Workspace.resolve(value)

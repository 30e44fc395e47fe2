"""maelflow validate: report every problem of a config, or say it is valid."""

from __future__ import annotations

import json

import click

from maelflow.cli.common import console, experiment_argument, load_or_exit, overrides_argument
from maelflow.cli.options import resolve_workspace, workspace_option


@click.command("validate")
@experiment_argument
@overrides_argument
@workspace_option
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("--show", is_flag=True, help="Print the resolved configuration.")
def command(experiment: str, overrides: tuple[str, ...], workspace: str | None, as_json: bool, show: bool) -> None:
    """Check EXPERIMENT (a name under configs/experiments/ or a YAML path) with key=value OVERRIDES.

    Exit status 2 when the configuration is invalid; every problem names its file, field and value.
    """
    ws = resolve_workspace(workspace)
    rx = load_or_exit(experiment, overrides, ws, as_json)
    if as_json:
        click.echo(json.dumps({"valid": True, "experiment": rx.name, **({"resolved": rx.to_json()} if show else {})},
                              indent=2))
        return
    console.print(f"[green]valid[/]: experiment [bold]{rx.name}[/] - sites {', '.join(rx.sites)}; "
                  f"datasets {', '.join(rx.datasets) or 'none'}; trainings {', '.join(rx.trainings) or 'none'}")
    if show:
        console.print_json(json.dumps(rx.to_json()))

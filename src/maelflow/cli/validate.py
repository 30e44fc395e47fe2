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
    anemoi = _anemoi_versions(rx)
    if as_json:
        click.echo(json.dumps({"valid": True, "experiment": rx.name, **({"anemoi": anemoi} if anemoi else {}),
                               **({"resolved": rx.to_json()} if show else {})}, indent=2))
        return
    console.print(f"[green]valid[/]: experiment [bold]{rx.name}[/] - sites {', '.join(rx.sites)}; "
                  f"datasets {', '.join(rx.datasets) or 'none'}; trainings {', '.join(rx.trainings) or 'none'}")
    if anemoi:
        console.print("anemoi-training: " + "; ".join(
            f"{site} {v['version'] or 'unknown'} ({v['source']})" for site, v in anemoi.items()), highlight=False)
    if show:
        console.print_json(json.dumps(rx.to_json()))


def _anemoi_versions(rx) -> dict:
    """The anemoi-training release of each site, when the experiment has an anemoi training (its keys
    were checked against that release's; a site whose release is unknown had no such check)."""
    if not any(t.application == "anemoi" for t in rx.trainings.values()):
        return {}
    from maelflow.training.anemoi_versions import versions_report

    return versions_report(rx.sites)

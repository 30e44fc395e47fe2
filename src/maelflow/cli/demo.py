"""maelflow demo: start the local stack, make the demo data, deploy the demo suite and follow it."""

from __future__ import annotations

import click

from maelflow.cli.common import console, fail, load_or_exit, overrides_argument
from maelflow.cli.options import resolve_workspace, workspace_option


@click.command("demo")
@overrides_argument
@workspace_option
@click.option("--experiment", default="demo", show_default=True, help="Experiment to run.")
@click.option("--timeout", type=float, default=900, show_default=True, help="Seconds to wait for the suite.")
def command(overrides: tuple[str, ...], workspace: str | None, experiment: str, timeout: float) -> None:
    """Run the demo end to end on this machine (key=value OVERRIDES as for deploy)."""
    from maelflow import demo
    from maelflow.cli.status import follow
    from maelflow.ecf import client_for
    from maelflow.suite.server import deploy

    ws = resolve_workspace(workspace)
    rx = load_or_exit(experiment, overrides, ws)
    console.print(f"workspace {ws.root}")
    infos = demo.start(ws, rx, on_start=lambda n: console.print(f"  starting {n} ..."))
    for name, info in infos.items():
        console.print(f"  {name}: {info.url or ''} (pid {info.pid})")
    for path in demo.prepare_datasets(rx):
        console.print(f"made synthetic dataset {path}")
    client = client_for(ws)
    built = deploy(rx, ws, client)
    console.print(f"deployed /{built.name}; following it (Ctrl-C stops following, not the suite)")
    state = follow(client, built.name, timeout)
    if state != "complete":
        fail(f"demo suite ended {state}")
    console.print(f"[green]demo complete[/]. Services keep running: 'maelflow services status', "
                  f"'maelflow status {built.name}', stop them with 'maelflow services down'. "
                  f"MLflow: {infos['mlflow'].url}")

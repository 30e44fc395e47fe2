"""maelflow build: write the suite definition and task scripts of an experiment."""

from __future__ import annotations

from pathlib import Path

import click

from maelflow.cli.common import console, experiment_argument, load_or_exit, overrides_argument
from maelflow.cli.options import resolve_workspace, workspace_option


@click.command("build")
@experiment_argument
@overrides_argument
@workspace_option
@click.option("-o", "--output", type=click.Path(file_okay=False), default=None,
              help="Output folder (default: <workspace>/suites/<experiment>).")
def command(experiment: str, overrides: tuple[str, ...], workspace: str | None, output: str | None) -> None:
    """Build the ecFlow suite of EXPERIMENT; the same config always gives the same files."""
    from maelflow.suite.builder import build_suite

    ws = resolve_workspace(workspace)
    rx = load_or_exit(experiment, overrides, ws)
    out = Path(output) if output else ws.suites_dir / rx.name
    built = build_suite(rx, out, ws)        # a maelflow error: the CLI's one handler reports it
    console.print(f"built suite [bold]{built.name}[/] in {built.out_dir}  ({built.def_file.name}, "
                  f"{len(list((built.out_dir / 'tasks').glob('*.ecf')))} task scripts)")

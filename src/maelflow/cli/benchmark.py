"""``maelflow benchmark report``: compare the timing and energy of trainings across sites and runs.

Why a command of its own: ``maelflow report`` is the jobs' child-command entry point; this one
reads MLflow (the workspace's server, ``--tracking-uri`` or ``MLFLOW_TRACKING_URI``) and writes the
comparison (``maelflow.reports.benchmark``). Exit status: 0, 1 when the baseline check finds a
regression, 2 for input it cannot compare (an unknown experiment or run, runs without timing, a
baseline that does not exist, an output folder it must not replace).
"""

from __future__ import annotations

import sys

import click

from maelflow.cli.options import resolve_workspace, workspace_option


@click.group(name="benchmark")
def command() -> None:
    """Benchmarks of trainings: timing, throughput and energy across sites and runs."""


def _tracking_uri(explicit: str | None, workspace: str | None) -> str:
    if explicit:
        return explicit
    from maelflow.services.base import ServiceError
    from maelflow.services.stack import discover

    ws = resolve_workspace(workspace)
    try:
        return discover(ws, "mlflow").url
    except (ServiceError, OSError) as exc:
        from maelflow.reports.benchmark import BenchmarkInputError

        raise BenchmarkInputError(f"no MLflow server to read: {exc}",
                                  hint="give --tracking-uri, or start the workspace's services") from None


@command.command(name="report")
@click.argument("experiments", nargs=-1)
@click.option("--run", "run_ids", multiple=True, metavar="RUN_ID", help="A run to include (repeatable).")
@click.option("--output", "-o", type=click.Path(file_okay=False), default=None,
              help="Folder for report.md, timing.csv, runs.csv, index.html and the PNG plots (replaced whole).")
@click.option("--baseline", default=None, metavar="RUN_OR_TAG",
              help="A run id, KEY=VALUE (runs with that tag) or NAME (runs tagged maelflow.baseline=NAME).")
@click.option("--tolerance", type=click.FloatRange(0, 1), default=0.10, show_default=True,
              help="Throughput may be this fraction below the baseline's.")
@click.option("--memory-tolerance", type=click.FloatRange(0, 10), default=0.01, show_default=True,
              help="Peak memory may be this fraction above the baseline's.")
@click.option("--tracking-uri", envvar="MLFLOW_TRACKING_URI", default=None,
              help="MLflow to read [env MLFLOW_TRACKING_URI; default: the workspace's server].")
@workspace_option
def report(experiments: tuple[str, ...], run_ids: tuple[str, ...], output: str | None, baseline: str | None,
           tolerance: float, memory_tolerance: float, tracking_uri: str | None, workspace: str | None) -> None:
    """Compare the runs of EXPERIMENT... (MLflow experiment names) and --run ids: per-category step
    times (min/mean/median/max/stdev), samples/s, time-to-train, data-loading share, peak memory,
    energy with its quality."""
    from pathlib import Path

    from mlflow import MlflowClient
    from rich.console import Console

    from maelflow.reports import benchmark as bm

    uri = _tracking_uri(tracking_uri, workspace)
    client = MlflowClient(uri)
    rep = bm.load_runs(client, experiments, run_ids, uri)
    if baseline:
        rep.baseline_spec = baseline
        bm.compare(rep, bm.resolve_baseline(client, baseline, rep), tolerance, memory_tolerance)
    console = Console()
    bm.render_terminal(rep, console)
    if output:
        written = bm.write_report(rep, Path(output))
        console.print(f"wrote {', '.join(p.name for p in written)} to {Path(output).absolute()}", highlight=False)
    if rep.regressions:
        click.echo(f"{len(rep.regressions)} regression(s) against baseline {baseline}", err=True)
        sys.exit(1)

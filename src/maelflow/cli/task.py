"""maelflow task NAME: the body of a suite task, run inside a job on a site."""

from __future__ import annotations

import sys

import click


def _run(fn, *args) -> None:
    from maelflow.suite.tasks import TaskContext, TaskFailed

    ctx = None
    try:
        ctx = TaskContext.from_env()
        fn(ctx, *args)
    except TaskFailed as exc:
        if ctx is not None:
            ctx.reporter.abort_reason(str(exc))
        else:
            from maelflow.reporting import Reporter
            Reporter().abort_reason(str(exc))
        click.echo(f"maelflow task failed: {exc}", err=True)
        sys.exit(1)
    except Exception as exc:  # noqa: BLE001 - a bug still gets a readable abort reason
        from maelflow.reporting import Reporter
        Reporter().abort_reason(f"{type(exc).__name__}: {exc} (traceback in the job output)")
        raise


@click.group("task")
def command() -> None:
    """Task bodies called from the suite's job scripts (not for interactive use)."""


@command.command("provenance")
def provenance() -> None:
    """Record config, code version and packages of the suite."""
    from maelflow.suite import tasks
    _run(tasks.provenance)


@command.command("build")
@click.option("--dataset", required=True)
def build(dataset: str) -> None:
    """Build DATASET from its anemoi-datasets recipe."""
    from maelflow.suite import tasks
    _run(tasks.build, dataset)


@command.command("publish")
@click.option("--dataset", required=True)
def publish(dataset: str) -> None:
    """Publish DATASET to the European Weather Cloud."""
    from maelflow.suite import tasks
    _run(tasks.publish, dataset)


@command.command("stage")
@click.option("--dataset", required=True)
@click.option("--site", required=True)
def stage(dataset: str, site: str) -> None:
    """Stage DATASET onto SITE."""
    from maelflow.suite import tasks
    _run(tasks.stage, dataset, site)


@command.command("locate")
@click.option("--dataset", required=True)
@click.option("--site", required=True)
def locate(dataset: str, site: str) -> None:
    """Register DATASET's location on SITE in the catalogue."""
    from maelflow.suite import tasks
    _run(tasks.locate, dataset, site)


@command.command("train")
@click.option("--training", required=True)
@click.option("--site", required=True)
def train(training: str, site: str) -> None:
    """Run TRAINING on SITE."""
    from maelflow.suite import tasks
    _run(tasks.train, training, site)


@command.command("register")
@click.option("--training", required=True)
@click.option("--site", required=True)
def register(training: str, site: str) -> None:
    """Record what TRAINING produced on SITE."""
    from maelflow.suite import tasks
    _run(tasks.register, training, site)


@command.command("sync")
@click.option("--training", required=True)
@click.option("--site", required=True)
def sync(training: str, site: str) -> None:
    """Sync the offline MLflow run of TRAINING on SITE to the tracking server."""
    from maelflow.suite import tasks
    _run(tasks.sync, training, site)

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


# task name -> (options it takes, help); each calls maelflow.suite.tasks.<name>(ctx, *options)
TASKS: dict[str, tuple[tuple[str, ...], str]] = {
    "provenance": ((), "Record config, code version and packages of the suite."),
    "build": (("dataset",), "Build DATASET from its anemoi-datasets recipe."),
    "publish": (("dataset",), "Publish DATASET to the European Weather Cloud."),
    "stage": (("dataset", "site"), "Stage DATASET onto SITE."),
    "locate": (("dataset", "site"), "Register DATASET's location on SITE in the catalogue."),
    "train": (("training", "site"), "Run TRAINING on SITE."),
    "register": (("training", "site"), "Register what TRAINING produced on SITE in the catalogue."),
    "sync": (("training", "site"), "Sync the offline MLflow run of TRAINING on SITE to the tracking server."),
}


def _task_command(name: str, options: tuple[str, ...], help_text: str) -> click.Command:
    def callback(**values: str) -> None:
        from maelflow.suite import tasks

        _run(getattr(tasks, name), *(values[o] for o in options))

    params = [click.Option([f"--{o}"], required=True) for o in options]
    return click.Command(name, callback=callback, params=params, help=help_text)


for _name, (_options, _help) in TASKS.items():
    command.add_command(_task_command(_name, _options, _help))

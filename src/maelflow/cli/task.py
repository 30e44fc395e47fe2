"""maelflow task NAME: the body of a suite task, run inside a job on a site.

A task that fails leaves a one-line abort reason for the job header. A failure it did not foresee
(a bug, an exception from a library) also prints its traceback on stderr, which is the job output,
before the reason is left: the task exits by itself, so click never sees the exception (click
turns any EPIPE, a ``BrokenPipeError`` from a subprocess included, into a silent exit 1).
"""

from __future__ import annotations

import sys
import traceback

import click


def _where(exc: BaseException) -> str:
    """``file:line`` of the innermost frame of ``exc``'s traceback, for the one-line reason."""
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return ""
    last = frames[-1]
    parts = last.filename.replace("\\", "/").split("/")
    return f" at {'/'.join(parts[-2:])}:{last.lineno}"


def _abort_reason(ctx, text: str) -> None:
    """Leave ``text`` for the job header; a reason that cannot be written is only noted."""
    try:
        if ctx is not None:
            ctx.reporter.abort_reason(text)
        else:
            from maelflow.reporting import Reporter
            Reporter().abort_reason(text)
    except Exception as exc:  # noqa: BLE001 - the job header then falls back to the exit status
        _stderr(f"maelflow task: could not leave the abort reason: {exc}")


def _stderr(text: str) -> None:
    try:
        print(text, file=sys.stderr, flush=True)
    except OSError:
        pass


def _run(name: str, *args: str) -> None:
    ctx = None
    task_failed: type[BaseException] = ()  # type: ignore[assignment]
    try:
        import importlib

        from maelflow.provenance import trust_installation
        from maelflow.suite.tasks import TaskContext, TaskFailed

        task_failed = TaskFailed
        trust_installation()      # git (ours, GitPython, a subprocess's) may read a shared installation
        ctx = TaskContext.from_env()
        getattr(importlib.import_module(MODULES.get(name, "maelflow.suite.tasks")), name)(ctx, *args)
    except Exception as exc:  # noqa: BLE001 - every failure gets a readable reason, and exits here
        if isinstance(exc, task_failed):
            _abort_reason(ctx, str(exc))
            _stderr(f"maelflow task failed: {exc}")
            sys.exit(1)
        try:
            sys.stdout.flush()
        except OSError:
            pass
        try:
            traceback.print_exc(file=sys.stderr)
            sys.stderr.flush()
        except OSError:
            pass
        _abort_reason(ctx, f"{type(exc).__name__}: {exc}{_where(exc)} (traceback in the job output)")
        _stderr(f"maelflow task {name} failed: {type(exc).__name__}: {exc}")
        sys.exit(1)


@click.group("task")
def command() -> None:
    """Task bodies called from the suite's job scripts (not for interactive use)."""


# task name -> (options it takes, help); each calls maelflow.suite.tasks.<name>(ctx, *options), or
# <module>.<name> for the tasks of a feature that keeps its own (MODULES)
OPERATIONS = ("champion", "evaluate", "gate", "resolve", "forecast", "deliver")
MODULES = {name: "maelflow.operations.tasks" for name in OPERATIONS}
MODULES["finetune"] = "maelflow.operations.finetune"
TASKS: dict[str, tuple[tuple[str, ...], str]] = {
    "provenance": ((), "Record config, code version and packages of the suite."),
    "build": (("dataset",), "Build DATASET from its anemoi-datasets recipe or its generator."),
    "publish": (("dataset",), "Publish DATASET to the European Weather Cloud."),
    "stage": (("dataset", "site"), "Stage DATASET onto SITE."),
    "locate": (("dataset", "site"), "Register DATASET's location on SITE in the catalogue."),
    "train": (("training", "site"), "Run TRAINING on SITE."),
    "register": (("training", "site"), "Register what TRAINING produced on SITE in the catalogue."),
    "sync": (("training", "site"), "Sync the offline MLflow run of TRAINING on SITE to the tracking server."),
    "benchmark_report": ((), "Compare the benchmark family's runs of every site in one report."),
    "champion": (("training", "site"), "Find the champion TRAINING's candidate is compared with on SITE."),
    "evaluate": (("training", "site"), "Score TRAINING's checkpoint on held-out data on SITE."),
    "gate": (("training", "site"), "Record TRAINING's scores and promote it if it passes its model's gate."),
    "resolve": (("site", "cycle"), "Resolve the forecast cycle's model@alias and check its checkpoint on SITE."),
    "forecast": (("site", "cycle"), "Run the forecast cycle with anemoi-inference on SITE."),
    "deliver": (("site", "cycle"), "Publish the cycle's forecast to the EWC and register it in the catalogue."),
    "finetune": (("task", "training", "site", "cycle"), "Run TASK (warmstart, train, sync, register, champion, "
                 "evaluate, gate) of fine-tuning cycle CYCLE of TRAINING on SITE."),
}


def _task_command(name: str, options: tuple[str, ...], help_text: str) -> click.Command:
    def callback(**values: str) -> None:
        _run(name, *(values[o] for o in options))

    params = [click.Option([f"--{o}"], required=True) for o in options]
    return click.Command(name, callback=callback, params=params, help=help_text)


for _name, (_options, _help) in TASKS.items():
    command.add_command(_task_command(_name, _options, _help))

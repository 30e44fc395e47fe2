"""Helpers the subcommands share: loading an experiment with clear errors, consoles, exits."""

from __future__ import annotations

import json
import sys

import click
from rich.console import Console

from maelflow.config.errors import ConfigError
from maelflow.config.loader import ResolvedExperiment, load_experiment
from maelflow.workspace import Workspace

console = Console()
err_console = Console(stderr=True)

experiment_argument = click.argument("experiment")
overrides_argument = click.argument("overrides", nargs=-1)


def print_problems(err: ConfigError, as_json: bool = False) -> None:
    if as_json:
        click.echo(json.dumps({"valid": False, "problems": [p.to_json() for p in err.problems]}, indent=2))
        return
    err_console.print(f"[bold red]invalid configuration[/]: {len(err.problems)} problem(s)")
    for p in err.problems:
        err_console.print(f"  [bold]{p.file}[/]: [cyan]{p.field or '<top>'}[/] = {p.value!r}: {p.reason}",
                          highlight=False, markup=True, soft_wrap=True)


def load_or_exit(experiment: str, overrides: tuple[str, ...], ws: Workspace, as_json: bool = False) -> ResolvedExperiment:
    try:
        from maelflow.placeholders import placeholders_for

        return load_experiment(experiment, list(overrides), placeholders=placeholders_for(ws))
    except ConfigError as err:
        print_problems(err, as_json)
        sys.exit(2)


def fail(message: str, code: int = 1, hint: str | None = None) -> None:
    """``message`` as written: a credential error's ``[file]`` is text, not markup."""
    from rich.markup import escape

    err_console.print(f"[bold red]error[/]: {escape(message)}", highlight=False)
    if hint and hint not in message:
        err_console.print(f"[bold]hint[/]: {escape(hint)}", highlight=False)
    sys.exit(code)


def exit_with(exc: BaseException) -> None:
    """A maelflow (or transfer, or catalogue) error: its message, its hint, its exit status."""
    from maelflow.errors import exit_code_of, hint_of

    if isinstance(exc, ConfigError):
        print_problems(exc)
        sys.exit(exc.exit_code)
    message = getattr(exc, "message", None) or str(exc)
    fail(message, exit_code_of(exc), hint_of(exc))

"""The ``maelflow`` command: one group, one small module per subcommand, registered here only.

A subcommand whose optional dependency is missing still lists itself and says what to install,
instead of breaking the whole CLI.
"""

from __future__ import annotations

import importlib
import sys

import click

from maelflow import __version__

# name -> module under maelflow.cli exporting a click command or group called ``command``
COMMANDS: dict[str, str] = {
    "validate": "validate",
    "build": "build",
    "deploy": "deploy",
    "demo": "demo",
    "status": "status",
    "suspend": "control",
    "resume": "control",
    "requeue": "control",
    "kill": "control",
    "services": "services",
    "job": "job",
    "task": "task",
    "report": "report",
    "relay": "relay",
    "transfer": "transfer",
    "catalogue": "catalogue",
    "lineage": "lineage",
    "benchmark": "benchmark",
    "model": "model",
    "site": "site",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        module_name = COMMANDS.get(name)
        if module_name is None:
            return None
        try:
            module = importlib.import_module(f"maelflow.cli.{module_name}")
        except ImportError as exc:  # optional dependency missing: say so, don't break the CLI
            missing = exc.name or str(exc)

            @click.command(name=name, help=f"(unavailable: needs {missing})",
                           context_settings={"ignore_unknown_options": True})
            @click.argument("args", nargs=-1, type=click.UNPROCESSED)
            def unavailable(args: tuple[str, ...]) -> None:
                raise click.ClickException(
                    f"'maelflow {name}' needs the Python package '{missing}': "
                    f"install it into maelflow's environment (pip install {missing})")

            return unavailable
        cmd = getattr(module, "commands", {}).get(name) or getattr(module, "command")
        return cmd

    def invoke(self, ctx: click.Context):
        """The one place a maelflow error becomes a message, its hint and an exit status."""
        from maelflow.errors import HANDLED

        try:
            return super().invoke(ctx)
        except HANDLED as exc:
            from maelflow.cli.common import exit_with

            exit_with(exc)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="maelflow")
def cli() -> None:
    """Build, deploy and watch ecFlow suites for weather ML training on EuroHPC sites."""


def main(argv: list[str] | None = None) -> None:
    cli.main(args=argv, prog_name="maelflow")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

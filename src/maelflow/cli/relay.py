"""maelflow relay run: replay relay spools of remote sites to the ecFlow server (runs as a service)."""

from __future__ import annotations

import logging

import click

from maelflow.cli.options import resolve_workspace, workspace_option


@click.group("relay")
def command() -> None:
    """The relay between sites' spools and the ecFlow server (started by 'maelflow services up')."""


@command.command("run")
@workspace_option
@click.option("--interval", type=float, default=2.0, show_default=True, help="Seconds between polls.")
@click.option("--once", is_flag=True, help="Replay what is there now and exit.")
def run(workspace: str | None, interval: float, once: bool) -> None:
    """Poll every relay-mode site of every deployed suite and replay new child commands."""
    from maelflow.relay_loop import relay_forever

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    relay_forever(resolve_workspace(workspace), interval=interval, once=once)

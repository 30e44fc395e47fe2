"""maelflow report: a job's child command written to the site's relay spool.

Called by the job header in relay mode with ecflow_client's own options
(``maelflow report --meter=progress 5``); kept light because it runs once per command.
"""

from __future__ import annotations

import os
import sys

import click


@click.command("report", context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.argument("argv", nargs=-1, type=click.UNPROCESSED)
def command(argv: tuple[str, ...]) -> None:
    """Append a child command (--init, --meter, --label, --event, --complete, --abort) to the spool."""
    from maelflow.spool import append, from_env, parse_ecflow_client_args

    spool = os.environ.get("MAELFLOW_SPOOL")
    if not spool or not os.environ.get("ECF_NAME"):
        click.echo("maelflow report: MAELFLOW_SPOOL and ECF_NAME must be set (inside a suite job)", err=True)
        sys.exit(2)
    try:
        cmd, args = parse_ecflow_client_args(list(argv))
    except ValueError as exc:
        click.echo(f"maelflow report: {exc}", err=True)
        sys.exit(2)
    append(spool, from_env(cmd, args))

"""maelflow site: install the site part of maelflow on an HPC site (setup), and check a site (check)."""

from __future__ import annotations

import json
import sys

import click

from maelflow.cli.options import resolve_workspace, workspace_option

override_option = click.option("-o", "--override", "overrides", multiple=True, metavar="FIELD=VALUE",
                               help="Override a field of the site, e.g. -o internet.login=false.")


def _load(workspace: str | None, name: str, overrides: tuple[str, ...]):
    from maelflow.datasets.settings import load_site

    ws = resolve_workspace(workspace)
    return ws, load_site(name, ws, overrides)


@click.group("site")
def command() -> None:
    """Put maelflow's site part onto an HPC site, and check that a site is ready for a suite."""


@command.command("check")
@click.argument("site")
@override_option
@click.option("--json", "as_json", is_flag=True, help="One JSON document: ok, and every item.")
@click.option("--job/--no-job", default=True, show_default=True,
              help="Run a tiny job on a compute node (shared filesystem, site part, network).")
@click.option("--gpu", is_flag=True, help="Also run a tiny job on the GPU partition and look for a GPU there.")
@click.option("--job-timeout", type=float, default=300, show_default=True,
              help="Seconds a tiny job may take, queue included.")
@workspace_option
def check(site: str, overrides: tuple[str, ...], as_json: bool, job: bool, gpu: bool, job_timeout: float,
          workspace: str | None) -> None:
    """Check SITE item by item, with the fix for each failure; exit 1 when anything needed is missing."""
    from maelflow.sites.check import FAILED, OK, check_site

    ws, s = _load(workspace, site, overrides)
    ok, items = check_site(ws, site, s, job=job, gpu=gpu, job_timeout=job_timeout)
    if as_json:
        click.echo(json.dumps({"site": site, "ok": ok, "items": [i.to_json() for i in items]}, indent=2))
    else:
        from rich.console import Console
        from rich.markup import escape

        console = Console()
        mark = {OK: "[green]ok[/]", FAILED: "[bold red]FAILED[/]"}
        for i in items:
            console.print(f"{mark.get(i.status, '[yellow]warning[/]'):>8} [bold]{escape(i.name)}[/]: {escape(i.detail)}",
                          highlight=False, soft_wrap=True)
            if i.fix and i.status != OK:
                console.print(f"         fix: {escape(i.fix)}", highlight=False, soft_wrap=True)
        console.print(f"site {site}: " + ("[green]ready[/]" if ok else "[bold red]not ready[/]"), highlight=False)
    sys.exit(0 if ok else 1)


@command.command("setup")
@click.argument("site")
@override_option
@click.option("--force", is_flag=True, help="Install again even when the record says it is up to date.")
@click.option("--json", "as_json", is_flag=True, help="Print the outcome as JSON.")
@workspace_option
def setup(site: str, overrides: tuple[str, ...], force: bool, as_json: bool, workspace: str | None) -> None:
    """Install the site part into a virtual environment under SITE's root (no root needed)."""
    from maelflow.sites.setup import setup_site

    ws, s = _load(workspace, site, overrides)
    say = (lambda text: click.echo(text, err=True)) if as_json else click.echo
    outcome = setup_site(ws, site, s, force=force, say=say)
    if as_json:
        click.echo(json.dumps(outcome, indent=2, sort_keys=True))
        return
    if outcome["status"] == "local":
        click.echo(outcome["message"])
    if outcome.get("note"):
        click.echo(f"note: {outcome['note']}")


@command.command("info")
@click.option("--json", "as_json", is_flag=True, help="As JSON (what check, setup and deploy read).")
def info(as_json: bool) -> None:
    """What this installation is: maelflow's version and code digest, Python, architecture, torch."""
    from maelflow.sites.setup import describe

    data = describe()
    if as_json:
        click.echo(json.dumps(data, sort_keys=True))
    else:
        for k, v in data.items():
            click.echo(f"{k}: {v}")

"""``maelflow services up|status|down``: start, inspect and stop the embedded stack of a workspace."""

from __future__ import annotations

import json

import click

from maelflow.cli.options import resolve_workspace, workspace_option
from maelflow.services import stack
from maelflow.services.base import ServiceError, ServiceInfo

json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")


SECRET_KEYS = ("secret_key",)


def _public(info: ServiceInfo, show_secrets: bool) -> dict:
    data = info.to_json()
    if not show_secrets:
        for part in (data, *(data.get("roles") or {}).values()):   # the S3 service's keys per role too
            for key in SECRET_KEYS:
                if key in part:
                    part[key] = "*** (--show-secrets, or read the workspace's s3/credentials.json)"
    return data


def _print(infos: dict[str, ServiceInfo], as_json: bool, title: str, show_secrets: bool = False) -> None:
    if as_json:
        click.echo(json.dumps({name: _public(info, show_secrets) for name, info in infos.items()}, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for column in ("service", "healthy", "url", "pid"):
        table.add_column(column, no_wrap=True)
    table.add_column("log", overflow="fold")
    for name, info in infos.items():
        healthy = "[green]yes[/]" if info.healthy else ("[yellow]no[/]" if info.running else "[red]stopped[/]")
        if info.extra.get("mode") == "external":  # the log column says what the check found
            healthy = "[green]external[/]" if info.healthy else "[red]external: failing[/]"
            table.add_row(name, healthy, info.url or "-", "-", info.detail)
            continue
        table.add_row(name, healthy, info.url or "-", str(info.pid or "-"), info.log or "-")
    Console().print(table)


def _run(action):
    try:
        return action()
    except ServiceError as exc:  # a message that says what to do, not a traceback
        raise click.ClickException(str(exc)) from None


@click.group(name="services")
def command() -> None:
    """Start, inspect and stop the embedded services (ecFlow, S3, MLflow, relay; loopback HPC) on 127.0.0.1."""


@command.command()
@workspace_option
@json_option
@click.option("--with", "extra", multiple=True, metavar="NAME",
              help="Also start an optional service (repeatable), e.g. --with hpc.")
@click.option("--with-hpc", "with_hpc", is_flag=True,
              help="Also start the loopback HPC site (sshd + single-node SLURM) for trying sites; "
                   "it comes with maelflow-sandbox.")
def up(workspace: str | None, as_json: bool, extra: tuple[str, ...], with_hpc: bool) -> None:
    """Start every service that is not running (idempotent)."""
    ws = resolve_workspace(workspace)
    extra = extra + (("hpc",) if with_hpc else ())
    progress = None if as_json else (lambda name: click.echo(f"starting {name} ...", err=True))
    infos = _run(lambda: stack.up(ws, extra=extra, on_start=progress))
    _print(infos, as_json, f"services in {ws.root}")


@command.command()
@workspace_option
@json_option
@click.option("--show-secrets", is_flag=True, help="Include secret keys in --json output.")
def status(workspace: str | None, as_json: bool, show_secrets: bool) -> None:
    """Show each service's health, URL, PID and log file."""
    ws = resolve_workspace(workspace)
    infos = _run(lambda: stack.status(ws))
    _print(infos, as_json, f"services in {ws.root}", show_secrets)
    # an external service (the services profile) is never merely "stopped": it must answer
    broken = {n: i for n, i in infos.items() if i.extra.get("mode") == "external" and not i.healthy}
    for name, info in broken.items():
        click.echo(f"{name}: {info.detail}", err=True)
    if broken:
        raise SystemExit(1)


@command.command()
@workspace_option
@click.argument("profile")
def use(workspace: str | None, profile: str) -> None:
    """Use the services profile PROFILE (configs/services/PROFILE.yaml or a path; 'embedded': the
    workspace's own services) for every command and suite task of this workspace."""
    from maelflow.cli.common import exit_with
    from maelflow.config.errors import ConfigError
    from maelflow.services import profile as profiles

    ws = resolve_workspace(workspace)
    try:
        chosen = profiles.use(ws, profile)
    except ConfigError as exc:
        exit_with(exc)
    external = chosen.external()
    click.echo(f"{ws.root}: services profile '{chosen.name}'; external: {', '.join(external) or 'none'}; "
               "check them with 'maelflow services status'")


@command.command()
@workspace_option
@json_option
def down(workspace: str | None, as_json: bool) -> None:
    """Stop the services this workspace started (by PID, in reverse order)."""
    ws = resolve_workspace(workspace)
    infos = _run(lambda: stack.down(ws))
    if as_json:
        _print(infos, True, "")
        return
    for name, info in infos.items():
        click.echo(f"{name}: {info.detail}")
    if any(info.running for info in infos.values()):
        raise click.ClickException("some services did not stop; see the messages above")

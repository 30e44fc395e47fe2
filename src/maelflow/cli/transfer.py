"""maelflow transfer: publish a zarr to the EWC, stage it to a site, verify a staged copy, run a worker.

The EWC endpoint, keys and bucket come from the workspace's S3 service (or a site's
``.maelflow/ewc.json``), sites from ``configs/sites/``: no endpoint or bucket flags to repeat.
"""

from __future__ import annotations

import json
import sys

import click

from maelflow.cli.options import resolve_workspace, workspace_option

_consoles: dict[bool, object] = {}


def _console(stderr: bool = False):
    """rich's Console, made on first use: not maelflow.cli.common's (importing it loads the config
    models, pydantic, a tenth of a second), and not at import either (rich.console is another 16 ms
    that ``stage --json`` on a login node, started once per dataset, never needs)."""
    if stderr not in _consoles:
        from rich.console import Console

        _consoles[stderr] = Console(stderr=stderr)
    return _consoles[stderr]

site_option = click.option("--site", "site_name", default=None, help="Site name (configs/sites/SITE.yaml).")
override_option = click.option("-o", "--override", "overrides", multiple=True, metavar="FIELD=VALUE",
                               help="Override a field of the site, e.g. -o internet.login=false.")
workers_option = click.option("--workers", type=click.IntRange(1, 256), default=None,
                              help="Objects transferred at once [default: 16 for a pull and a publish; for a push, "
                              "rsync streams: 4].")


def _fail(exc: Exception, as_json: bool = False) -> None:
    if as_json:
        data = {"error": str(exc), "kind": type(exc).__name__}
        if getattr(exc, "key", None):
            data["key"] = exc.key
        click.echo(json.dumps(data))
    else:
        from rich.markup import escape

        _console(stderr=True).print(f"[bold red]error[/]: {escape(str(exc))}", highlight=False, soft_wrap=True)
    sys.exit(1)


def _site(ws, name: str | None, overrides: tuple[str, ...]):
    from maelflow.datasets.settings import load_site

    return load_site(name, ws, overrides) if name else None


@click.group("transfer")
def command() -> None:
    """Move datasets: publish to the European Weather Cloud, stage to sites, verify."""


@command.command("publish")
@click.argument("zarr", type=click.Path(file_okay=False))
@click.option("--dataset", default=None, help="Dataset name; default: the folder's name without .zarr.")
@click.option("--prefix", default=None, help="Key prefix in the bucket; default: the dataset config's or "
              "datasets/NAME.zarr.")
@click.option("--replace", is_flag=True, help="Replace a dataset already published with other content.")
@workers_option
@workspace_option
def publish(zarr: str, dataset: str | None, prefix: str | None, replace: bool, workers: int | None,
            workspace: str | None) -> None:
    """Publish the dataset folder ZARR to the EWC object store (manifest written last)."""
    workers = workers or 16
    from pathlib import Path

    from maelflow.datasets import catalogue_hook as hook
    from maelflow.datasets.settings import dataset_prefix, ewc_settings, open_store
    from maelflow_transfer.errors import TransferError
    from maelflow_transfer.progress import Progress, RichBar
    from maelflow_transfer.publish import publish as do_publish

    ws = resolve_workspace(workspace)
    source = Path(zarr).absolute()
    name = dataset or source.name.removesuffix(".zarr")
    try:
        prefix = prefix or dataset_prefix(name, ws)
        store = open_store(ewc_settings(ws), prefix)
        with RichBar(f"publish {name}", console=_console(stderr=True)) as bar:
            res = do_publish(source, name, store, workers=workers, progress=Progress([bar.sink]), replace=replace)
    except TransferError as exc:
        _fail(exc)
    _console().print(f"published [bold]{name}[/] at {store.url}: {res.summary()}", highlight=False, soft_wrap=True)
    try:
        hook.register_location(ws, name, hook.EWC_PLATFORM, store.url)
        _console().print(f"catalogue: {name} located at {hook.EWC_PLATFORM} = {store.url}", highlight=False,
                         soft_wrap=True)
    except hook.CatalogueUnavailable as exc:
        _console(stderr=True).print(f"catalogue: not updated ({exc})", highlight=False, soft_wrap=True)


@command.command("stage")
@click.argument("dataset")
@site_option
@click.option("--dest", default=None, help="Destination folder; default: the site's datasets folder/DATASET.zarr.")
@click.option("--via", type=click.Choice(["auto", "here", "login", "push", "sftp"]), default="auto", show_default=True,
              help="here: this machine writes; login: pull on the site's login node over SSH; push (or its "
              "former name sftp): pull here and push by rsync over SSH; auto: by the site's connection and "
              "internet.login.")
@click.option("--prefix", default=None, help="Key prefix in the bucket (default from the dataset config).")
@click.option("--from", "source", default=None, metavar="DIR",
              help="Read the objects from this local copy (checked against the published manifest) "
              "instead of the store: a push from where the dataset was built.")
@click.option("--credentials", default=None, help="EWC credentials file (default: workspace or site).")
@click.option("--max-rate", type=float, default=None, help="Bytes per second at most.")
@click.option("--json", "as_json", is_flag=True, help="JSON lines on stdout instead of a progress bar.")
@click.option("--no-register", is_flag=True, help="Do not record the new location in the catalogue.")
@override_option
@workers_option
@workspace_option
def stage(dataset: str, site_name: str | None, dest: str | None, via: str, prefix: str | None,
          source: str | None, credentials: str | None, max_rate: float | None, as_json: bool, no_register: bool,
          overrides: tuple[str, ...], workers: int | None, workspace: str | None) -> None:
    """Stage the published DATASET to a site (resumable, verified, visible only when complete)."""
    from maelflow_transfer.errors import TransferError
    from maelflow_transfer.progress import RichBar, json_sink
    from maelflow.datasets.stage import stage_dataset

    ws = resolve_workspace(workspace)
    try:
        site = _site(ws, site_name, overrides)
        if as_json:
            res, where, how = stage_dataset(ws, dataset, site_name=site_name, site=site, dest=dest, prefix=prefix,
                                            via=via, credentials=credentials, sinks=[json_sink()],
                                            workers=workers, max_rate=max_rate, source=source)
        else:
            with RichBar(f"stage {dataset}", console=_console(stderr=True)) as bar:
                res, where, how = stage_dataset(ws, dataset, site_name=site_name, site=site, dest=dest,
                                                prefix=prefix, via=via, credentials=credentials,
                                                sinks=[bar.sink], workers=workers, max_rate=max_rate,
                                                source=source)
    except TransferError as exc:
        _fail(exc, as_json)
    if as_json:
        click.echo(json.dumps({"result": res.__dict__, "dest": where, "via": how}))
        return
    _console().print(f"staged [bold]{dataset}[/] at {where} ({how}): {res.summary()}", highlight=False, soft_wrap=True)
    if site_name and not no_register:
        from maelflow.datasets import catalogue_hook as hook

        try:
            hook.register_location(ws, dataset, site_name, where)
            _console().print(f"catalogue: {dataset} located at {site_name} = {where}", highlight=False, soft_wrap=True)
        except hook.CatalogueUnavailable as exc:
            _console(stderr=True).print(f"catalogue: not updated ({exc})", highlight=False, soft_wrap=True)


@command.command("verify")
@click.argument("dataset")
@site_option
@click.option("--dest", default=None, help="The staged folder; default: the site's datasets folder/DATASET.zarr.")
@click.option("--prefix", default=None, help="Key prefix in the bucket (default from the dataset config).")
@click.option("--here", is_flag=True, help="The copy is on this machine (you are on the site).")
@override_option
@workspace_option
def verify(dataset: str, site_name: str | None, dest: str | None, prefix: str | None, here: bool,
           overrides: tuple[str, ...], workspace: str | None) -> None:
    """Check every object of a staged DATASET against the published manifest (exit 1 if any differs)."""
    from maelflow_transfer.errors import TransferError
    from maelflow.datasets.stage import verify_dataset

    ws = resolve_workspace(workspace)
    try:
        site = _site(ws, site_name, overrides)
        manifest, bad, extra, where = verify_dataset(ws, dataset, site_name=site_name, site=site, dest=dest,
                                                     prefix=prefix, via="here" if here else "auto")
    except TransferError as exc:
        _fail(exc)
    if bad:
        shown = ", ".join(bad[:10]) + (f" and {len(bad) - 10} more" if len(bad) > 10 else "")
        _fail(RuntimeError(f"{where}: {len(bad)} of {len(manifest.entries)} objects missing or wrong: {shown}"))
    note = f"; {len(extra)} files not in the manifest" if extra else ""
    _console().print(f"{where}: all {len(manifest.entries)} objects match the manifest "
                  f"({manifest.total_bytes / 2**20:.1f} MiB){note}", highlight=False, soft_wrap=True)


@command.command("worker")
@site_option
@click.option("--once", is_flag=True, help="Stop when no task is queued instead of waiting for more.")
@click.option("--poll", type=float, default=5.0, show_default=True, help="Seconds between looks at the queue.")
@click.option("--max-tasks", type=int, default=None, help="Stop after this many tasks.")
@override_option
@workers_option
@workspace_option
def worker(site_name: str | None, once: bool, poll: float, max_tasks: int | None, overrides: tuple[str, ...],
           workers: int | None, workspace: str | None) -> None:
    """Carry out the transfer-dataset tasks queued in the catalogue for --site."""
    from maelflow_transfer.errors import TransferError
    from maelflow.datasets.worker import run_worker

    if not site_name:
        _fail(RuntimeError("--site is required: the worker takes the tasks whose destination is that site"))
    ws = resolve_workspace(workspace)
    try:
        site = _site(ws, site_name, overrides)
        n = run_worker(ws, site_name, site, once=once, poll=poll, max_tasks=max_tasks, workers=workers,
                       log=lambda m: _console().print(m, highlight=False, soft_wrap=True))
    except TransferError as exc:
        _fail(exc)
    _console().print(f"worker for {site_name}: {n} task(s) done", highlight=False, soft_wrap=True)

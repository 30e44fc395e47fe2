"""``maelflow catalogue serve|token|settings|rebuild-index|reconcile|client-config``: run and administer the catalogue.

The service itself is the ``maelflow_registry`` library (``registry/``), given its files and S3 store
by ``maelflow.services.catalogue``; these commands are thin.
``serve`` runs in the foreground (``maelflow services up`` starts it in the background). Tokens and
settings are files of the workspace, so they can be managed whether or not the server runs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import click

from maelflow.cli.options import resolve_workspace, workspace_option
from maelflow.services.base import ServiceError

ROLES = ("read", "write", "admin")


def _fail(exc: Exception) -> None:
    raise click.ClickException(str(exc)) from None


@click.group(name="catalogue")
def command() -> None:
    """The catalogue of datasets, trainings, checkpoints, models and tasks (an anemoi-registry server)."""


@command.command()
@workspace_option
@click.option("--port", type=int, default=None, help="Port on 127.0.0.1 (default: the workspace's, or a free one).")
@click.option("--workers", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Server processes behind the one port (share a PostgreSQL index: --index).")
@click.option("--index", default=None, envvar="MAELFLOW_CATALOGUE_INDEX", metavar="URL",
              help="postgresql:// connection string of the index (password in a passfile: "
                   "...?passfile=FILE); default SQLite in the workspace [env MAELFLOW_CATALOGUE_INDEX].")
def serve(workspace: str | None, port: int | None, workers: int, index: str | None) -> None:
    """Run the catalogue in the foreground on 127.0.0.1 (S3 must be up: maelflow services up)."""
    from maelflow.services.catalogue import CatalogueService, serve as run

    ws = resolve_workspace(workspace)
    try:
        run(ws, port or CatalogueService(ws).port(), workers=workers, index=index or None)
    except ServiceError as exc:
        _fail(exc)


@command.group()
def token() -> None:
    """Create, list and revoke bearer tokens (read, write, admin)."""


@token.command("create")
@workspace_option
@click.option("--role", type=click.Choice(ROLES), required=True, help="What the token may do.")
@click.option("--name", default=None, help="A name to recognise (and revoke) it by.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def token_create(workspace: str | None, role: str, name: str | None, as_json: bool) -> None:
    """Make a token and print it once; only its SHA-256 is kept."""
    from maelflow.workspace import catalogue_paths
    from maelflow_registry.auth import TokenStore

    secret, info = TokenStore(catalogue_paths(resolve_workspace(workspace))).create(role, name)
    if as_json:
        click.echo(json.dumps({"token": secret, "id": info.id, "name": info.name, "role": info.role}))
        return
    click.echo(secret)
    click.echo(f"(id {info.id}, name {info.name}, role {info.role}: shown once, store it now)", err=True)


@token.command("revoke")
@workspace_option
@click.argument("which")
def token_revoke(workspace: str | None, which: str) -> None:
    """Revoke tokens by id, name, or the token itself."""
    from maelflow.workspace import catalogue_paths
    from maelflow_registry.auth import TokenStore

    gone = TokenStore(catalogue_paths(resolve_workspace(workspace))).revoke(which)
    if not gone:
        raise click.ClickException(f"no token has the id or name '{which}' (see: maelflow catalogue token list)")
    for info in gone:
        click.echo(f"revoked {info.id} ({info.name}, {info.role})")


@token.command("list")
@workspace_option
def token_list(workspace: str | None) -> None:
    """The tokens (never their secrets)."""
    from maelflow.workspace import catalogue_paths
    from maelflow_registry.auth import TokenStore

    for info in TokenStore(catalogue_paths(resolve_workspace(workspace))).list():
        click.echo(f"{info.id}  {info.role:<5}  {info.name}  {info.created}")


@command.command()
@workspace_option
@click.option("--anonymous-read/--no-anonymous-read", default=None, help="Allow reads without a token.")
@click.option("--dataset-naming", type=click.Choice(("anemoi", "relaxed")), default=None,
              help="Enforce anemoi-datasets' naming convention on new datasets, or only the key syntax.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def settings(workspace: str | None, anonymous_read: bool | None, dataset_naming: str | None, as_json: bool) -> None:
    """Show or change the catalogue's settings (a running server picks changes up at once)."""
    from maelflow.workspace import catalogue_paths
    from maelflow_registry.config import load_settings, save_settings

    paths = catalogue_paths(resolve_workspace(workspace))
    current = load_settings(paths)
    if anonymous_read is not None:
        current.anonymous_read = anonymous_read
    if dataset_naming is not None:
        current.dataset_naming = dataset_naming
    if anonymous_read is not None or dataset_naming is not None:
        save_settings(paths, current)
    data = current.to_json()
    if as_json:
        click.echo(json.dumps(data, indent=2))
    else:
        for k, v in data.items():
            click.echo(f"{k} = {v}")


@command.command("rebuild-index")
@workspace_option
def rebuild_index(workspace: str | None) -> None:
    """Rebuild the index from the S3 documents (safe while the server runs: one transaction)."""
    from maelflow.services.catalogue import open_catalogue

    try:
        catalogue = open_catalogue(resolve_workspace(workspace), rebuild=False)
        count = catalogue.rebuild()
    except ServiceError as exc:
        _fail(exc)
    click.echo(f"{catalogue.index.location}: {count} entries from s3://{catalogue.store.bucket}")


@command.command("reconcile")
@workspace_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def reconcile(workspace: str | None, as_json: bool) -> None:
    """Compare the index with S3's listing now, as the server does every reconcile_seconds: drop
    entries whose document is gone from S3, index documents it lacks (safe while the server runs)."""
    from maelflow.services.catalogue import open_catalogue

    try:
        catalogue = open_catalogue(resolve_workspace(workspace), rebuild=False)
        found = catalogue.reconcile()
    except ServiceError as exc:
        _fail(exc)
    if as_json:
        click.echo(json.dumps({"index": catalogue.index.location, "bucket": catalogue.store.bucket, **found}))
        return
    click.echo(f"{catalogue.index.location}: {found['lost']} entries dropped (gone from S3), "
               f"{found['added']} added (found in S3) against s3://{catalogue.store.bucket}")


@command.command("client-config")
@workspace_option
@click.option("--role", type=click.Choice(ROLES), default="write", show_default=True,
              help="Role of the token made for the client (unless --token is given).")
@click.option("--token", "given", default=None, help="Use this token instead of making one.")
@click.option("--dir", "target", type=click.Path(file_okay=False), default=None,
              help="Where to write settings.toml (default: ~/.config/anemoi).")
@click.option("--allow-delete", is_flag=True, help="Let the client unregister entries and delete data.")
def client_config(workspace: str | None, role: str, given: str | None, target: str | None, allow_delete: bool) -> None:
    """Point the anemoi-registry client at this workspace's catalogue and S3 (writes its settings files)."""
    from maelflow.workspace import catalogue_paths
    from maelflow.services.stack import discover
    from maelflow_registry.auth import TokenStore

    ws = resolve_workspace(workspace)
    try:
        catalogue, s3 = discover(ws, "catalogue"), discover(ws, "s3")
    except ServiceError as exc:
        _fail(exc)
    if not given and catalogue.extra.get("mode") == "external":  # its tokens live on its own host
        _fail(ServiceError(f"the catalogue is external ({catalogue.url}): make a {role} token on its host "
                           f"(maelflow catalogue token create --role {role}) and pass it with --token"))
    secret = given or TokenStore(catalogue_paths(ws)).create(role, name=f"anemoi-client-{role}")[0]
    folder = Path(target or os.path.join(os.path.expanduser("~"), ".config", "anemoi"))
    write_client_config(folder, catalogue.url, secret, client_s3(s3.extra, role), allow_delete)
    click.echo(f"wrote {folder / 'settings.toml'} and {folder / 'settings.secrets.toml'} (mode 0600)")
    click.echo("the client's S3 library refuses plain-http endpoints unless you also: export AWS_ALLOW_HTTP=true")


def client_s3(extra: dict, role: str) -> dict:
    """The S3 keys a client of ``role`` gets: a reader the read-only keys to the datasets, a writer
    (and admin: ``anemoi-registry datasets --upload``) the datasets writer's; never the catalogue's."""
    from maelflow.s3 import settings_from_service

    return settings_from_service(extra, "read" if role == "read" else "write")


def write_client_config(folder: Path, url: str, token: str, s3: dict, allow_delete: bool = False) -> None:
    """anemoi-registry 0.3.4 reads [registry] and [object-storage] from these two files."""
    from maelflow.workspace import write_atomic

    folder.mkdir(parents=True, exist_ok=True)
    public = (f'[registry]\ncatalogue = "{url}"\n' + ("allow_delete = true\n" if allow_delete else "") +
              f'\n[object-storage]\nendpoint_url = "{s3["endpoint_url"]}"\nregion = "{s3.get("region", "us-east-1")}"\n')
    secrets = (f'[registry]\napi_token = "{token}"\n\n[object-storage]\naccess_key_id = "{s3["access_key"]}"\n'
               f'secret_access_key = "{s3["secret_key"]}"\n')
    write_atomic(folder / "settings.toml", public, mode=0o600)
    write_atomic(folder / "settings.secrets.toml", secrets, mode=0o600)

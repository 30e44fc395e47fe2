"""What a transfer needs from maelflow's configuration: a site, a dataset's key prefix, EWC settings.

The CLI names a site and a dataset, never an endpoint or a bucket: the site comes from
``configs/sites/SITE.yaml`` (with the workspace's placeholders, as ``maelflow build`` reads it),
the key prefix from ``configs/datasets/NAME.yaml`` when there is one, and the EWC endpoint, keys and
bucket from the workspace's S3 service, or from the site's ``.maelflow/ewc.json`` on a site.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from maelflow_transfer.errors import CredentialsError, TransferError


def _part(kind: str, name: str, ws, overrides: tuple[str, ...] = ()) -> dict | None:
    from maelflow.config.loader import apply_part_overrides, compose_file, default_config_root, expand_placeholders
    from maelflow.placeholders import placeholders_for

    path = default_config_root() / kind / f"{name}.yaml"
    if not path.is_file():
        return None
    data = compose_file(path, [])
    data, problems = apply_part_overrides(dict(data), tuple(overrides), str(path))
    if problems:
        raise TransferError("; ".join(f"{p.field}: {p.reason}" for p in problems))
    data.setdefault("name", name)
    return expand_placeholders(data, placeholders_for(ws))


def load_site(name: str, ws, overrides: tuple[str, ...] = ()):
    """The validated Site model of ``configs/sites/NAME.yaml`` (``overrides``: ``field.path=value``)."""
    from pydantic import ValidationError

    from maelflow.config.loader import default_config_root
    from maelflow.config.models import Site

    data = _part("sites", name, ws, overrides)
    if data is None:
        known = sorted(p.stem for p in (default_config_root() / "sites").glob("*.yaml"))
        raise TransferError(f"no site named {name!r} (configs/sites/{name}.yaml); known: {', '.join(known)}")
    unresolved = [v for v in json.dumps(data).split('"') if v.startswith("{hpc_")]
    if unresolved:
        from maelflow.placeholders import hint

        raise TransferError(f"site {name!r}: {hint('hpc_')}")
    try:
        return Site.model_validate(data)
    except ValidationError as exc:
        raise TransferError(f"site {name!r}: invalid configuration: {exc.errors()[0]['msg']}") from None


def dataset_prefix(name: str, ws) -> str:
    """The dataset's key prefix in the EWC bucket: its config's ``s3_prefix``, else datasets/NAME.zarr."""
    try:
        data = _part("datasets", name, ws)
    except Exception:  # noqa: BLE001 - an unreadable dataset file: fall back to the default layout
        data = None
    if data and data.get("s3_prefix"):
        return str(data["s3_prefix"]).strip("/")
    return f"datasets/{name}.zarr"


def default_dest(site, dataset: str) -> str:
    """Where a site keeps a staged dataset (the same path trainings read: training.launch.dataset_path)."""
    return f"{site.paths.datasets.rstrip('/')}/{dataset}.zarr"


def ewc_settings(ws, *, site=None, credentials: str | None = None, role: str = "write") -> dict[str, Any]:
    """EWC endpoint, keys, bucket: a credentials file if given, else the workspace's S3 service with
    the keys of ``role`` (``maelflow.ewc``: ``read`` for what is handed to a site or a reader,
    ``write`` for the workspace's own transfers) when it runs here, else the site's file (its
    read-only keys, for a job on the site).

    The workspace comes before the site's file: beside the server (where a loopback site's file may
    be readable too) the objects just published are read through the server that wrote them,
    which sees them at once; the read-only server sees them within ``READ_DIR_CACHE``
    (``maelflow.services.s3``)."""
    from maelflow import ewc
    from maelflow.services.base import ServiceError

    if credentials:
        try:
            return json.loads(Path(credentials).expanduser().read_text())
        except FileNotFoundError:
            raise CredentialsError(f"no EWC credentials at {credentials}: 'maelflow deploy' places them on a "
                                   "site, or write endpoint_url, access_key, secret_key and bucket there") from None
        except (OSError, ValueError) as exc:
            raise CredentialsError(f"cannot read the EWC credentials at {credentials}: {exc}") from None
    try:
        return workspace_s3(ws, role)
    except (ServiceError, OSError) as exc:   # OSError: another user's workspace (a job on a site)
        problem = exc
    if site is not None:
        found = ewc.site_settings(site.paths.root)
        if found:
            return found
    raise TransferError(f"the EWC object store is not configured here: {problem}") from None


def workspace_s3(ws, role: str = "write") -> dict[str, Any]:
    """The workspace's S3 service, as ``services.stack.s3_settings`` gives it, without its health check
    (a request through an S3 client); a TCP connect says it is up."""
    import socket
    from urllib.parse import urlsplit

    from maelflow.s3 import settings_from_service
    from maelflow.services.base import ServiceError
    from maelflow.services.stack import service

    from maelflow.services import profile

    if profile.is_external(ws, "s3"):  # the services profile's endpoint (the EWC): its keys, no check here
        return settings_from_service(profile.info(ws, "s3").extra, role)
    svc = service(ws, "s3")
    if not svc.running():
        raise ServiceError(f"the S3 service is not running in workspace {ws.root}: run 'maelflow services up'")
    settings = settings_from_service(svc.extra(), role)
    u = urlsplit(settings["endpoint_url"])
    try:
        socket.create_connection((u.hostname, u.port), timeout=2).close()
    except OSError as exc:
        raise ServiceError(f"the S3 service of workspace {ws.root} ({role} role) does not answer at "
                           f"{settings['endpoint_url']} ({exc}): run 'maelflow services up'") from None
    return settings


def open_store(settings: dict[str, Any], prefix: str):
    """The dataset ``prefix`` in the EWC bucket of ``settings`` (its S3 store from ``maelflow.s3``)."""
    from maelflow.s3 import object_store
    from maelflow_transfer.store import Store

    for field in ("endpoint_url", "access_key", "secret_key"):
        if not settings.get(field):
            raise CredentialsError(f"the EWC settings lack {field!r}")
    return Store(object_store(settings, prefix=prefix), endpoint=settings["endpoint_url"])

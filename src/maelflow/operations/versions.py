"""Model versions and aliases: the catalogue's record, checked sources, and the MLflow mirror.

Used by the gate task and by ``maelflow model``. Every change goes to the catalogue first (its
``models`` collection keeps versions immutable and every alias move in an append-only history),
then MLflow's registry is brought in line (:mod:`.mlflow_registry`); a mirror that fails is said,
never silently dropped, and the next change (or ``maelflow model mirror``) repairs it.

A version never names a source nobody checked (mlflow#4630): before a manual promotion the
checkpoint file is read where the catalogue says it lies, and its SHA-256 must be the one it was
registered with.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from maelflow.errors import ConfigurationError, MaelflowError, ServiceFailure
from maelflow.workspace import Workspace


class ModelError(MaelflowError):
    """A model change the catalogue or the evidence does not allow (the message says why)."""


@dataclass
class Source:
    """Where a checkpoint lies (site and path), and its content hash read there."""

    site: str
    path: str
    sha256: str
    size: int


def site_config(ws: Workspace, name: str):
    """The site ``name`` of the config root (configs/sites/<name>.yaml), placeholders expanded."""
    from maelflow.config.loader import compose_file, default_config_root, expand_placeholders
    from maelflow.config.models import Site
    from maelflow.placeholders import placeholders_for

    path = default_config_root() / "sites" / f"{name}.yaml"
    if not path.is_file():
        raise ConfigurationError(f"the checkpoint lies on site {name!r}, which has no config {path}",
                                 hint="run the command where the site's configs are (MAELFLOW_CONFIG_DIR)")
    data = expand_placeholders(compose_file(path, []), placeholders_for(ws))
    data.setdefault("name", name)
    return Site.model_validate(data)


def read_site_file(ws: Workspace, site_name: str, path: str, site=None) -> bytes | None:
    """The bytes of ``path`` on a site, through the site's connection (None when it is not there)."""
    from maelflow.sites.connections import connect

    conn = connect(site_name, site or site_config(ws, site_name))
    return conn.read_bytes(path) if conn.exists(path) else None


def check_source(ws: Workspace, weights: dict, site=None) -> tuple[Source, bytes]:
    """Read a registered checkpoint where its record says it lies; its content must match its hash."""
    registered = (weights.get("metadata") or {}).get("sha256")
    tried = []
    for site_name, where in sorted((weights.get("locations") or {}).items()):
        path = (where or {}).get("path")
        if not path:
            continue
        data = read_site_file(ws, site_name, path, site)
        if data is None:
            tried.append(f"{site_name}:{path} (missing)")
            continue
        digest = hashlib.sha256(data).hexdigest()
        if registered and digest != registered:
            raise ModelError(f"checkpoint {weights.get('uuid')} at {site_name}:{path} has SHA-256 {digest[:16]}..., "
                             f"not {registered[:16]}... as registered: the file changed; refusing to promote it")
        return Source(site_name, path, digest, len(data)), data
    raise ModelError(f"checkpoint {weights.get('uuid')} cannot be found where the catalogue says it lies: "
                     + (", ".join(tried) or "no location recorded"),
                     hint="register the checkpoint with its location (the suite's register task does)")


class Models:
    """Model changes through the catalogue client, each mirrored to MLflow's registry."""

    def __init__(self, ws: Workspace, client=None, tracking_uri: str | None = None, *, mirror: bool = True):
        self.ws = ws
        self._client = client
        self._tracking_uri = tracking_uri
        self.mirror_enabled = mirror
        self.notes: list[str] = []

    # -- plumbing --------------------------------------------------------------------------------
    @property
    def client(self):
        if self._client is None:
            from maelflow import catalogue
            from maelflow.services.base import ServiceError

            try:
                self._client = catalogue.client(self.ws)
            except ServiceError as exc:
                raise ServiceFailure(f"the catalogue is not reachable: {exc}",
                                     hint="maelflow services up (or --workspace)") from None
        return self._client

    def _call(self, fn, *args, **kwargs):
        from maelflow_registry.client import CatalogueClientError

        try:
            return fn(*args, **kwargs)
        except CatalogueClientError as exc:
            code = 2 if exc.status in (400, 404, 409, 422) else 1
            raise ModelError(exc.message, exit_code=code) from None

    def tracking_uri(self) -> str | None:
        if self._tracking_uri is None:
            from maelflow.services.base import ServiceError
            from maelflow.services.stack import discover

            try:
                self._tracking_uri = discover(self.ws, "mlflow").url
            except (ServiceError, OSError):
                return None
        return self._tracking_uri

    # -- reads -----------------------------------------------------------------------------------
    def list(self) -> list[dict]:
        return self._call(self.client.list, "models")

    def show(self, name: str) -> dict:
        return self._call(self.client.get, "models", name)

    def history(self, name: str, alias: str | None = None) -> dict:
        return self._call(self.client.model_history, name, alias)

    def resolve(self, name: str, alias: str, at: str | None = None) -> dict:
        return self._call(self.client.resolve_alias, name, alias, at)

    def weights(self, uuid: str) -> dict:
        return self._call(self.client.get, "weights", uuid)

    # -- changes ---------------------------------------------------------------------------------
    def promote(self, name: str, weights: str, *, alias: str | None, why: str | None = None,
                local_copy: bytes | None = None, **fields: Any) -> tuple[dict, int]:
        """A version of ``name`` from registered checkpoint ``weights`` (the same one again: no new version)."""
        record = self._call(self.client.promote, name, weights, alias=alias, why=why, **fields)
        number = int(record.pop("_promoted"))
        self.mirror(name, record, {str(number): local_copy} if local_copy else None)
        return record, number

    def move(self, name: str, alias: str, version: int, reason: str | None) -> dict:
        record = self._call(self.client.set_alias, name, alias, version, reason)
        self.mirror(name, record)
        return record

    def rollback(self, name: str, alias: str, version: int | None, reason: str | None) -> dict:
        record = self._call(self.client.rollback, name, alias, version, reason)
        self.mirror(name, record)
        return record

    def mirror(self, name: str, record: dict | None = None, copies: dict[str, bytes] | None = None) -> dict | None:
        """Bring MLflow's registry in line with the catalogue's record of ``name`` (notes on failure)."""
        from maelflow.operations.mlflow_registry import MirrorError, sync_model

        if not self.mirror_enabled:
            return None
        uri = self.tracking_uri()
        if uri is None:
            self.notes.append(f"MLflow is not reachable: model {name} not mirrored to its registry "
                              f"(run 'maelflow model mirror {name}' once it is)")
            return None
        record = record or self.show(name)
        tmp = Path(tempfile.mkdtemp(prefix="maelflow-mirror-"))

        def checkpoint_file(number: str, version: dict) -> Path | None:
            data = (copies or {}).get(number)
            where = version.get("checkpoint") or {}
            if data is None and where.get("site") and where.get("path"):
                try:
                    data = read_site_file(self.ws, where["site"], where["path"])
                except MaelflowError as exc:
                    self.notes.append(f"v{number}: checkpoint not attached in MLflow ({exc})")
            if data is None:
                return None
            target = tmp / os.path.basename(where.get("path") or f"{version.get('weights')}.ckpt")
            target.write_bytes(data)
            return target

        try:
            return sync_model(uri, record, checkpoint_file)
        except MirrorError as exc:
            self.notes.append(f"{exc} (run 'maelflow model mirror {name}' to retry)")
            return None
        finally:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)

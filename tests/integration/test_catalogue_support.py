"""Shared set-up of the catalogue integration tests (no tests here).

One workspace with the real rclone S3 server and the catalogue service is started once per test
session and index backend, whichever catalogue module asks first, and stopped (by PID, through the
stack) at the end. Starting only S3 and the catalogue (not ecFlow or MLflow) keeps the set-up at a
few seconds. The same tests run against both index backends (``BACKENDS``): SQLite, the embedded
default, and PostgreSQL, a real server of the workspace (``services up --with postgres``) behind a
catalogue of two worker processes, as in production.
"""

from __future__ import annotations

import http.client
import json
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

import obstore
import pytest
import requests

from maelflow.ewc import workspace_store
from maelflow.services import stack as stack_mod
from maelflow.workspace import catalogue_paths
from maelflow.workspace import Workspace
from maelflow_registry.auth import TokenStore
from maelflow_registry.client import CatalogueClient
from maelflow_registry.store import entry_object

_ENV: dict[str, "CatalogueEnv"] = {}
BACKENDS = ("sqlite", "postgres")


@dataclass
class CatalogueEnv:
    ws: Workspace
    url: str
    tokens: dict[str, str] = field(default_factory=dict)
    backend: str = "sqlite"

    def drop_index(self) -> None:
        """Delete the index of the stopped catalogue (its SQLite file, or its PostgreSQL tables)."""
        from maelflow.services.catalogue import index_location
        from maelflow_registry.server import open_index

        open_index(catalogue_paths(self.ws), index_location(self.ws)).drop()

    @property
    def api(self) -> str:
        return self.url + "/api/v1"

    def client(self, role: str | None = "admin") -> CatalogueClient:
        return CatalogueClient(self.url, self.tokens.get(role) if role else None)

    def headers(self, role: str | None) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[role]}"} if role else {}

    def s3_keys(self, bucket: str, prefix: str) -> list[str]:
        return [meta["path"] for meta in obstore.list(workspace_store(self.ws, bucket), prefix).collect()]

    def s3_bytes(self, bucket: str, key: str) -> bytes:
        return bytes(obstore.get(workspace_store(self.ws, bucket), key).bytes())

    def s3_entries(self) -> dict[str, str]:
        """Every entry document in S3: object key -> ETag (to show that nothing was written)."""
        return {meta["path"]: meta["e_tag"]
                for meta in obstore.list(workspace_store(self.ws, "catalogue"), "entries/").collect()}

    def s3_document(self, collection: str, key: str) -> dict:
        return json.loads(self.s3_bytes("catalogue", entry_object(collection, key)))

    def raw(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None
            ) -> tuple[int, Any]:
        """A request whose path is sent exactly as written (no client-side normalisation of '..')."""
        parsed = urllib.parse.urlsplit(self.url)
        conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=30)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            data = resp.read()
        finally:
            conn.close()
        try:
            return resp.status, json.loads(data)
        except ValueError:
            return resp.status, data.decode(errors="replace")

    def get(self, path: str, role: str | None = None, **kw) -> requests.Response:
        return requests.get(self.url + path, headers=self.headers(role), timeout=30, **kw)


def start_catalogue(ws: Workspace, backend: str, config: pytest.Config) -> dict:
    """S3 and the catalogue in ``ws`` (with PostgreSQL first for that backend), stopped at the end."""
    names = ["s3", "postgres", "catalogue"] if backend == "postgres" else ["s3", "catalogue"]

    def stop() -> None:
        stack_mod.down(ws)
        if backend == "postgres":
            from maelflow.services.postgres import PostgresService

            PostgresService(ws).forget()

    config.add_cleanup(stop)
    infos = stack_mod.up(ws, names=names)
    assert infos["catalogue"].extra["index"].startswith("postgresql://" if backend == "postgres" else "/")
    return infos


def shared_env(tmp_path_factory: pytest.TempPathFactory, config: pytest.Config, backend: str = "sqlite") -> CatalogueEnv:
    if backend not in _ENV:
        ws = Workspace(tmp_path_factory.mktemp(f"catalogue-ws-{backend}"))
        infos = start_catalogue(ws, backend, config)
        env = CatalogueEnv(ws, infos["catalogue"].url, backend=backend)
        store = TokenStore(catalogue_paths(ws))
        for role in ("read", "write", "admin"):
            env.tokens[role] = store.create(role, name=f"test-{role}")[0]
        _ENV[backend] = env
    return _ENV[backend]


def dataset_record(name: str, **metadata: Any) -> dict:
    md = {"uuid": f"uuid-{name}", "shape": [24, 3, 1, 40], "variables": ["2t", "msl", "tp"], "frequency": "6h",
          "resolution": "o96", "total_size": 123456, "total_number_of_files": 12,
          "statistics": {"mean": [1.0, 2.0, 3.0], "stdev": [1, 1, 1], "minimum": [0, 0, 0], "maximum": [9, 9, 9]}}
    md.update(metadata)
    return {"name": name, "metadata": md}


def dataset_name(tag: str, year: int = 2020) -> str:
    """A name that follows the anemoi naming convention the server enforces by default."""
    return f"aifs-ea-an-oper-0001-mars-o96-{year}-{year}-6h-v1-{tag}"

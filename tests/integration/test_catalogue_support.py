"""Shared set-up of the catalogue integration tests (no tests here).

One workspace with the real rclone S3 server and the catalogue service is started once per test
session, whichever catalogue module asks first, and stopped (by PID, through the stack) at the end.
Starting only S3 and the catalogue (not ecFlow or MLflow) keeps the set-up at a few seconds.
"""

from __future__ import annotations

import http.client
import json
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

import pytest
import requests

from maelflow.s3 import s3_client_for_workspace
from maelflow.services import stack as stack_mod
from maelflow.workspace import Workspace
from maelflow_registry.auth import TokenStore
from maelflow_registry.client import CatalogueClient
from maelflow_registry.config import Paths
from maelflow_registry.store import entry_object

_ENV: dict[str, "CatalogueEnv"] = {}


@dataclass
class CatalogueEnv:
    ws: Workspace
    url: str
    tokens: dict[str, str] = field(default_factory=dict)

    @property
    def api(self) -> str:
        return self.url + "/api/v1"

    def client(self, role: str | None = "admin") -> CatalogueClient:
        return CatalogueClient(self.url, self.tokens.get(role) if role else None)

    def headers(self, role: str | None) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[role]}"} if role else {}

    def s3(self):
        return s3_client_for_workspace(self.ws)

    def s3_entries(self) -> dict[str, str]:
        """Every entry document in S3: object key -> ETag (to show that nothing was written)."""
        s3 = self.s3()
        out = {}
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket="catalogue", Prefix="entries/"):
            for obj in page.get("Contents", []):
                out[obj["Key"]] = obj["ETag"]
        return out

    def s3_document(self, collection: str, key: str) -> dict:
        body = self.s3().get_object(Bucket="catalogue", Key=entry_object(collection, key))["Body"].read()
        return json.loads(body)

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


def shared_env(tmp_path_factory: pytest.TempPathFactory, config: pytest.Config) -> CatalogueEnv:
    if "env" not in _ENV:
        ws = Workspace(tmp_path_factory.mktemp("catalogue-ws"))
        config.add_cleanup(lambda: stack_mod.down(ws))
        infos = stack_mod.up(ws, names=["s3", "catalogue"])
        env = CatalogueEnv(ws, infos["catalogue"].url)
        store = TokenStore(Paths(ws))
        for role in ("read", "write", "admin"):
            env.tokens[role] = store.create(role, name=f"test-{role}")[0]
        _ENV["env"] = env
    return _ENV["env"]


def dataset_record(name: str, **metadata: Any) -> dict:
    md = {"uuid": f"uuid-{name}", "shape": [24, 3, 1, 40], "variables": ["2t", "msl", "tp"], "frequency": "6h",
          "resolution": "o96", "total_size": 123456, "total_number_of_files": 12,
          "statistics": {"mean": [1.0, 2.0, 3.0], "stdev": [1, 1, 1], "minimum": [0, 0, 0], "maximum": [9, 9, 9]}}
    md.update(metadata)
    return {"name": name, "metadata": md}


def dataset_name(tag: str, year: int = 2020) -> str:
    """A name that follows the anemoi naming convention the server enforces by default."""
    return f"aifs-ea-an-oper-0001-mars-o96-{year}-{year}-6h-v1-{tag}"

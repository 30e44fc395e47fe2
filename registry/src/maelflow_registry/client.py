"""A small Python client for the catalogue's users' own tasks (register trainings, checkpoints, locations).

It speaks the same REST API as the anemoi-registry client, plus the catalogue's extras (models,
lineage, artefacts, bulk). Errors come back as :class:`CatalogueClientError` carrying the server's
message. Finding a catalogue and a token is the caller's business (maelflow: ``maelflow.catalogue``).
"""

from __future__ import annotations

from typing import Any, Iterable

import requests


class CatalogueClientError(RuntimeError):
    def __init__(self, status: int, message: str, body: Any = None):
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message
        self.body = body


class CatalogueClient:
    def __init__(self, url: str, token: str | None = None, timeout: float = 30.0):
        self.url = url.rstrip("/")
        self.api = self.url + "/api/v1"
        self.timeout = timeout
        self.session = requests.Session()
        if token:
            self.session.headers["Authorization"] = f"Bearer {token}"

    # -- plumbing --------------------------------------------------------------------------------
    def _request(self, method: str, path: str, *, json_body: Any = None, params: dict | None = None,
                 headers: dict | None = None, data: bytes | None = None) -> requests.Response:
        url = path if path.startswith("http") else self.api + path
        resp = self.session.request(method, url, json=json_body, params=params, headers=headers, data=data,
                                    timeout=self.timeout)
        if resp.status_code >= 400:
            try:
                body = resp.json()
                message = body.get("message") or str(body)
            except ValueError:
                body, message = resp.text, resp.text[:500]
            raise CatalogueClientError(resp.status_code, message, body)
        return resp

    # -- entries ---------------------------------------------------------------------------------
    def settings(self) -> dict:
        return self._request("GET", self.url + "/settings").json()

    def list(self, collection: str, **filters: Any) -> list[dict]:
        return self._request("GET", f"/{collection}", params={k: str(v) for k, v in filters.items()}).json()

    def get(self, collection: str, key: str, hidden: bool = False) -> dict:
        return self._request("GET", f"/{collection}/{key}", params={"_": "1"} if hidden else None).json()

    def get_with_version(self, collection: str, key: str) -> tuple[dict, int]:
        resp = self._request("GET", f"/{collection}/{key}")
        return resp.json(), int(resp.headers["ETag"].strip('"'))

    def exists(self, collection: str, key: str) -> bool:
        try:
            self.get(collection, key)
            return True
        except CatalogueClientError as exc:
            if exc.status == 404:
                return False
            raise

    def create(self, collection: str, record: dict) -> dict:
        return self._request("POST", f"/{collection}", json_body=record).json()

    def replace(self, collection: str, key: str, record: dict, if_version: int | None = None) -> dict:
        headers = {"If-Match": f'"{if_version}"'} if if_version is not None else None
        return self._request("PUT", f"/{collection}/{key}", json_body=record, headers=headers).json()

    def patch(self, collection: str, key: str, ops: list[dict], if_version: int | None = None) -> dict:
        headers = {"If-Match": f'"{if_version}"'} if if_version is not None else None
        return self._request("PATCH", f"/{collection}/{key}", json_body=ops, headers=headers).json()

    def delete(self, collection: str, key: str) -> dict:
        return self._request("DELETE", f"/{collection}/{key}", params={"force": "True"}).json()

    def bulk_create(self, collection: str, records: Iterable[dict]) -> dict:
        return self._request("POST", f"/_bulk/{collection}", json_body=list(records)).json()

    # -- what maelflow's suite tasks register ----------------------------------------------------
    def add_location(self, collection: str, key: str, platform: str, path: str) -> dict:
        return self.patch(collection, key, [{"op": "add", "path": f"/locations/{platform}", "value": {"path": path}}])

    def register_training(self, name: str, *, run_id: str | None = None, datasets: Iterable[str] = (),
                          status: str = "running", owner: str | None = None, mlflow_url: str | None = None,
                          **extra: Any) -> dict:
        """Create or update a training (PUT, as the anemoi client does for trainings)."""
        record: dict[str, Any] = {"name": name, "status": status, "datasets": list(datasets), **extra}
        if run_id:
            record["run_id"] = run_id
        if owner:
            record["owner"] = owner
        if mlflow_url:
            record["mlflow_url"] = mlflow_url
        return self.replace("trainings", name, record)

    def register_checkpoint(self, uuid: str, metadata: dict, *, training: str | None = None,
                            location: tuple[str, str] | None = None) -> dict:
        """A checkpoint (weights) with its metadata (run_id, parent_uuid, dataset...); 409 if it exists."""
        record: dict[str, Any] = {"uuid": uuid, "metadata": metadata}
        if training:
            record["training"] = training
        if location:
            record["locations"] = {location[0]: {"path": location[1]}}
        return self.create("weights", record)

    def promote(self, model: str, weights: str, alias: str | None = None, description: str | None = None,
                why: str | None = None, **fields: Any) -> dict:
        """A new version of ``model`` from checkpoint ``weights`` (``_promoted`` in the answer: its number);
        ``fields``: what the version records (sha256, evaluation, gate, training, run_id, datasets,
        checkpoint, reason, mlflow)."""
        body = {"weights": weights, **({"alias": alias} if alias else {}),
                **({"description": description} if description else {}), **({"why": why} if why else {}),
                **{k: v for k, v in fields.items() if v is not None}}
        return self._request("POST", f"/models/{model}/versions", json_body=body).json()

    def set_alias(self, model: str, alias: str, version: int, reason: str | None = None) -> dict:
        body = {"version": version, **({"reason": reason} if reason else {})}
        return self._request("PUT", f"/models/{model}/aliases/{alias}", json_body=body).json()

    def rollback(self, model: str, alias: str, version: int | None = None, reason: str | None = None) -> dict:
        """Move ``alias`` back one step, or to ``version``; recorded in the model's history."""
        body = {**({"version": version} if version is not None else {}), **({"reason": reason} if reason else {})}
        return self._request("POST", f"/models/{model}/aliases/{alias}/rollback", json_body=body).json()

    def resolve_alias(self, model: str, alias: str, at: str | None = None) -> dict:
        return self._request("GET", f"/models/{model}/aliases/{alias}", params={"at": at} if at else None).json()

    def model_history(self, model: str, alias: str | None = None) -> dict:
        return self._request("GET", f"/models/{model}/history", params={"alias": alias} if alias else None).json()

    def lineage(self, ident: str, collection: str | None = None, depth: int = 4) -> dict:
        path = f"/lineage/{collection}/{ident}" if collection else f"/lineage/{ident}"
        return self._request("GET", path, params={"depth": depth}).json()

    def put_artefact(self, path: str, data: bytes, content_type: str = "application/octet-stream") -> dict:
        return self._request("PUT", f"/artefacts/{path}", data=data,
                             headers={"Content-Type": content_type}).json()

    def get_artefact(self, path: str) -> bytes:
        return self._request("GET", f"/artefacts/{path}").content


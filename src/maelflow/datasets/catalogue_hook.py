"""The transfer side of the catalogue: record where a dataset lives, take queued transfer tasks.

Talks to maelflow's catalogue service (``maelflow.catalogue.client``) with the task protocol
of anemoi-registry: a ``transfer-dataset`` task names ``dataset``, ``source`` (a platform holding
it, "ewc" for the object store) and ``destination`` (a site); a worker takes a ``queued`` one by
switching it to ``running`` (a versioned PATCH, so two workers never take the same task), reports
``progress`` ({"percentage": ...}) as it goes, then sets ``completed`` (or ``failed`` with the
reason) and adds the location to the dataset's entry. Where the catalogue is not installed or not
running, every call raises ``CatalogueUnavailable`` saying so.
"""

from __future__ import annotations

import getpass
import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from maelflow_transfer.errors import TransferError

EWC_PLATFORM = "ewc"
ACTION = "transfer-dataset"


class CatalogueUnavailable(TransferError):
    """No catalogue to talk to (not installed, not running, or refusing us)."""


@dataclass
class TransferTask:
    uuid: str
    dataset: str
    source: str
    destination: str
    record: dict


def client(ws, site_root: str | None = None):
    """A catalogue client: ``<site root>/.maelflow/catalogue.json`` (url, token) when readable here,
    else the workspace's running catalogue service."""
    try:
        from maelflow import catalogue
        from maelflow_registry.client import CatalogueClient
    except ImportError as exc:
        raise CatalogueUnavailable(f"the catalogue client is not installed ({exc.name or exc})") from None
    if site_root:
        path = Path(site_root) / ".maelflow" / "catalogue.json"
        if path.is_file() and os.access(path, os.R_OK):
            data = json.loads(path.read_text())
            return CatalogueClient(data["url"], data.get("token"))
    try:
        return catalogue.client(ws)
    except Exception as exc:  # noqa: BLE001 - ServiceError, unreadable workspace, token store errors
        raise CatalogueUnavailable(f"the catalogue is not available: {exc}") from None


def _fail(exc: Exception, what: str) -> CatalogueUnavailable:
    status = getattr(exc, "status", None)
    if status is not None:
        return CatalogueUnavailable(f"{what}: the catalogue answered {status}: {getattr(exc, 'message', exc)}")
    return CatalogueUnavailable(f"{what}: cannot reach the catalogue ({exc})")


def register_location(ws, dataset: str, site: str, path: str, *, site_root: str | None = None,
                      catalogue=None) -> dict:
    """Add ``locations.<site> = {"path": path}`` to the dataset's entry (created when missing)."""
    cat = catalogue or client(ws, site_root)
    what = f"registering {dataset} at {site}"
    try:
        if not cat.exists("datasets", dataset):
            try:
                cat.create("datasets", {"name": dataset, "metadata": {}})
            except Exception as exc:  # noqa: BLE001 - 409: created meanwhile by someone else
                if getattr(exc, "status", None) != 409:
                    raise
        return cat.add_location("datasets", dataset, site, path)
    except CatalogueUnavailable:
        raise
    except Exception as exc:  # noqa: BLE001 - CatalogueClientError, requests errors
        raise _fail(exc, what) from None


def location_of(ws, dataset: str, platform: str, catalogue=None) -> str | None:
    """The path recorded for ``dataset`` at ``platform``, if any."""
    cat = catalogue or client(ws)
    try:
        rec = cat.get("datasets", dataset)
    except Exception as exc:  # noqa: BLE001
        if getattr(exc, "status", None) == 404:
            return None
        raise _fail(exc, f"reading dataset {dataset}") from None
    loc = (rec.get("locations") or {}).get(platform) or {}
    return loc.get("path")


def next_transfer_task(ws, destination: str, catalogue=None) -> TransferTask | None:
    """Take the oldest queued transfer task for ``destination``; None when there is none."""
    cat = catalogue or client(ws)
    try:
        queued = cat.list("tasks", status="queued", action=ACTION, destination=destination)
    except Exception as exc:  # noqa: BLE001
        raise _fail(exc, "listing queued transfer tasks") from None
    for rec in sorted(queued, key=lambda r: str(r.get("created", ""))):
        uuid = rec.get("uuid")
        try:
            current, version = cat.get_with_version("tasks", uuid)
            if current.get("status") != "queued":
                continue
            taken = cat.patch("tasks", uuid, [
                {"op": "test", "path": "/status", "value": "queued"},
                {"op": "replace", "path": "/status", "value": "running"},
                {"op": "add", "path": "/worker", "value": {"host": socket.gethostname(), "pid": os.getpid(),
                                                           "user": getpass.getuser(), "started": time.time()}},
            ], if_version=version)
        except Exception as exc:  # noqa: BLE001 - 409/412: another worker took it first
            if getattr(exc, "status", None) in (404, 409, 412):
                continue
            raise _fail(exc, f"taking task {uuid}") from None
        return TransferTask(uuid, str(taken.get("dataset", "")), str(taken.get("source") or EWC_PLATFORM),
                            str(taken.get("destination", destination)), taken)
    return None


def task_progress(ws, task: TransferTask, percent: float, text: str = "", catalogue=None) -> None:
    cat = catalogue or client(ws)
    try:
        cat.patch("tasks", task.uuid, [{"op": "add", "path": "/progress",
                                        "value": {"percentage": round(percent, 1), "text": text}}])
    except Exception as exc:  # noqa: BLE001
        raise _fail(exc, f"reporting progress of task {task.uuid}") from None


def task_finished(ws, task: TransferTask, ok: bool, message: str = "", catalogue=None) -> None:
    cat = catalogue or client(ws)
    ops: list[dict[str, Any]] = [{"op": "replace", "path": "/status", "value": "completed" if ok else "failed"},
                                 {"op": "add", "path": "/message", "value": message}]
    if ok:
        ops.append({"op": "add", "path": "/progress", "value": {"percentage": 100, "text": message}})
    try:
        cat.patch("tasks", task.uuid, ops)
    except Exception as exc:  # noqa: BLE001
        raise _fail(exc, f"closing task {task.uuid}") from None

"""The transfer side of the catalogue: record where a dataset lives, take queued transfer tasks.

Talks to maelflow's catalogue service (``maelflow.catalogue.client``) with the task protocol
of anemoi-registry: a ``transfer-dataset`` task names ``dataset``, ``source`` (a platform holding
it, "ewc" for the object store) and ``destination`` (a site); a worker takes a ``queued`` one by
switching it to ``running`` (a versioned PATCH, so two workers never take the same task), reports
``progress`` ({"percentage": ...}) as it goes, then sets ``completed`` (or ``failed`` with the
reason) and adds the location to the dataset's entry. Where the catalogue is not installed or not
running, every call raises ``CatalogueUnavailable`` saying so.

A worker can die (kill -9, a lost node) with its task ``running``. So a taken task carries a lease
(``{"seconds": N}``; the catalogue stamps ``lease.expires`` N seconds after every change, so each
progress patch or heartbeat renews it) and the worker's ``id`` in ``worker``. A running task whose
lease expired is taken over by the next worker that looks (a versioned PATCH that tests the expiry
it saw, so two workers never both take it), which records the takeover in ``takeovers``. Every later
patch of a worker tests that the task is still its own: a worker that was only stalled learns that
it lost the task (``TaskTakenOver``) instead of overwriting the new owner's progress or outcome.
"""

from __future__ import annotations

import datetime
import getpass
import json
import os
import secrets
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from maelflow_transfer.errors import TransferError

EWC_PLATFORM = "ewc"
ACTION = "transfer-dataset"
LEASE_SECONDS = 300.0  # a dead worker's task is taken over this long after its last heartbeat


class CatalogueUnavailable(TransferError):
    """No catalogue to talk to (not installed, not running, or refusing us)."""


class TaskTakenOver(CatalogueUnavailable):
    """Another worker took this task over (this one's lease had expired): stop working on it."""


@dataclass
class TransferTask:
    uuid: str
    dataset: str
    source: str
    destination: str
    record: dict
    worker_id: str = ""
    lease_seconds: float = LEASE_SECONDS


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


def _worker() -> dict:
    return {"id": secrets.token_hex(8), "host": socket.gethostname(), "pid": os.getpid(),
            "user": getpass.getuser(), "started": time.time()}


def _utcnow() -> datetime.datetime:
    """Naive UTC, as the catalogue writes its stamps."""
    return datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)


def lease_expired(rec: dict, now: datetime.datetime | None = None) -> bool:
    """Whether a running task's lease has run out (a task without a lease never expires here)."""
    lease = rec.get("lease")
    expires = lease.get("expires") if isinstance(lease, dict) else None
    if not isinstance(expires, str):
        return False
    try:
        when = datetime.datetime.fromisoformat(expires)
    except ValueError:
        return False
    if when.tzinfo is not None:
        when = when.astimezone(datetime.timezone.utc).replace(tzinfo=None)
    return when < (now or _utcnow())


def _owner_test(task: TransferTask) -> list[dict]:
    return [{"op": "test", "path": "/worker/id", "value": task.worker_id}] if task.worker_id else []


def next_transfer_task(ws, destination: str, catalogue=None, lease_seconds: float = LEASE_SECONDS
                       ) -> TransferTask | None:
    """Take the oldest queued transfer task for ``destination``, else one whose worker's lease
    expired (a dead worker's); None when there is none."""
    cat = catalogue or client(ws)
    try:
        queued = cat.list("tasks", status="queued", action=ACTION, destination=destination)
    except Exception as exc:  # noqa: BLE001
        raise _fail(exc, "listing queued transfer tasks") from None
    for rec in sorted(queued, key=lambda r: str(r.get("created", ""))):
        task = _take(cat, rec, destination, lease_seconds, takeover=False)
        if task is not None:
            return task
    try:
        running = cat.list("tasks", status="running", action=ACTION, destination=destination)
    except Exception as exc:  # noqa: BLE001
        raise _fail(exc, "listing running transfer tasks") from None
    now = _utcnow()
    for rec in sorted((r for r in running if lease_expired(r, now)), key=lambda r: str(r["lease"]["expires"])):
        task = _take(cat, rec, destination, lease_seconds, takeover=True)
        if task is not None:
            return task
    return None


def _take(cat, rec: dict, destination: str, lease_seconds: float, takeover: bool) -> TransferTask | None:
    """Make ``rec`` ours with one versioned PATCH; None when another worker was quicker."""
    uuid = rec.get("uuid")
    worker = _worker()
    try:
        current, version = cat.get_with_version("tasks", uuid)
        if takeover:
            if current.get("status") != "running" or not lease_expired(current):
                return None
            expired = current["lease"]["expires"]
            record = {"at": _utcnow().isoformat(timespec="seconds"), "from": current.get("worker"),
                      "lease_expired": expired, "by": worker}
            ops = [{"op": "test", "path": "/status", "value": "running"},
                   {"op": "test", "path": "/lease/expires", "value": expired},
                   {"op": "add", "path": "/takeovers", "value": [*(current.get("takeovers") or []), record]}]
        else:
            if current.get("status") != "queued":
                return None
            ops = [{"op": "test", "path": "/status", "value": "queued"},
                   {"op": "replace", "path": "/status", "value": "running"}]
        ops += [{"op": "add", "path": "/worker", "value": worker},
                {"op": "add", "path": "/lease", "value": {"seconds": lease_seconds}}]
        taken = cat.patch("tasks", uuid, ops, if_version=version)
    except Exception as exc:  # noqa: BLE001 - 409/412: another worker took it first
        if getattr(exc, "status", None) in (404, 409, 412):
            return None
        raise _fail(exc, f"taking task {uuid}") from None
    return TransferTask(uuid, str(taken.get("dataset", "")), str(taken.get("source") or EWC_PLATFORM),
                        str(taken.get("destination", destination)), taken, worker_id=worker["id"],
                        lease_seconds=lease_seconds)


def _patch_own(cat, task: TransferTask, ops: list[dict], what: str) -> None:
    """Patch the task if it is still ours; TaskTakenOver when another worker has it now."""
    try:
        cat.patch("tasks", task.uuid, _owner_test(task) + ops)
    except Exception as exc:  # noqa: BLE001
        if getattr(exc, "status", None) == 409 and task.worker_id:
            raise TaskTakenOver(f"task {task.uuid} was taken over by another worker (this worker's lease had "
                                f"expired): {what} not recorded") from None
        raise _fail(exc, f"{what} (task {task.uuid})") from None


def task_heartbeat(ws, task: TransferTask, catalogue=None) -> None:
    """Renew the task's lease (any change does; this one changes only the stamps)."""
    _patch_own(catalogue or client(ws), task, [{"op": "add", "path": "/status", "value": "running"}],
               "the heartbeat")


def task_progress(ws, task: TransferTask, percent: float, text: str = "", catalogue=None) -> None:
    _patch_own(catalogue or client(ws), task, [{"op": "add", "path": "/progress",
                                                "value": {"percentage": round(percent, 1), "text": text}}],
               "reporting progress")


def task_finished(ws, task: TransferTask, ok: bool, message: str = "", catalogue=None) -> None:
    ops: list[dict[str, Any]] = [{"op": "replace", "path": "/status", "value": "completed" if ok else "failed"},
                                 {"op": "add", "path": "/message", "value": message}]
    if ok:
        ops.append({"op": "add", "path": "/progress", "value": {"percentage": 100, "text": message}})
    _patch_own(catalogue or client(ws), task, ops, "closing")

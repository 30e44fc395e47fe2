"""Tasks: the anemoi-registry work queue (transfer-dataset, delete-dataset...), by uuid.

Its workers rely on server habits (reference/anemoi-registry-protocol.md §3): a new task gets a
uuid, ``status: queued`` and naive-UTC ``created``/``updated`` stamps, because workers do
``datetime.fromisoformat(updated)`` and subtract it from ``utcnow()``; every change moves
``updated`` (a heartbeat) and keeps ``created``. Workers delete the tasks they finish with a write
token. A delete-dataset task that would remove a dataset's last copy is refused when queued.

A task's ``dataset``, ``source``, ``destination`` and ``location`` become folder and site names on a
worker's disk, so they are checked as one safe path segment (the worker's own rule) whenever they
are written: a ``dataset: "../../x"`` is refused with a 400 when queued, not found by a worker.
(``source_path``/``target_path``, which the anemoi client's uploads add, are real paths and URIs.)

A ``running`` task may hold a lease, ``{"seconds": N}``: the server stamps ``lease.expires`` (naive
UTC, like ``updated``) at N seconds after every change, so each progress patch or heartbeat of its
worker renews it. A task whose lease expired belongs to a worker that died; another worker may take
it over (maelflow's ``next_transfer_task``), with a versioned PATCH that records the takeover.
"""

from __future__ import annotations

import datetime
import json
import uuid as uuid_mod
from typing import Any

from maelflow_registry.collections.base import Cell, Collection, IndexView
from maelflow_registry.config import Settings
from maelflow_registry.errors import BadRequest, Conflict, Unprocessable
from maelflow_registry.keys import check_key, check_segment
from maelflow_registry.records import now_iso, require_object, strip_hidden
from maelflow_registry.refs import Edges, dataset_name, ref

COLLECTION = "tasks"
# fields that become a folder or site name on a worker (the dataset is also a datasets key)
SEGMENT_FIELDS = ("source", "destination", "location")
LEASE_MAX = 7 * 86400


class Tasks(Collection):
    name = COLLECTION
    main_key = "uuid"
    title, singular = "Tasks", "Task"
    delete_role = "write"
    column, colour = 4, "#e5e7eb"
    lineage_on_page = False
    list_headers = ("Uuid", "Action", "Status", "Dataset", "From → to", "Progress", "Created", "Updated")

    def new_record(self, body: Any, key_from_url: str | None = None) -> tuple[str, dict]:
        record = strip_hidden(require_object(body))
        key = key_from_url or record.get("uuid") or str(uuid_mod.uuid4())
        if "uuid" in record and record["uuid"] != key:
            raise BadRequest(f"the body's uuid '{str(record['uuid'])[:80]}' differs from the URL's '{key}'")
        record["uuid"] = check_key(key, "task uuid")
        record.setdefault("status", "queued")
        stamp = now_iso()
        record["created"] = stamp
        record["updated"] = stamp
        if isinstance(record.get("action"), str):  # what the client does too: transfer_dataset -> transfer-dataset
            record["action"] = record["action"].lower().replace("_", "-")
        stamp_lease(record)
        return key, self.add_defaults(record)

    def check(self, key: str, record: dict, old: dict | None, *, settings: Settings, creating: bool) -> None:
        if not isinstance(record.get("status"), str):
            raise BadRequest("a task's 'status' must be a string (queued, running, stopped...)")
        for stamp in ("created", "updated"):
            if not isinstance(record.get(stamp), str):
                raise BadRequest(f"a task's '{stamp}' must be an ISO-8601 string")
        # checked when written or changed, so a worker can still close an old task it cannot run
        if "dataset" in record and (old is None or old.get("dataset") != record["dataset"]):
            if record["dataset"] is not None or record.get("action") == "transfer-dataset":
                check_key(record["dataset"], "task's dataset name")
        for name in SEGMENT_FIELDS:
            value = record.get(name)
            if value not in (None, "") and (old is None or old.get(name) != value):
                check_segment(value, f"task's {name}")
        lease = record.get("lease")
        if lease is not None:
            seconds = lease.get("seconds") if isinstance(lease, dict) else None
            if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not 0 < seconds <= LEASE_MAX:
                raise BadRequest(f"a task's 'lease' must be an object with 'seconds' between 0 and {LEASE_MAX}")

    def updating(self, old: dict, new: dict) -> None:
        new["created"] = old.get("created", new.get("created"))
        new["updated"] = now_iso()  # every change is a heartbeat
        stamp_lease(new)

    def before_create(self, record: dict, index: IndexView) -> None:
        """Refuse a deletion task that would remove a dataset's last copy."""
        if record.get("action") != "delete-dataset":
            return
        dataset, location = record.get("dataset"), record.get("location") or record.get("destination")
        if not isinstance(dataset, str) or not isinstance(location, str):
            raise BadRequest("a delete-dataset task needs 'dataset' and 'location'")
        row = index.get("datasets", check_key(dataset, "dataset name"))
        if row is None:
            raise Unprocessable(f"dataset '{dataset}' is not registered")
        locations = json.loads(row["record"]).get("locations") or {}
        if location in locations and len(locations) == 1:
            raise Conflict(f"refusing to delete '{dataset}' at '{location}': it is the dataset's last copy")

    def edges(self, key: str, record: dict) -> list[tuple[str, str, str]]:
        out = Edges()
        name = dataset_name(record.get("dataset"))
        if name:
            out.add(ref("datasets", name), "task", ref(self.name, key))
        return list(out)

    def list_row(self, row: dict, index: Any) -> list[Cell]:
        rec, key = row["record"], row["key"]
        progress = rec.get("progress") if isinstance(rec.get("progress"), dict) else {}
        pct = progress.get("percentage")
        dataset = rec.get("dataset")
        return [(key, self.link(key)), (rec.get("action", ""), None), (rec.get("status", ""), None),
                (rec.get("dataset", ""), f"/datasets/{dataset}" if isinstance(dataset, str) else None),
                (f"{rec.get('source', '')} → {rec.get('destination') or rec.get('location') or ''}", None),
                (f"{pct:.0f} %" if isinstance(pct, (int, float)) else "", None),
                (str(rec.get("created", ""))[:19], None), (str(rec.get("updated", ""))[:19], None)]


def stamp_lease(record: dict) -> None:
    """Move a running task's ``lease.expires`` to ``seconds`` from now (its ``updated`` stamp)."""
    lease = record.get("lease")
    if record.get("status") != "running" or not isinstance(lease, dict):
        return
    seconds = lease.get("seconds")
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not 0 < seconds <= LEASE_MAX:
        return  # refused by check()
    try:
        start = datetime.datetime.fromisoformat(record["updated"])
    except (KeyError, TypeError, ValueError):
        start = datetime.datetime.fromisoformat(now_iso())
    record["lease"] = {**lease, "expires": (start + datetime.timedelta(seconds=seconds)).isoformat(
        timespec="microseconds")}


collection = Tasks()

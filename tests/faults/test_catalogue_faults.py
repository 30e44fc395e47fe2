"""Faults of the catalogue with the real rclone S3 server and the real service (issue 17, item 7).

S3 is the catalogue's store of record and the index a cache of it; here S3 is changed behind the
catalogue's back, through the catalogue's own store object as anyone holding the bucket's key could:
(a) an entry's document deleted: a write answers 404 saying the store lost it, and a reconcile (the
server runs one every ``reconcile_seconds``) drops it so reads answer 404 too; (b) a document the
index lacks: it appears after a rebuild (or a reconcile), unless it is invalid, which is skipped and
named in the log; (c) a document changed in place: a rebuild takes S3's version, and so does the
next write of that entry. Also here: a worker that dies holding a task (its lease expires and a
second worker takes the task over and completes it), and an anonymous 256 MiB upload refused before
the server reads it.
"""

from __future__ import annotations

import datetime
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.parse

import pytest

from maelflow.datasets import catalogue_hook as hook
from maelflow.services import stack as stack_mod
from maelflow.services.catalogue import open_store
from maelflow.workspace import catalogue_paths
from maelflow.workspace import Workspace
from maelflow_registry.auth import TokenStore
from maelflow_registry.client import CatalogueClientError
from maelflow_registry.config import load_settings
from maelflow_registry.store import FORMAT
from tests.integration.test_catalogue_support import CatalogueEnv, dataset_name, dataset_record

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """S3 and the catalogue in a workspace of this module's own (its S3 is tampered with)."""
    ws = Workspace(tmp_path_factory.mktemp("catalogue-faults"))
    try:
        infos = stack_mod.up(ws, names=["s3", "catalogue"])
        env = CatalogueEnv(ws, infos["catalogue"].url)
        tokens = TokenStore(catalogue_paths(ws))
        for role in ("read", "write", "admin"):
            env.tokens[role] = tokens.create(role, name=f"faults-{role}")[0]
        yield env
    finally:
        stack_mod.down(ws)


@pytest.fixture(scope="module")
def store(env):
    """The catalogue's own store object, used behind the running server's back."""
    return open_store(env.ws, load_settings(catalogue_paths(env.ws)))[0]


def _doc(collection: str, key: str, record: dict, version: int = 1) -> dict:
    now = datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None).isoformat()
    return {"format": FORMAT, "collection": collection, "key": key, "version": version, "created": now,
            "updated": now, "created_by": "behind", "updated_by": "behind", "record": record, "original": record}


def _rebuild(env) -> None:
    result = subprocess.run([sys.executable, "-m", "maelflow", "catalogue", "rebuild-index", "--workspace",
                             str(env.ws.root)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_a_document_deleted_from_s3_is_404_on_write_and_dropped_by_reconcile(env, store):
    c = env.client("write")
    one, two = dataset_name("lost-one"), dataset_name("lost-two")
    c.create("datasets", dataset_record(one))
    c.create("datasets", dataset_record(two))
    store.delete_document("datasets", one)
    store.delete_document("datasets", two)
    # a write does not resurrect it: the store lost it, the caller is told so, the index drops it
    with pytest.raises(CatalogueClientError) as err:
        c.add_location("datasets", one, "hpc", "/x")
    assert err.value.status == 404 and "no longer in S3" in err.value.message
    assert not env.client("read").exists("datasets", one)
    assert one not in json.dumps(env.s3_keys("catalogue", "entries/datasets/"))
    # reads come from the index: the next reconcile (periodic, or asked for) notices
    assert env.client("read").exists("datasets", two)
    status, found = env.raw("POST", "/api/v1/_admin/reconcile", headers=env.headers("admin"))
    assert status == 200 and found["lost"] >= 1
    assert not env.client("read").exists("datasets", two)
    assert env.get(f"/api/v1/datasets/{two}", role="read").status_code == 404


def test_a_document_written_behind_the_index_appears_after_a_rebuild_unless_invalid(env, store):
    name = dataset_name("planted")
    store.put_document(_doc("datasets", name, {"name": name, "metadata": {"by": "s3"}, "locations": {}}))
    bad = _doc("tasks", "planted-task", {"uuid": "planted-task", "status": "queued", "created": "c",
                                         "updated": "u", "action": "transfer-dataset", "dataset": "../../x",
                                         "destination": "hpc"})
    store.put_document(bad)
    assert not env.client("read").exists("datasets", name)
    _rebuild(env)
    assert env.client("read").get("datasets", name)["metadata"] == {"by": "s3"}
    assert not env.client("read").exists("tasks", "planted-task")  # invalid: skipped, never indexed
    assert env.client("read").list("tasks", dataset="../../x") == []
    # a reconcile finds such a document too, without a full rebuild
    other = dataset_name("planted-two")
    store.put_document(_doc("datasets", other, {"name": other, "locations": {}}))
    status, found = env.raw("POST", "/api/v1/_admin/reconcile", headers=env.headers("admin"))
    assert status == 200 and found["added"] >= 1 and env.client("read").exists("datasets", other)


def test_a_document_changed_in_s3_is_taken_by_a_rebuild_and_by_the_next_write(env, store):
    c = env.client("write")
    one, two = dataset_name("changed-one"), dataset_name("changed-two")
    for name in (one, two):
        c.create("datasets", dataset_record(name))
        doc = env.s3_document("datasets", name)
        doc["record"]["metadata"]["frequency"] = "1h"
        doc["version"] = 5
        store.put_document(doc)
        assert c.get("datasets", name)["metadata"]["frequency"] == "6h"  # the index has not seen it yet
    changed = c.patch("datasets", one, [{"op": "add", "path": "/status", "value": "ok"}])
    assert changed["metadata"]["frequency"] == "1h" and changed["status"] == "ok"
    assert c.get_with_version("datasets", one)[1] == 6 and env.s3_document("datasets", one)["version"] == 6
    _rebuild(env)
    assert c.get_with_version("datasets", two) == (env.s3_document("datasets", two)["record"], 5)


def _published_worker(monkeypatch, seconds: float = 0.0, steps: int = 3):
    """stage_dataset replaced by one that reports progress for ``seconds`` and lands nowhere real: the
    test is about who holds the task, not about moving bytes (tests/integration/test_transfer.py)."""
    from maelflow.datasets import stage as stage_mod
    from maelflow_transfer.progress import Snapshot

    class Result:
        def summary(self) -> str:
            return "3 objects"

    def stage_dataset(ws, dataset, *, site_name, site, prefix, sinks, workers):
        for i in range(steps + 1):
            for sink in sinks:
                sink(Snapshot(i, steps, i, steps, i, 0.1 * (i + 1), final=i == steps))
            time.sleep(seconds / steps)
        return Result(), f"/sites/{site_name}/{dataset}.zarr", "test"

    monkeypatch.setattr(stage_mod, "stage_dataset", stage_dataset)


def test_a_dead_workers_task_is_taken_over_when_its_lease_expires(env, monkeypatch):
    from maelflow.datasets.worker import run_worker

    monkeypatch.setattr(hook, "client", lambda ws, site_root=None: env.client("write"))
    _published_worker(monkeypatch)
    c = env.client("write")
    name = dataset_name("lease")
    task = c.create("tasks", {"action": "transfer-dataset", "dataset": name, "source": "ewc", "destination": "lease-site"})
    # the first worker takes it, then dies: it never renews its 1 s lease
    first = hook.next_transfer_task(env.ws, "lease-site", catalogue=c, lease_seconds=1)
    assert first is not None and first.uuid == task["uuid"]
    assert hook.next_transfer_task(env.ws, "lease-site", catalogue=c, lease_seconds=1) is None  # still held
    time.sleep(1.5)
    lines: list[str] = []
    assert run_worker(env.ws, "lease-site", None, once=True, log=lines.append, lease_seconds=60) == 1
    done = c.get("tasks", task["uuid"])
    assert done["status"] == "completed", lines
    assert [t["from"]["id"] for t in done["takeovers"]] == [first.worker_id]
    assert done["worker"]["id"] != first.worker_id
    assert c.get("datasets", name)["locations"]["lease-site"]["path"] == f"/sites/lease-site/{name}.zarr"
    # the first worker was only stalled after all: it is told, and changes nothing
    with pytest.raises(hook.TaskTakenOver):
        hook.task_progress(env.ws, first, 50, catalogue=c)
    with pytest.raises(hook.TaskTakenOver):
        hook.task_finished(env.ws, first, False, "late", catalogue=c)
    assert c.get("tasks", task["uuid"])["status"] == "completed"


def test_a_live_worker_keeps_its_task_past_the_lease_by_heartbeats(env, monkeypatch):
    from maelflow.datasets.worker import run_worker

    monkeypatch.setattr(hook, "client", lambda ws, site_root=None: env.client("write"))
    _published_worker(monkeypatch, seconds=4.0, steps=1)  # one progress report, then 4 s of silence
    c = env.client("write")
    task = c.create("tasks", {"action": "transfer-dataset", "dataset": dataset_name("beat"), "source": "ewc",
                              "destination": "beat-site"})
    runner = threading.Thread(target=run_worker, args=(env.ws, "beat-site", None),
                              kwargs={"once": True, "log": print, "lease_seconds": 1.5})
    runner.start()
    deadline = time.monotonic() + 30
    while c.get("tasks", task["uuid"])["status"] == "queued" and time.monotonic() < deadline:
        time.sleep(0.05)  # the worker takes it first; from then on another worker looks for expired leases
    stolen = []
    while runner.is_alive():
        got = hook.next_transfer_task(env.ws, "beat-site", catalogue=c, lease_seconds=1)
        if got is not None:
            stolen.append(got)
        time.sleep(0.2)
    runner.join()
    assert stolen == [] and c.get("tasks", task["uuid"])["status"] == "completed"
    assert "takeovers" not in c.get("tasks", task["uuid"])


def test_an_anonymous_256_mib_upload_is_answered_401_before_it_is_sent(env):
    parsed = urllib.parse.urlsplit(env.url)
    size = 256 * 2**20
    with socket.create_connection((parsed.hostname, parsed.port), timeout=30) as sock:
        sock.sendall(f"PUT /api/v1/artefacts/plots/big.bin HTTP/1.1\r\nHost: x\r\nContent-Length: {size}\r\n"
                     "Content-Type: application/octet-stream\r\n\r\n".encode())
        sock.setblocking(False)
        chunk, sent, answer = b"\0" * 2**16, 0, b""
        while sent < size and b"\r\n\r\n" not in answer:
            try:
                sent += sock.send(chunk)
            except BlockingIOError:
                time.sleep(0.001)
            try:
                answer += sock.recv(65536)
            except BlockingIOError:
                pass
        assert answer.startswith(b"HTTP/1.1 401"), answer[:200]
        assert sent < size // 4  # the answer came while most of the body was still unsent
    assert "big.bin" not in json.dumps(env.s3_keys("catalogue", "artefacts/"))

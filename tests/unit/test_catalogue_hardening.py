"""The catalogue's hardening (issue 17), without a server: token store locking and durability, task
fields checked when queued, task leases, writes refused before their body is read, and documents
read back from S3 validated on a rebuild, each against the code paths the review found open."""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import multiprocessing
import os
import stat

import pytest

from maelflow_registry import config as config_mod
from maelflow_registry.auth import TokenStore, hash_token
from maelflow_registry.catalogue import Catalogue, document_problem
from maelflow_registry.config import Paths, Settings
from maelflow_registry.errors import BadRequest, NotFound
from maelflow_registry.index import Index
from maelflow_registry.keys import check_segment
from maelflow_registry.store import FORMAT, entry_object

pytestmark = pytest.mark.unit


# -- token store ---------------------------------------------------------------------------------
def _create_many(directory: str, n: int, out) -> None:
    store = TokenStore(Paths(directory))
    out.put([store.create("read", name=f"p{os.getpid()}-{i}")[1].id for i in range(n)])


def _revoke(directory: str, which: str, out) -> None:
    out.put([t.id for t in TokenStore(Paths(directory)).revoke(which)])


def test_concurrent_create_and_revoke_lose_nothing_and_never_bring_a_token_back(tmp_path):
    paths = Paths(tmp_path / "catalogue")
    victim, _ = TokenStore(paths).create("write", name="victim")
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    procs = [ctx.Process(target=_create_many, args=(str(paths.dir), 15, out)) for _ in range(4)]
    procs.append(ctx.Process(target=_revoke, args=(str(paths.dir), "victim", out)))
    for p in procs:
        p.start()
    results = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    made = {i for r in results if len(r) == 15 for i in r}
    held = TokenStore(paths).by_hash()
    assert hash_token(victim) not in held  # revoked, and no concurrent write put it back
    assert made == {t.id for t in held.values()}  # and no creation was lost
    assert stat.S_IMODE(paths.tokens.stat().st_mode) == 0o600
    assert stat.S_IMODE(paths.tokens_lock.stat().st_mode) == 0o600


def _service(directory: str, out) -> None:
    out.put(TokenStore(Paths(directory)).service_token(name="tasks"))


def test_service_token_first_used_by_many_processes_at_once_is_one_token(tmp_path):
    paths = Paths(tmp_path / "catalogue")
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    procs = [ctx.Process(target=_service, args=(str(paths.dir), out)) for _ in range(6)]
    for p in procs:
        p.start()
    tokens = {out.get(timeout=60) for _ in procs}
    for p in procs:
        p.join(60)
    assert len(tokens) == 1
    assert [t.name for t in TokenStore(paths).list()] == ["tasks"]
    # revoked: the next use makes a working one instead of handing out a dead token
    TokenStore(paths).revoke("tasks")
    fresh = TokenStore(paths).service_token(name="tasks")
    assert fresh not in tokens and hash_token(fresh) in TokenStore(paths).by_hash()


def test_token_file_is_private_from_creation_and_synced_with_its_folder(tmp_path, monkeypatch):
    synced: list[str] = []
    modes: list[int] = []
    real_fsync = os.fsync

    def fsync(fd):
        st = os.fstat(fd)
        synced.append("dir" if stat.S_ISDIR(st.st_mode) else "file")
        if not stat.S_ISDIR(st.st_mode):
            modes.append(stat.S_IMODE(st.st_mode))
        return real_fsync(fd)

    monkeypatch.setattr(config_mod.os, "fsync", fsync)
    paths = Paths(tmp_path / "catalogue")
    TokenStore(paths).create("admin", name="a")
    assert synced == ["file", "dir"]
    assert modes == [0o600]  # the content was written (and synced) into a file only the owner can read
    assert stat.S_IMODE(paths.tokens.stat().st_mode) == 0o600
    assert not [p for p in paths.dir.iterdir() if p.name.startswith(".tokens.json.")]  # no temporary left


# -- tasks -------------------------------------------------------------------------------------
class FakeStore:
    """The Store's interface over a dictionary of object name -> bytes (what S3 would hold)."""

    bucket = "catalogue"

    def __init__(self):
        self.objects: dict[str, bytes] = {}

    def ensure_bucket(self) -> None:
        pass

    def put_document(self, doc: dict) -> None:
        self.objects[entry_object(doc["collection"], doc["key"])] = json.dumps(doc).encode()

    def delete_document(self, collection: str, key: str) -> None:
        self.objects.pop(entry_object(collection, key), None)

    def list_entry_objects(self):
        return sorted(self.objects)

    def read_object(self, name: str):
        if name not in self.objects:
            return None, None
        try:
            doc = json.loads(self.objects[name], parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))
        except ValueError as exc:
            return None, f"it is not valid JSON ({exc})"
        return (doc, None) if isinstance(doc, dict) and doc.get("format") == FORMAT else (None, "not a document")

    def get_document(self, collection: str, key: str):
        return self.read_object(entry_object(collection, key))

    def scan(self):
        for name in self.list_entry_objects():
            yield (name, *self.read_object(name))

    def put_artefact(self, path: str, body, content_type: str) -> None:
        with open(body, "rb") as fh:  # the route hands over the temporary file it streamed into
            self.objects["artefacts/" + path] = fh.read()


@pytest.fixture
def cat(tmp_path) -> Catalogue:
    return Catalogue(FakeStore(), Index(tmp_path / "index.sqlite"), lambda: Settings(dataset_naming="relaxed"))


@pytest.mark.parametrize("bad", ["../../x", "a/b", "..", "a\\b", "a\x00b", "a\nb", "", "a..b"])
def test_transfer_task_with_an_unsafe_dataset_is_refused_when_queued(cat, bad):
    with pytest.raises(BadRequest):
        cat.create("tasks", {"action": "transfer-dataset", "dataset": bad, "source": "ewc", "destination": "hpc"},
                   user="u", role="write")
    assert cat.index.keys() == [] and cat.store.objects == {}  # nothing written


@pytest.mark.parametrize("field", ["source", "destination", "location"])
@pytest.mark.parametrize("bad", ["../x", "a/b", "..", ".", "a\\b", "a\x00b", "a\rb", "a\x7fb"])
def test_task_site_fields_are_one_safe_segment(cat, field, bad):
    body = {"action": "transfer-dataset", "dataset": "d1", "source": "ewc", "destination": "hpc", field: bad}
    with pytest.raises(BadRequest):
        cat.create("tasks", body, user="u", role="write")
    with pytest.raises(BadRequest):
        check_segment(bad)


def test_a_task_field_cannot_be_patched_unsafe_but_an_old_bad_task_can_still_be_closed(cat):
    task, _ = cat.create("tasks", {"action": "transfer-dataset", "dataset": "d1", "destination": "hpc"},
                         user="u", role="write")
    with pytest.raises(BadRequest):
        cat.patch("tasks", task["uuid"], [{"op": "replace", "path": "/dataset", "value": "../x"}],
                  user="u", role="write")
    # a task queued before the check existed (planted in the index as it was): a worker can fail it
    with cat.index.write() as tx:
        bad = dict(task, dataset="../x")
        tx.remove("tasks", task["uuid"])
        tx.insert({"collection": "tasks", "key": task["uuid"], "version": 9, "created": "c", "updated": "u",
                   "record": bad, "original": bad})
    done, _ = cat.patch("tasks", task["uuid"], [{"op": "replace", "path": "/status", "value": "failed"}],
                        user="u", role="write")
    assert done["status"] == "failed"


def test_a_running_task_lease_is_stamped_and_renewed_by_every_change(cat):
    task, _ = cat.create("tasks", {"action": "transfer-dataset", "dataset": "d1", "destination": "hpc"},
                         user="u", role="write")
    assert "lease" not in task
    taken, _ = cat.patch("tasks", task["uuid"], [{"op": "replace", "path": "/status", "value": "running"},
                                                 {"op": "add", "path": "/lease", "value": {"seconds": 30}}],
                         user="u", role="write")
    expires = datetime.datetime.fromisoformat(taken["lease"]["expires"])
    assert expires - datetime.datetime.fromisoformat(taken["updated"]) == datetime.timedelta(seconds=30)
    renewed, _ = cat.patch("tasks", task["uuid"], [{"op": "add", "path": "/progress", "value": {"percentage": 5}}],
                           user="u", role="write")
    assert renewed["lease"]["expires"] > taken["lease"]["expires"]
    with pytest.raises(BadRequest):
        cat.patch("tasks", task["uuid"], [{"op": "add", "path": "/lease", "value": {"seconds": "soon"}}],
                  user="u", role="write")


# -- S3 and the index --------------------------------------------------------------------------
def _doc(collection: str, key: str, record: dict, version: int = 1) -> dict:
    return {"format": FORMAT, "collection": collection, "key": key, "version": version, "created": "2026-01-01",
            "updated": "2026-01-01", "created_by": "t", "updated_by": "t", "record": record, "original": record}


def test_rebuild_indexes_valid_documents_and_skips_each_invalid_one_naming_it(cat, caplog):
    store = cat.store
    store.put_document(_doc("datasets", "good", {"name": "good", "locations": {}}))
    store.put_document(_doc("tasks", "t1", {"uuid": "t1", "status": "queued", "created": "c", "updated": "u",
                                            "action": "transfer-dataset", "dataset": "../../x"}))
    store.put_document(_doc("datasets", "protected", {"name": "protected", "protected": "yes"}))
    store.objects["entries/datasets/00/garbled.json"] = b"{not json"
    store.objects["entries/datasets/00/nan.json"] = json.dumps(_doc("datasets", "nan", {"name": "nan"})).replace(
        '"version": 1', '"version": NaN').encode()
    planted = _doc("datasets", "victim", {"name": "victim"})
    store.objects[entry_object("datasets", "other")] = json.dumps(planted).encode()  # stored under another name
    store.put_document(_doc("datasets", "bad-version", {"name": "bad-version"}, version=0))
    with caplog.at_level(logging.WARNING, logger="maelflow_registry"):
        assert cat.rebuild() == 1
    assert cat.index.keys() == [("datasets", "good")]
    text = caplog.text
    for name in (entry_object("tasks", "t1"), entry_object("datasets", "protected"), "garbled.json", "nan.json",
                 entry_object("datasets", "other"), entry_object("datasets", "bad-version")):
        assert f"{name} skipped" in text or name in text
    assert "dataset name" in text and "protected" in text and "not valid JSON" in text
    assert document_problem(_doc("datasets", "good", {"name": "good"}), Settings()) is None


def test_writes_follow_s3_a_lost_entry_is_404_and_a_changed_one_is_taken_first(cat):
    cat.create("datasets", {"name": "ds1", "metadata": {}}, user="u", role="write")
    cat.create("datasets", {"name": "ds2", "metadata": {}}, user="u", role="write")
    cat.store.delete_document("datasets", "ds1")
    with pytest.raises(NotFound, match="no longer in S3"):
        cat.patch("datasets", "ds1", [{"op": "add", "path": "/status", "value": "x"}], user="u", role="write")
    assert cat.index.get("datasets", "ds1") is None and entry_object("datasets", "ds1") not in cat.store.objects
    changed = _doc("datasets", "ds2", {"name": "ds2", "metadata": {"from": "s3"}, "locations": {}}, version=7)
    cat.store.put_document(changed)
    new, version = cat.patch("datasets", "ds2", [{"op": "add", "path": "/status", "value": "ok"}],
                             user="u", role="write")
    assert version == 8 and new["metadata"] == {"from": "s3"} and new["status"] == "ok"


def test_reconcile_drops_lost_entries_and_indexes_missing_valid_documents(cat):
    cat.create("datasets", {"name": "ds1", "metadata": {}}, user="u", role="write")
    cat.store.delete_document("datasets", "ds1")
    cat.store.put_document(_doc("datasets", "ds3", {"name": "ds3", "locations": {}}))
    cat.store.put_document(_doc("tasks", "t9", {"uuid": "t9", "status": "queued", "created": "c", "updated": "u",
                                                "dataset": "a/b"}))
    assert cat.reconcile() == {"lost": 1, "added": 1}
    assert cat.index.keys() == [("datasets", "ds3")]
    assert cat.reconcile() == {"lost": 0, "added": 0}


# -- a write's body is never read before its token is checked -------------------------------------
def _app(tmp_path):
    from maelflow_registry.server import build, open_catalogue

    paths = Paths(tmp_path / "catalogue")
    store = FakeStore()
    token = TokenStore(paths).create("write", name="w")[0]
    open_catalogue(paths, store)  # the index built first, not in the background
    return build(paths, store), token, store


def _call(app, method: str, path: str, headers: dict, chunks: int, chunk: bytes = b"x" * 2**20):
    """Drive the ASGI app with a body of ``chunks`` chunks, made only when asked for; returns the
    status, the answer and how many chunks had been asked for when the answer's status was sent."""
    asked = [0]
    sent: list[dict] = []
    at_status = [None]

    async def receive():
        if asked[0] >= chunks:
            return {"type": "http.disconnect"}
        asked[0] += 1
        return {"type": "http.request", "body": chunk, "more_body": asked[0] < chunks}

    async def send(message):
        if message["type"] == "http.response.start":
            at_status[0] = asked[0]
        sent.append(message)

    raw = [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    scope = {"type": "http", "method": method, "path": path, "raw_path": path.encode(), "root_path": "",
             "query_string": b"", "headers": raw, "scheme": "http", "http_version": "1.1",
             "server": ("127.0.0.1", 80), "client": ("127.0.0.1", 1)}
    asyncio.run(app(scope, receive, send))
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return sent[0]["status"], json.loads(body), at_status[0], asked[0]


def test_an_anonymous_256_mib_upload_is_refused_before_any_of_it_is_read(tmp_path):
    app, _, _ = _app(tmp_path)
    status, body, at_status, asked = _call(app, "PUT", "/api/v1/artefacts/plots/x.png",
                                           {"content-length": str(256 * 2**20)}, chunks=256)
    assert status == 401 and "token" in body["message"]
    assert at_status == 0  # answered before the first chunk was asked for
    assert asked == 256  # then drained (read and dropped) so the client sees the answer, not a reset
    status, _, at_status, _ = _call(app, "POST", "/api/v1/datasets", {"transfer-encoding": "chunked"}, chunks=20)
    assert status == 401 and at_status == 0


def test_a_writer_may_upload_and_an_oversized_chunked_upload_is_413(tmp_path):
    app, token, store = _app(tmp_path)
    auth = {"authorization": f"Bearer {token}"}
    status, body, _, _ = _call(app, "PUT", "/api/v1/artefacts/plots/x.bin", auth, chunks=3, chunk=b"abc")
    assert status == 200 and body["size"] == 9 and store.objects["artefacts/plots/x.bin"] == b"abcabcabc"
    (tmp_path / "catalogue" / "settings.json").write_text(json.dumps({"max_artefact_bytes": 2**20}))
    status, body, _, _ = _call(app, "PUT", "/api/v1/artefacts/plots/y.bin", {**auth, "transfer-encoding": "chunked"},
                               chunks=3)
    assert status == 413 and "artefacts/plots/y.bin" not in store.objects
    status, _, at_status, _ = _call(app, "PUT", "/api/v1/artefacts/plots/z.bin",
                                    {**auth, "content-length": str(2**21)}, chunks=2)
    assert status == 413 and at_status == 0  # a declared size over the limit: refused before reading

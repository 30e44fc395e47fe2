"""The manifest's two digests: publish records SHA-256 and BLAKE3 from one read, a pull checks
BLAKE3 where the manifest has it and SHA-256 where it does not (a manifest published before), the
journal says which was checked, and older readers still read a manifest that carries BLAKE3."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

import pytest
from blake3 import blake3

from maelflow_transfer import manifest as manifest_mod
from maelflow_transfer.errors import ChecksumMismatch
from maelflow_transfer.manifest import (BLAKE3, MANIFEST_NAME, SHA256, Entry, Manifest, check_file, scan,
                                        verify_tree)
from maelflow_transfer.stage import stage
from maelflow_transfer.trees import LocalTree

from tests.unit.test_transfer_engine import MemoryStore, _objects

pytestmark = pytest.mark.unit


def _both(objects: dict[str, bytes], dataset: str = "ds") -> Manifest:
    return Manifest(dataset, tuple(Entry(k, len(v), hashlib.sha256(v).hexdigest(), blake3(v).hexdigest())
                                   for k, v in sorted(objects.items())))


def _journal(tree: LocalTree) -> list[dict]:
    return [json.loads(line) for line in tree.journal_path.read_text().splitlines()]


def test_scan_records_both_digests_and_the_manifest_says_so(tmp_path):
    (tmp_path / "z" / "a").mkdir(parents=True)
    data = os.urandom(3 * manifest_mod.CHUNK + 17)        # several buffers, both hashers fed from each
    (tmp_path / "z" / "a" / "0").write_bytes(data)
    m = scan(tmp_path / "z", "z")
    (e,) = m.entries
    assert (e.sha256, e.blake3) == (hashlib.sha256(data).hexdigest(), blake3(data).hexdigest())
    assert m.digests == (SHA256, BLAKE3) and e.algo == BLAKE3
    doc = json.loads(m.to_json())
    assert doc["digests"] == ["sha256", "blake3"] and doc["blake3"] == {"a/0": e.blake3}
    assert doc["objects"] == [{"key": "a/0", "size": len(data), "sha256": e.sha256}]
    back = Manifest.from_json(m.to_json())
    assert back == m and back.entries[0].blake3 == e.blake3


def test_an_older_reader_still_reads_a_manifest_with_blake3():
    """This project's reader before BLAKE3: ``Entry(**o)`` for each object, other fields ignored."""
    @dataclass(frozen=True)
    class OldEntry:
        key: str
        size: int
        sha256: str

    m = _both({"a": b"x", "b": b"y"})
    data = json.loads(m.to_json())
    old = [OldEntry(**o) for o in data["objects"]]
    assert [(o.key, o.size, o.sha256) for o in old] == [(e.key, e.size, e.sha256) for e in m.entries]


def test_an_old_manifest_reads_and_is_checked_with_sha256():
    text = json.dumps({"dataset": "ds", "format": 1, "total_bytes": 1,
                       "objects": [{"key": "a", "size": 1, "sha256": hashlib.sha256(b"x").hexdigest()}]})
    m = Manifest.from_json(text)
    assert m.digests == (SHA256,) and m.entries[0].blake3 is None and m.entries[0].algo == SHA256
    # the same dataset with BLAKE3 added is the same dataset (a staged copy of either is complete)
    assert m == _both({"a": b"x"})
    assert "blake3" not in json.loads(m.to_json())


def test_an_object_without_blake3_is_checked_with_sha256_and_a_malformed_map_is_refused():
    m = json.loads(_both({"a": b"x", "b": b"y"}).to_json())
    del m["blake3"]["b"]
    a, b = Manifest.from_json(json.dumps(m)).entries
    assert (a.algo, b.algo, b.blake3) == (BLAKE3, SHA256, None)
    m["blake3"] = {"a": "zz", "b": "zz"}
    with pytest.raises(ValueError, match="64 hex"):
        Manifest.from_json(json.dumps(m))


def test_a_pull_checks_blake3_when_the_manifest_has_it_and_journals_it(tmp_path):
    objects = _objects(6, 5000)
    store = MemoryStore(objects)
    # a SHA-256 nobody could match: the stage succeeds only if it checks BLAKE3
    store.manifest = Manifest("ds", tuple(Entry(e.key, e.size, "0" * 64, e.blake3) for e in _both(objects).entries))
    tree = LocalTree(tmp_path / "a.zarr")
    records = []
    record = tree.record
    tree.record = lambda e, stamp, algo=None: (records.append(algo or e.algo), record(e, stamp, algo))
    res = stage(store, tree, "ds", workers=3, retries=0)
    assert res.copied == 7 and set(records) == {BLAKE3}
    assert verify_tree(tmp_path / "a.zarr", store.manifest) == []


def test_a_corrupt_object_fails_the_blake3_check(tmp_path):
    objects = _objects(4, 5000)
    store = MemoryStore(objects)
    store.manifest = _both(objects)
    store.objects["data/2.0"] = b"\0" * 5000
    with pytest.raises(ChecksumMismatch):
        stage(store, LocalTree(tmp_path / "a.zarr"), "ds", workers=2, retries=1)
    assert not (tmp_path / "a.zarr").exists()


def test_journal_lines_name_their_digest_and_old_lines_are_sha256(tmp_path, monkeypatch):
    objects = _objects(3, 4000)
    m = _both(objects)
    dest = tmp_path / "a.zarr"
    tree = LocalTree(dest)
    tree.prepare(m)
    e0, e1 = m.entries[0], m.entries[1]
    for e in (e0, e1):
        (tree.partial / e.key).parent.mkdir(parents=True, exist_ok=True)
        (tree.partial / e.key).write_bytes(objects[e.key])
    tree.record(e0, os.stat(tree.partial / e0.key).st_mtime_ns)               # a BLAKE3 line ...
    tree.flush()                                                               # ... once it is on the disk
    with open(tree.journal_path, "a") as fh:                                   # a line of an older stage
        fh.write(json.dumps({"k": e1.key, "s": e1.size, "h": e1.sha256,
                             "m": os.stat(tree.partial / e1.key).st_mtime_ns}) + "\n")
    tree.release()
    lines = _journal(tree)
    assert lines[0]["d"] == "blake3" and lines[0]["h"] == e0.blake3
    again = LocalTree(dest)
    hashed = []
    real = manifest_mod.digest_file
    monkeypatch.setattr(manifest_mod, "digest_file", lambda p, algo: (hashed.append(p), real(p, algo))[1])
    try:
        done = again.prepare(m)
    finally:
        again.release()
    assert done == {e0.key, e1.key} and hashed == []                           # both trusted, nothing hashed


def test_a_file_found_in_place_is_hashed_with_blake3_and_journalled(tmp_path):
    objects = _objects(2, 4000)
    m = _both(objects)
    tree = LocalTree(tmp_path / "a.zarr")
    tree.prepare(m)
    e = m.entries[1]
    (tree.partial / e.key).parent.mkdir(parents=True, exist_ok=True)
    (tree.partial / e.key).write_bytes(objects[e.key])
    tree.release()
    again = LocalTree(tmp_path / "a.zarr")
    assert again.prepare(m) == {e.key}
    again.release()
    (line,) = _journal(again)
    assert (line["k"], line["d"], line["h"]) == (e.key, "blake3", e.blake3)


def test_verify_uses_blake3_where_the_manifest_has_it(tmp_path):
    (tmp_path / "f").write_bytes(b"hello")
    e = Entry("f", 5, "0" * 64, blake3(b"hello").hexdigest())
    assert check_file(tmp_path / "f", e) == (BLAKE3, True)
    old = Entry("f", 5, hashlib.sha256(b"hello").hexdigest())
    assert check_file(tmp_path / "f", old) == (SHA256, True)
    assert verify_tree(tmp_path, Manifest("ds", (e,))) == []
    (tmp_path / "f").write_bytes(b"hellO")
    assert verify_tree(tmp_path, Manifest("ds", (e,))) == ["f"]


def test_ranged_large_objects_are_checked_with_blake3(tmp_path, monkeypatch):
    from maelflow_transfer import stage as stage_mod

    monkeypatch.setattr(stage_mod, "RANGE_THRESHOLD", 50_000)
    monkeypatch.setattr(stage_mod, "RANGE_SIZE", 8192)
    objects = _objects(3, 100_000)

    class Ranged(MemoryStore):
        corrupt = {("data/1.0", 16384)}

        def read_range(self, key, start, end, stop=None):
            data = self.objects[key][start:end]
            with self.lock:
                bad = (key, start) in self.corrupt
                self.corrupt.discard((key, start))
            return b"\0" * len(data) if bad else data

    store = Ranged(objects)
    store.manifest = Manifest("ds", tuple(Entry(e.key, e.size, "0" * 64, e.blake3) for e in _both(objects).entries))
    res = stage(store, LocalTree(tmp_path / "a.zarr"), "ds", workers=3, retries=1)
    assert res.copied == 4 and verify_tree(tmp_path / "a.zarr", store.manifest) == []


def test_a_local_copy_is_checked_with_blake3(tmp_path):
    from maelflow_transfer.local_source import LocalSource

    objects = _objects(4, 300_000)
    store = MemoryStore(objects)
    store.manifest = _both(objects)
    copy = tmp_path / "built.zarr"
    for key, data in objects.items():
        (copy / key).parent.mkdir(parents=True, exist_ok=True)
        (copy / key).write_bytes(data)
    assert stage(LocalSource(copy, store), LocalTree(tmp_path / "a.zarr"), "ds", workers=2, retries=0).copied == 5
    (copy / "data/1.0").write_bytes(b"\0" * 300_000)
    with pytest.raises(ChecksumMismatch, match="the local copy differs"):
        stage(LocalSource(copy, store), LocalTree(tmp_path / "b.zarr"), "ds", workers=2, retries=0)


def test_publish_writes_both_digests_from_one_read(tmp_path, monkeypatch):
    import obstore
    from obstore.store import MemoryStore as ObjMemory

    from maelflow_transfer import publish as publish_mod
    from maelflow_transfer.retry import Backoff
    from maelflow_transfer.store import Store

    monkeypatch.setattr(publish_mod, "MULTIPART_THRESHOLD", 100_000)
    monkeypatch.setattr(publish_mod, "PART_SIZE", 64 << 10)
    src = tmp_path / "src.zarr"
    objects = {"small": os.urandom(1000), "big/0": os.urandom(300_000)}
    for key, data in objects.items():
        (src / key).parent.mkdir(parents=True, exist_ok=True)
        (src / key).write_bytes(data)
    store = Store(ObjMemory(), url="s3://ewc/ds", endpoint="memory", backoff=Backoff(attempts=2, base=0.01, cap=0.01))
    publish_mod.publish(src, "ds", store, workers=2)
    doc = json.loads(bytes(obstore.get(store.objects, MANIFEST_NAME).bytes()))
    assert doc["digests"] == ["sha256", "blake3"]
    assert doc["blake3"] == {k: blake3(v).hexdigest() for k, v in objects.items()}
    assert {o["key"]: o["sha256"] for o in doc["objects"]} == {k: hashlib.sha256(v).hexdigest()
                                                              for k, v in objects.items()}
    assert bytes(obstore.get(store.objects, "big/0").bytes()) == objects["big/0"]

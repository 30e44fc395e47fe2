"""The transfer engine without services: manifest, progress, back-off, and a stage against an
in-memory store (resume, corruption, transient failures, full disk, atomic visibility)."""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

import pytest

from maelflow_transfer.errors import (ChecksumMismatch, DestinationConflict, DiskFull, NotPublished, StoreError,
                                      TransientError)
from maelflow_transfer.manifest import MANIFEST_NAME, Entry, Manifest, scan, verify_tree
from maelflow_transfer.progress import Progress, Snapshot
from maelflow_transfer.retry import Backoff
from maelflow.datasets.stage import choose_via
from maelflow_transfer.stage import stage
from maelflow_transfer.trees import JOURNAL_NAME, LocalTree

pytestmark = pytest.mark.unit


class MemoryStore:
    """The part of ``store.Store`` a stage uses, over a dict; can corrupt or fail on purpose."""

    def __init__(self, objects: dict[str, bytes], dataset: str = "ds"):
        self.objects = dict(objects)
        self.manifest = Manifest(dataset, tuple(Entry(k, len(v), hashlib.sha256(v).hexdigest())
                                                for k, v in sorted(objects.items())))
        self.backoff = Backoff(attempts=4, base=0.001, cap=0.01)
        self.url = "s3://bucket/ds"
        self.endpoint = "memory"
        self.gets: list[str] = []
        self.fail_first: dict[str, int] = {}
        self.lock = threading.Lock()

    def require_manifest(self, dataset: str) -> Manifest:
        if self.manifest is None:
            raise NotPublished(f"dataset {dataset!r} is not published")
        return self.manifest

    def get(self, key, sink, *, start=None, end=None, stop=None) -> int:
        with self.lock:
            self.gets.append(key)
            failing = self.fail_first.get(key, 0)
            if failing:
                self.fail_first[key] = failing - 1
        data = self.objects[key]
        if failing:
            sink(memoryview(data[: len(data) // 2]))
            raise TransientError(f"{key}: connection reset")
        sink(memoryview(data))
        return len(data)


def _objects(n: int = 20, size: int = 1000) -> dict[str, bytes]:
    return {f"data/{i}.0": os.urandom(size) for i in range(n)} | {".zattrs": b"{}"}


def test_manifest_round_trip_and_scan(tmp_path):
    (tmp_path / "z" / "a").mkdir(parents=True)
    (tmp_path / "z" / "a" / "0").write_bytes(b"x" * 10)
    (tmp_path / "z" / ".zgroup").write_text("{}")
    m = scan(tmp_path / "z", "z")
    assert [e.key for e in m.entries] == [".zgroup", "a/0"]   # hidden zarr metadata files are data
    assert Manifest.from_json(m.to_json()) == m
    assert m.total_bytes == 12
    assert verify_tree(tmp_path / "z", m) == []
    (tmp_path / "z" / "a" / "0").write_bytes(b"y" * 10)
    assert verify_tree(tmp_path / "z", m) == ["a/0"]


def test_snapshot_rate_eta_and_json():
    s = Snapshot(bytes_done=60, bytes_total=100, objects_done=3, objects_total=5, bytes_moved=40, elapsed=2.0)
    assert s.rate == 20 and s.eta == 2.0 and s.percent == 60
    assert Snapshot.from_json(s.to_json()) == s
    assert "3/5 objects" in s.text() and "ETA 2s" in s.text()


def test_progress_counts_skipped_apart_from_moved():
    seen = []
    p = Progress([seen.append], every=0)
    p.start(100, 4)
    p.skipped(50, 2)
    p.moved(25)
    p.object_done()
    snap = p.finish()
    assert (snap.bytes_done, snap.bytes_moved, snap.objects_done, snap.final) == (75, 25, 3, True)
    assert seen[-1] == snap


def test_backoff_grows_and_is_capped():
    b = Backoff(attempts=5, base=1.0, cap=3.0)
    assert 0.75 <= b.delay(0) <= 1.25
    assert 1.5 <= b.delay(1) <= 2.5
    assert b.delay(10) <= 3.0 * 1.25


def test_choose_via_follows_the_site():
    from types import SimpleNamespace as NS

    local = NS(connection=NS(type="local"), internet=NS(login=True))
    online = NS(connection=NS(type="ssh"), internet=NS(login=True))
    offline = NS(connection=NS(type="ssh"), internet=NS(login=False))
    assert choose_via(local) == "here"
    assert choose_via(online) == "login"
    assert choose_via(offline) == "push" and choose_via(offline, "sftp") == "push"
    assert choose_via(offline, "login") == "login"


def test_stage_copies_verifies_and_publishes_atomically(tmp_path):
    store = MemoryStore(_objects())
    dest = tmp_path / "site" / "ds.zarr"
    res = stage(store, LocalTree(dest), "ds", workers=4)
    assert (res.objects, res.copied) == (21, 21)
    assert verify_tree(dest, store.manifest) == []
    assert Manifest.from_json((dest / MANIFEST_NAME).read_text()) == store.manifest
    assert not (tmp_path / "site" / ".ds.zarr.partial").exists()
    assert not (dest / JOURNAL_NAME).exists()
    # a finished stage is not touched again
    store.gets.clear()
    again = stage(store, LocalTree(dest), "ds", workers=4)
    assert again.copied == 0 and store.gets == []


def test_stage_resumes_with_what_is_missing_or_wrong(tmp_path):
    store = MemoryStore(_objects())
    dest = tmp_path / "ds.zarr"
    partial = tmp_path / ".ds.zarr.partial"
    # an earlier, killed run: 5 objects done and journalled, one done but not journalled, one
    # written wrong, one part file left behind
    tree = LocalTree(dest)
    tree.partial.mkdir()
    for e in store.manifest.entries[:5]:
        p = partial / e.key
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(store.objects[e.key])
        tree.record(e, p.stat().st_mtime_ns)
    tree.close()
    e6, e7, e8 = store.manifest.entries[5:8]
    (partial / e6.key).write_bytes(store.objects[e6.key])
    (partial / e7.key).write_bytes(b"z" * e7.size)
    (partial / "data" / f".{Path(e8.key).name}.part").write_bytes(b"half")
    res = stage(store, LocalTree(dest), "ds", workers=3)
    assert res.already == 6 and res.copied == 15
    assert sorted(store.gets) == sorted(e.key for e in store.manifest.entries[6:])
    assert verify_tree(dest, store.manifest) == []
    assert not list(dest.rglob("*.part"))


def test_corrupt_object_is_fetched_again_then_refused(tmp_path):
    store = MemoryStore(_objects(5))
    bad = store.manifest.entries[2].key
    store.objects[bad] = b"!" * len(store.objects[bad])
    dest = tmp_path / "ds.zarr"
    with pytest.raises(ChecksumMismatch) as err:
        stage(store, LocalTree(dest), "ds", workers=2, retries=2)
    assert err.value.key == bad and bad in str(err.value) and "corrupt" in str(err.value)
    assert store.gets.count(bad) == 3
    assert not dest.exists()


def test_transient_failures_are_retried(tmp_path):
    store = MemoryStore(_objects(5))
    key = store.manifest.entries[1].key
    store.fail_first[key] = 2
    res = stage(store, LocalTree(tmp_path / "ds.zarr"), "ds", workers=2)
    assert res.copied == 6 and store.gets.count(key) == 3
    store2 = MemoryStore(_objects(3))
    store2.fail_first[store2.manifest.entries[0].key] = 99
    with pytest.raises(StoreError, match="gave up after 4 tries"):
        stage(store2, LocalTree(tmp_path / "other.zarr"), "ds", workers=1)


def test_full_disk_is_refused_before_copying(tmp_path, monkeypatch):
    store = MemoryStore(_objects(5, size=10_000))
    monkeypatch.setattr(LocalTree, "free_bytes", lambda self: 1000)
    with pytest.raises(DiskFull, match="GiB still to copy"):
        stage(store, LocalTree(tmp_path / "ds.zarr"), "ds")
    assert store.gets == [] and not (tmp_path / "ds.zarr").exists()


def test_no_space_while_writing_is_a_disk_full_error(tmp_path, monkeypatch):
    import errno

    from maelflow_transfer import trees

    store = MemoryStore(_objects(3))

    def no_space(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(trees.os, "write", no_space)
    with pytest.raises(DiskFull, match="no space left"):
        stage(store, LocalTree(tmp_path / "ds.zarr"), "ds", workers=1)
    assert not (tmp_path / "ds.zarr").exists()


def test_destination_holding_something_else_is_left_alone(tmp_path):
    store = MemoryStore(_objects(2))
    dest = tmp_path / "ds.zarr"
    dest.mkdir()
    (dest / "mine").write_text("keep")
    with pytest.raises(DestinationConflict, match="already exists"):
        stage(store, LocalTree(dest), "ds")
    assert (dest / "mine").read_text() == "keep"


def test_unpublished_dataset_is_a_clear_error(tmp_path):
    store = MemoryStore(_objects(1))
    store.manifest = None
    with pytest.raises(NotPublished, match="not published"):
        stage(store, LocalTree(tmp_path / "ds.zarr"), "ds")


def test_large_objects_are_read_as_ranges_hashed_in_order_or_whole_without_ranges(tmp_path, monkeypatch):
    """Ranges written at their offsets and hashed in order, memory bounded; a corrupt range is
    fetched again; a server without ranges gets whole objects."""
    from maelflow_transfer import stage as stage_mod
    from maelflow_transfer.store import RangesUnsupported

    monkeypatch.setattr(stage_mod, "RANGE_THRESHOLD", 50_000)
    monkeypatch.setattr(stage_mod, "RANGE_SIZE", 8192)
    monkeypatch.setattr(stage_mod, "RANGE_WINDOW", 3)
    objects = _objects(4, 100_000) | {"small": b"s" * 1000}

    class Ranged(MemoryStore):
        def __init__(self, objects, ranges=True):
            super().__init__(objects)
            self.ranges_ok, self.ranges, self.ranges_read, self.corrupt = ranges, None, [], set()

        def read_range(self, key, start, end, stop=None):
            if not self.ranges_ok:
                self.ranges = False
                raise RangesUnsupported(f"{key}: no ranges")
            with self.lock:
                self.ranges_read.append((key, start))
                bad = (key, start) in self.corrupt
                self.corrupt.discard((key, start))
            data = self.objects[key][start:end]
            return b"\0" * len(data) if bad else data

    store = Ranged(objects)
    store.corrupt.add(("data/2.0", 16384))
    res = stage(store, LocalTree(tmp_path / "a.zarr"), "ds", workers=8, retries=1)
    assert res.copied == 6 and verify_tree(tmp_path / "a.zarr", store.manifest) == []
    assert sorted(store.gets) == [".zattrs", "small"]     # large objects only as ranges
    assert sorted(k for k, s in store.ranges_read if s == 0) == ["data/0.0", "data/1.0", "data/2.0", "data/2.0",
                                                                 "data/3.0"]
    # enough objects to keep every stream busy (2 workers; the small objects are read last, so at
    # least 2 objects are left when each large one starts): whole objects, although ranges work
    busy = Ranged(objects)
    res = stage(busy, LocalTree(tmp_path / "c.zarr"), "ds", workers=2)
    assert res.copied == 6 and busy.ranges_read == [] and sorted(busy.gets) == sorted(objects)
    whole = Ranged(objects, ranges=False)
    res = stage(whole, LocalTree(tmp_path / "b.zarr"), "ds", workers=8)
    assert res.copied == 6 and verify_tree(tmp_path / "b.zarr", whole.manifest) == []
    assert whole.ranges is False and sorted(whole.gets) == sorted(objects)


def test_stage_from_a_local_copy_is_checked_against_the_published_manifest(tmp_path):
    from maelflow_transfer.local_source import LocalSource

    objects = _objects(12, 300_000)
    store = MemoryStore(objects)
    copy = tmp_path / "built.zarr"
    for key, data in objects.items():
        (copy / key).parent.mkdir(parents=True, exist_ok=True)
        (copy / key).write_bytes(data)
    res = stage(LocalSource(copy, store), LocalTree(tmp_path / "a.zarr"), "ds", workers=3, retries=0)
    assert res.copied == 13 and store.gets == []                  # nothing read from the store
    assert verify_tree(tmp_path / "a.zarr", store.manifest) == []
    (copy / "data/4.0").write_bytes(b"\0" * 300_000)              # the local copy drifted
    with pytest.raises(ChecksumMismatch, match="the local copy differs from the published dataset"):
        stage(LocalSource(copy, store), LocalTree(tmp_path / "b.zarr"), "ds", workers=3, retries=0)
    assert not (tmp_path / "b.zarr").exists()
    (copy / "data/4.0").unlink()
    with pytest.raises(StoreError, match="missing from the local copy"):
        stage(LocalSource(copy, store), LocalTree(tmp_path / "c.zarr"), "ds", workers=3, retries=0)

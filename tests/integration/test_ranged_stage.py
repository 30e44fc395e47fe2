"""Large objects staged as parallel ranged GETs, against a real S3 server process that answers them.

The workspace's ``rclone serve s3`` answers a ranged GET with 200 (obstore rightly refuses that), so
against it the stage reads every object whole. ``localbucket`` (PyPI, a small S3 server storing plain
folders) answers 206 with Content-Range: against it a large object is read as ranges in parallel,
written at their offsets and hashed in order. The thresholds are lowered (ranges of 1 MiB above
4 MiB) so that the objects stay small; the path is the same as for anemoi's ~150 MiB chunks.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from maelflow.datasets.settings import open_store
from maelflow.services.base import LOOPBACK, free_port, wait_until
from maelflow_transfer import stage as stage_mod
from maelflow_transfer.manifest import MANIFEST_NAME
from maelflow_transfer.progress import Progress
from maelflow_transfer.publish import publish
from maelflow_transfer.trees import LocalTree

pytestmark = pytest.mark.integration
LOCALBUCKET = str(Path(sys.executable).with_name("localbucket"))
MIB = 1 << 20


@pytest.fixture(scope="module")
def ranged_s3(tmp_path_factory):
    """A localbucket server on a free loopback port with an ``ewc`` bucket; its EWC settings."""
    data = tmp_path_factory.mktemp("localbucket")
    (data / "ewc").mkdir()
    port = free_port()
    log = open(data.parent / "localbucket.log", "wb")
    proc = subprocess.Popen([LOCALBUCKET, "--host", LOOPBACK, "--port", str(port), str(data)],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def up() -> bool:
        try:
            urllib.request.urlopen(f"http://{LOOPBACK}:{port}/", timeout=1).close()
            return True
        except OSError:
            return proc.poll() is not None

    try:
        assert wait_until(up, 20) and proc.poll() is None, (data.parent / "localbucket.log").read_text()
        yield {"endpoint_url": f"http://{LOOPBACK}:{port}", "access_key": "ranged-test",
               "secret_key": "ranged-test-secret", "region": "us-east-1", "bucket": "ewc"}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def source(path: Path, large: int, small: int) -> Path:
    (path / "data").mkdir(parents=True)
    for i in range(large):
        (path / "data" / f"big{i}.0").write_bytes(os.urandom(9 * MIB + 12_345))   # not a multiple of a range
    for i in range(small):
        (path / "data" / f"{i}.0").write_bytes(os.urandom(30_000))
    return path


def same_tree(a: Path, b: Path) -> bool:
    def digests(root: Path) -> dict[str, str]:
        return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in root.rglob("*") if p.is_file() and p.name != MANIFEST_NAME}
    return digests(a) == digests(b)


def test_large_objects_are_read_as_parallel_ranges_and_verified(ranged_s3, tmp_path, monkeypatch):
    monkeypatch.setattr(stage_mod, "RANGE_THRESHOLD", 4 * MIB)
    monkeypatch.setattr(stage_mod, "RANGE_SIZE", MIB)
    src = source(tmp_path / "src.zarr", large=3, small=2)     # 5 objects: too few to keep 8 streams busy
    publish(src, "ranged", open_store(ranged_s3, "datasets/ranged.zarr"), workers=4)

    store = open_store(ranged_s3, "datasets/ranged.zarr")
    reads: list[tuple[str, int, int]] = []
    real = store.read_range

    def counted(rel, start, end, stop=None):
        reads.append((rel, start, end))
        return real(rel, start, end, stop=stop)

    monkeypatch.setattr(store, "read_range", counted)
    dest = tmp_path / "site" / "ranged.zarr"
    res = stage_mod.stage(store, LocalTree(dest), "ranged", workers=8)
    assert res.copied == 5 and store.ranges is True
    # every large object arrived as its 10 ranges (9 MiB + a tail), none of the small ones did
    per_object: dict[str, list[tuple[int, int]]] = {}
    for rel, start, end in reads:
        per_object.setdefault(rel, []).append((start, end))
    assert sorted(per_object) == [f"data/big{i}.0" for i in range(3)]
    for spans in per_object.values():
        assert sorted(spans) == [(s, min(s + MIB, 9 * MIB + 12_345)) for s in range(0, 9 * MIB + 12_345, MIB)]
    assert same_tree(src, dest) and (dest / MANIFEST_NAME).is_file()


KILLED_STAGE = """
import sys
from maelflow.datasets.settings import open_store
from maelflow_transfer import stage as stage_mod
from maelflow_transfer.trees import LocalTree
stage_mod.RANGE_THRESHOLD, stage_mod.RANGE_SIZE = 4 << 20, 1 << 20
settings = dict(zip(("endpoint_url", "access_key", "secret_key", "region", "bucket"), sys.argv[1:6]))
stage_mod.stage(open_store(settings, "datasets/killed.zarr"), LocalTree(sys.argv[6]), "killed", workers=8,
                max_rate=6_000_000)
"""


def test_a_stage_killed_inside_a_large_object_resumes_and_never_shows_it_partial(ranged_s3, tmp_path, monkeypatch):
    monkeypatch.setattr(stage_mod, "RANGE_THRESHOLD", 4 * MIB)
    monkeypatch.setattr(stage_mod, "RANGE_SIZE", MIB)
    src = source(tmp_path / "src.zarr", large=4, small=0)
    publish(src, "killed", open_store(ranged_s3, "datasets/killed.zarr"), workers=4)
    dest = tmp_path / "site" / "killed.zarr"
    partial = dest.with_name(".killed.zarr.partial")
    s = ranged_s3
    proc = subprocess.Popen([sys.executable, "-c", KILLED_STAGE, s["endpoint_url"], s["access_key"], s["secret_key"],
                             s["region"], s["bucket"], str(dest)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def inside_a_large_object() -> bool:   # one object complete, another one's ranges arriving
        done = [p for p in (partial / "data").glob("big*.0")] if (partial / "data").is_dir() else []
        parts = [p for p in partial.rglob("*.part")] if partial.is_dir() else []
        return bool(done) and any(p.stat().st_size > 0 for p in parts) or proc.poll() is not None

    try:
        assert wait_until(inside_a_large_object, 60, interval=0.02)
        assert proc.poll() is None, proc.stdout.read().decode()
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not dest.exists()
    placed = sorted(p.name for p in (partial / "data").glob("big*.0"))
    assert 1 <= len(placed) < 4
    for name in placed:                      # what has its name is complete and correct
        assert (partial / "data" / name).read_bytes() == (src / "data" / name).read_bytes()

    res = stage_mod.stage(open_store(ranged_s3, "datasets/killed.zarr"), LocalTree(dest), "killed", workers=8,
                          progress=Progress())
    assert res.already == len(placed) and res.copied == 4 - len(placed)
    assert same_tree(src, dest) and not partial.exists()
    assert not list(dest.rglob("*.part"))

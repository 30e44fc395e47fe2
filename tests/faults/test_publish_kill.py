"""SIGKILL of ``maelflow transfer publish`` at seeded random points (issue 17, item 7).

The real command as a process of its own, publishing to the workspace's real ``rclone serve s3``,
killed with SIGKILL (no handler runs) at points drawn from fixed seeds across its run: after
every kill the store must not show a manifest unless every object it lists is there with its
checksum (a manifest is the mark of a complete dataset), and a re-run must complete with exactly
the dataset's objects under its prefix (nothing left over, nothing twice) and their right bytes.
One object is above the multipart threshold, so some kills land inside a multipart upload.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from maelflow.workspace import Workspace
from maelflow_transfer.manifest import MANIFEST_NAME, Manifest
from maelflow_transfer.store import MULTIPART_THRESHOLD

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
SEEDS = (11, 23, 37)


def _dataset(root: Path) -> dict[str, bytes]:
    rng = random.Random(5)
    # many small objects after the kill points (which lie among the first 80): the publish is still
    # well short of its manifest when a busy test process's listing sees the point reached
    files = {f"data/{i // 40}.{i % 40}": rng.randbytes(4 * 1024) for i in range(1200)}
    files[".zattrs"] = json.dumps({"name": "kill-publish"}).encode()
    files["big/0"] = rng.randbytes(MULTIPART_THRESHOLD + (3 << 20))      # a multipart upload
    for key, data in files.items():
        (root / key).parent.mkdir(parents=True, exist_ok=True)
        (root / key).write_bytes(data)
    return files


def _publish(ws: Workspace, source: Path, prefix: str, workers: int = 4) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "maelflow", "transfer", "publish", str(source),
                             "--dataset", "kill-publish", "--prefix", prefix, "--workers", str(workers),
                             "--workspace", str(ws.root)], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


_STORES: dict[tuple[str, str], object] = {}


def _store(ws: Workspace, prefix: str):
    """The writer's store of ``prefix`` (the server that took the publish's PUTs: it sees them at once)."""
    from maelflow.ewc import workspace_store

    key = (str(ws.root), prefix)
    if key not in _STORES:
        _STORES[key] = workspace_store(ws, "ewc", prefix)
    return _STORES[key]


def _objects(ws: Workspace, prefix: str) -> dict[str, int]:
    import obstore

    return {o["path"]: o["size"] for o in obstore.list(_store(ws, prefix)).collect()}


def _bytes(ws: Workspace, prefix: str, key: str) -> bytes:
    import obstore

    return bytes(obstore.get(_store(ws, prefix), key).bytes())


def _assert_manifest_only_when_complete(ws: Workspace, prefix: str, files: dict[str, bytes]) -> bool:
    """True when a manifest is shown; then every object it lists is there, whole and right."""
    objects = _objects(ws, prefix)
    if MANIFEST_NAME not in objects:
        return False
    manifest = Manifest.from_json(_bytes(ws, prefix, MANIFEST_NAME))
    assert set(manifest.by_key()) == set(files)
    for key, data in files.items():
        assert objects.get(key) == len(data), f"{prefix}: manifest shown but {key} is missing or short"
        assert hashlib.sha256(_bytes(ws, prefix, key)).digest() == hashlib.sha256(data).digest(), key
    return True


def _run(ws: Workspace, source: Path, prefix: str) -> float:
    t0 = time.monotonic()
    proc = _publish(ws, source, prefix)
    assert proc.wait(timeout=300) == 0, f"publish to {prefix} failed (rc {proc.returncode})"
    return time.monotonic() - t0


def test_publish_killed_at_seeded_points_never_shows_an_incomplete_dataset_and_reruns_clean(services, tmp_path):
    import obstore

    ws = Workspace(tmp_path / "ws")
    services(ws, "s3")
    source = tmp_path / "kill-publish.zarr"
    files = _dataset(source)
    prefix = "datasets/kill-publish.zarr"
    store = _store(ws, prefix)
    # the points: once a seeded number of objects is in the store, each kill later than the one
    # before (every run continues from what the killed ones left); a count rather than a time, which
    # would be another point on a busier machine
    points = sorted(random.Random(seed).randint(3, 80) for seed in SEEDS)
    cut_short = 0
    for seed, after in zip(SEEDS, points):
        proc = _publish(ws, source, prefix, workers=1)   # slow enough for the listing to keep up
        deadline = time.monotonic() + 120
        while proc.poll() is None and len(obstore.list(store).collect()) < after:
            assert time.monotonic() < deadline, f"seed {seed}: publish wrote fewer than {after} objects in 120 s"
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGKILL, f"seed {seed}: publish ended (rc {proc.returncode}) before the kill"
        # a manifest only for a complete dataset (a kill that came late leaves a complete one)
        cut_short += not _assert_manifest_only_when_complete(ws, prefix, files)
    assert cut_short >= 2, f"only {cut_short} of {len(SEEDS)} kills landed before the manifest"
    _run(ws, source, prefix)                                # the re-run completes from what is there
    assert _assert_manifest_only_when_complete(ws, prefix, files)
    # exactly the dataset's objects and its manifest: no leftover part, temporary or duplicate key
    assert set(_objects(ws, prefix)) == set(files) | {MANIFEST_NAME}
    # and nothing written beside the prefix
    tops = {o["path"].split("/")[0] for o in obstore.list(_store(ws, "datasets")).collect()}
    assert tops == {"kill-publish.zarr"}

"""A full disk at the stage's destination (issue 17, item 7): a real, small tmpfs mounted by the test.

Two ways to run out: (a) the dataset is larger than the free space, which the stage sees before it
copies anything: the error names the destination and the space needed and free; (b) the space
runs out while objects are written (a tmpfs takes a 4 KiB page for each small file, more than the
manifest's sizes add up to): the error names the destination and says the stage continues where it
stopped. In both the destination never appears; after space is freed (the tmpfs remounted larger)
the same stage completes, keeping what (b) had already written.
"""

from __future__ import annotations

import os
import random
import subprocess
from pathlib import Path

import pytest

from maelflow.datasets.settings import ewc_settings, open_store
from maelflow.datasets.stage import stage_dataset
from maelflow.workspace import Workspace
from maelflow_transfer.errors import DiskFull
from maelflow_transfer.manifest import verify_tree
from maelflow_transfer.publish import publish

pytestmark = pytest.mark.integration


@pytest.fixture
def small_disk(tmp_path) -> Path:
    """A 1 MiB tmpfs, unmounted at teardown (mounting needs root)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs as the full destination needs root (run the fault tests as root)")
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0755", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def _publish(ws: Workspace, root: Path, name: str, files: dict[str, bytes]):
    for key, data in files.items():
        (root / key).parent.mkdir(parents=True, exist_ok=True)
        (root / key).write_bytes(data)
    prefix = f"datasets/{name}.zarr"
    publish(root, name, open_store(ewc_settings(ws), prefix))
    return prefix


def test_stage_to_a_full_disk_fails_clearly_stays_invisible_and_resumes(services, tmp_path, small_disk):
    ws = Workspace(tmp_path / "ws")
    services(ws, "s3")
    rng = random.Random(3)

    # (a) larger than the disk: refused before anything is copied
    big = _publish(ws, tmp_path / "big.zarr", "full-big", {"data/0": rng.randbytes(3 << 20), ".zattrs": b"{}"})
    dest = small_disk / "full-big.zarr"
    with pytest.raises(DiskFull) as caught:
        stage_dataset(ws, "full-big", via="here", dest=str(dest), prefix=big)
    text = str(caught.value)
    assert str(small_disk) in text and "still to copy" in text and "free" in text, text
    assert not dest.exists()

    # (b) fits by the manifest's sizes, not on the disk: runs out while writing
    files = {f"data/{i // 50}.{i % 50}": rng.randbytes(200) for i in range(400)}
    small = _publish(ws, tmp_path / "small.zarr", "full-small", files)
    dest = small_disk / "full-small.zarr"
    with pytest.raises(DiskFull) as caught:
        stage_dataset(ws, "full-small", via="here", dest=str(dest), prefix=small)
    text = str(caught.value)
    assert str(small_disk) in text and "no space left" in text and "continues where it stopped" in text, text
    assert not dest.exists()
    assert (small_disk / ".full-small.zarr.partial").is_dir(), sorted(os.listdir(small_disk))

    # space freed: the same stage completes and keeps what was written before
    subprocess.run(["mount", "-o", "remount,size=16m", str(small_disk)], check=True)
    res, where, _ = stage_dataset(ws, "full-small", via="here", dest=str(dest), prefix=small)
    assert where == str(dest) and dest.is_dir()
    assert res.objects == len(files) + 1 or res.objects == len(files), res.summary()
    assert res.already > 0, res.summary()                   # what (b) wrote before the disk filled
    manifest = open_store(ewc_settings(ws), small).require_manifest("full-small")
    assert verify_tree(dest, manifest) == []
    assert not (small_disk / ".full-small.zarr.partial").exists()

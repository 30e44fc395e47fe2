"""A local destination's safety rules: never through a symlink, one stage at a time, synced."""

from __future__ import annotations

import hashlib
import os

import pytest

from maelflow_transfer.errors import DestinationConflict
from maelflow_transfer.manifest import Entry, Manifest
from maelflow_transfer.paths import UnsafePath
from maelflow_transfer.trees import LOCK_NAME, LocalTree, partial_name

pytestmark = pytest.mark.unit


def _manifest(**objects: bytes) -> Manifest:
    entries = [Entry(k, len(v), hashlib.sha256(v).hexdigest()) for k, v in sorted(objects.items())]
    return Manifest("ds", tuple(entries))


def test_a_partial_folder_that_is_a_symlink_is_refused_and_its_target_untouched(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "precious").write_text("keep me")
    dest = tmp_path / "datasets" / "ds.zarr"
    dest.parent.mkdir()
    os.symlink(elsewhere, dest.with_name(partial_name(dest.name)))
    with pytest.raises(UnsafePath, match="symbolic link"):
        LocalTree(dest).prepare(_manifest(a=b"1"))
    assert sorted(os.listdir(elsewhere)) == ["precious"]
    assert (elsewhere / "precious").read_text() == "keep me"


def test_a_folder_inside_the_partial_that_links_outside_is_never_written_through(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    tree = LocalTree(tmp_path / "ds.zarr")
    manifest = _manifest(**{"sub/a": b"1"})
    tree.prepare(manifest)
    os.symlink(outside, tree.partial / "sub")
    with pytest.raises(UnsafePath):
        tree.makedirs(["sub/a"])
    with pytest.raises(UnsafePath):
        tree.writer(manifest.entries[0])
    assert os.listdir(outside) == []
    tree.release()


def test_two_stages_to_one_destination_never_run_at_once(tmp_path):
    manifest = _manifest(a=b"1")
    first, second = LocalTree(tmp_path / "ds.zarr"), LocalTree(tmp_path / "ds.zarr")
    first.prepare(manifest)
    with pytest.raises(DestinationConflict, match="another stage"):
        second.prepare(manifest)
    first.close()                                  # writers done: the lock is still held
    with pytest.raises(DestinationConflict):
        second.prepare(manifest)
    first.release()
    assert second.prepare(manifest) == set()       # the lock went with the first stage
    second.release()


def test_a_finished_copy_keeps_no_lock_journal_or_partial_folder(tmp_path):
    data = b"payload"
    manifest = _manifest(a=data)
    tree = LocalTree(tmp_path / "ds.zarr")
    tree.prepare(manifest)
    part = tree.writer(manifest.entries[0])
    part.write(memoryview(data))
    part.commit(lambda: None)
    tree.finish(manifest)
    assert sorted(os.listdir(tmp_path / "ds.zarr")) == [".maelflow-manifest.json", "a"]
    assert not (tmp_path / partial_name("ds.zarr")).exists()
    assert not (tmp_path / "ds.zarr" / LOCK_NAME).exists()

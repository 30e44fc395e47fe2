"""Names from the store or a site checked before they become paths: manifest keys, a catalogue
task's dataset, site listings, and the "lands inside its destination" checks."""

from __future__ import annotations

import hashlib
import json
import os

import pytest

from maelflow_transfer.errors import TransferError
from maelflow_transfer.manifest import Entry, Manifest
from maelflow_transfer.paths import (UnsafePath, check_inside, check_key, check_segment, inside, key_problem,
                                     listing_entry)

pytestmark = pytest.mark.unit

BAD_KEYS = {
    "": "empty",
    "/etc/passwd": "absolute",
    "//x": "absolute",
    "..": "'..'",
    "../x": "'..'",
    "../../x": "'..'",
    "a/../../x": "'..'",
    "a/..": "'..'",
    ".": "'.'",
    "./a": "'.'",
    "a/./b": "'.'",
    "a//b": "empty segment",
    "a/": "empty segment",
    "a\\b": "backslash",
    "..\\..\\x": "backslash",
    "a\0b": "NUL",
    "a\nb": "line break",
    "x\n..": "line break",
    "a\rb": "line break",
    "a\tb": "control character",
    "a\x1bb": "control character",
    "a\x7fb": "control character",
}
GOOD_KEYS = [".zattrs", "data/.zarray", "data/0.0", "a/b/c/d.e", "..a", "a..b", "a/b..", "...", "é/ü", "a b"]


@pytest.mark.parametrize("key", list(BAD_KEYS))
def test_every_bad_key_form_is_refused(key):
    problem = key_problem(key)
    assert problem and BAD_KEYS[key] in problem
    with pytest.raises(UnsafePath) as err:
        check_key(key)
    assert isinstance(err.value, TransferError) and err.value.key == key
    assert repr(key) in str(err.value)          # shown escaped: a newline cannot forge a second line
    assert "\n" not in str(err.value) and "\0" not in str(err.value)


@pytest.mark.parametrize("key", [None, 3, b"data/0.0", ["a"]])
def test_a_key_that_is_no_string_is_refused(key):
    with pytest.raises(UnsafePath, match="not a string"):
        check_key(key)


@pytest.mark.parametrize("key", GOOD_KEYS)
def test_ordinary_keys_pass(key):
    assert check_key(key) == key


@pytest.mark.parametrize("name", ["../x", "..", ".", "a/b", "/x", "", "a\\b", "a\nb", "a\0b"])
def test_a_dataset_name_is_one_safe_segment(name):
    with pytest.raises(UnsafePath, match="dataset name"):
        check_segment(name, "dataset name")


def test_a_dataset_name_passes():
    assert check_segment("aifs-ea-an-oper-0001-mars-o96-1979-2022-6h-v6") == "aifs-ea-an-oper-0001-mars-o96-1979-2022-6h-v6"
    assert check_segment("tr.task_1") == "tr.task_1"


def _manifest_json(keys: list[str], dataset: str = "planted") -> str:
    objects = [{"key": k, "size": 1, "sha256": hashlib.sha256(b"x").hexdigest()} for k in keys]
    return json.dumps({"dataset": dataset, "format": 1, "objects": objects})


@pytest.mark.parametrize("key", list(BAD_KEYS))
def test_a_manifest_with_a_bad_key_is_refused_naming_the_dataset_and_the_key(key):
    with pytest.raises(UnsafePath) as err:
        Manifest.from_json(_manifest_json([".zattrs", key, "data/0.0"]))
    text = str(err.value)
    assert "'planted'" in text and repr(key) in text and "refused" in text
    assert err.value.key == key


def test_a_manifest_listing_a_key_twice_is_refused():
    with pytest.raises(UnsafePath, match="listed twice"):
        Manifest.from_json(_manifest_json(["data/0.0", "data/0.0"]))


def test_a_manifest_is_checked_when_made_too():
    with pytest.raises(UnsafePath, match=r"'\.\./x'"):
        Manifest("ds", (Entry("../x", 1, "0" * 64),))
    good = Manifest("ds", (Entry(".zattrs", 2, "0" * 64), Entry("data/0.0", 1, "1" * 64)))
    assert Manifest.from_json(good.to_json()) == good


def test_inside_joins_a_safe_key_under_its_root(tmp_path):
    assert inside(tmp_path, "data/0.0") == tmp_path / "data/0.0"
    assert check_inside(tmp_path, tmp_path) == tmp_path
    for key in ("../x", "/etc/passwd", "a/../../x"):
        with pytest.raises(UnsafePath):
            inside(tmp_path, key)


def test_inside_refuses_a_folder_swapped_for_a_symlink_out(tmp_path):
    root = tmp_path / ".ds.zarr.partial"
    root.mkdir()
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    os.symlink(outside, root / "data")
    with pytest.raises(UnsafePath, match="outside"):
        inside(root, "data/0.0")
    os.symlink(outside / "target", root / "file")      # a dangling link out, at the object's own name
    with pytest.raises(UnsafePath, match="outside"):
        inside(root, "file")
    # a link that stays inside is fine, and so is a root that is itself reached through a link
    (root / "real").mkdir()
    os.symlink(root / "real", root / "alias")
    assert inside(root, "alias/x") == root / "alias/x"
    os.symlink(root, tmp_path / "root-link")
    assert inside(tmp_path / "root-link", "real/x") == tmp_path / "root-link" / "real/x"


def test_listing_entries():
    assert listing_entry("checkpoint/run/last.ckpt", "the run folder") == "checkpoint/run/last.ckpt"
    for rel in ("../y", "x\n..", "/abs", ""):
        with pytest.raises(UnsafePath, match="the run folder"):
            listing_entry(rel, "the run folder")


def test_the_worker_refuses_an_unsafe_dataset_and_survives_any_error_in_a_task(monkeypatch):
    from maelflow.datasets import catalogue_hook as hook
    from maelflow.datasets import stage as stage_mod
    from maelflow.datasets import settings as settings_mod
    from maelflow.datasets import worker

    queue = [hook.TransferTask("t1", "../../etc/x", "ewc", "site", {}),
             hook.TransferTask("t2", "boom", "ewc", "site", {}),
             hook.TransferTask("t3", "unreported", "ewc", "site", {}),
             hook.TransferTask("t4", "fine", "ewc", "site", {})]
    finished: dict[str, tuple[bool, str]] = {}
    staged: list[str] = []

    def next_task(ws, site, catalogue=None, **kw):
        return queue.pop(0) if queue else None

    def task_finished(ws, task, ok, message="", catalogue=None):
        if task.uuid == "t3":
            raise hook.CatalogueUnavailable("closing task t3: cannot reach the catalogue")
        finished[task.uuid] = (ok, message)

    def stage_dataset(ws, dataset, **kw):
        staged.append(dataset)
        if dataset in ("boom", "unreported"):
            raise KeyError("a bug")

        class R:
            def summary(self):
                return "1 object"
        return R(), f"/site/{dataset}.zarr", "here"

    monkeypatch.setattr(hook, "client", lambda ws: object())
    monkeypatch.setattr(hook, "next_transfer_task", next_task)
    monkeypatch.setattr(hook, "task_finished", task_finished)
    monkeypatch.setattr(hook, "location_of", lambda *a, **k: None)
    monkeypatch.setattr(hook, "register_location", lambda *a, **k: {})
    monkeypatch.setattr(settings_mod, "ewc_settings", lambda ws, **k: {"bucket": "ewc"})
    monkeypatch.setattr(stage_mod, "stage_dataset", stage_dataset)
    lines: list[str] = []
    assert worker.run_worker(None, "site", None, once=True, log=lines.append) == 4
    assert staged == ["boom", "unreported", "fine"]            # the unsafe name never reached a stage
    assert finished["t1"][0] is False and "'../../etc/x'" in finished["t1"][1] and "refused" in finished["t1"][1]
    assert finished["t2"][0] is False and "KeyError" in finished["t2"][1]
    assert finished["t4"][0] is True
    log = "\n".join(lines)
    assert "Traceback" in log and "could not be marked failed" in log


def test_the_worker_refuses_an_unsafe_prefix_from_the_catalogue(monkeypatch):
    from maelflow.datasets import catalogue_hook as hook
    from maelflow.datasets import worker

    monkeypatch.setattr(hook, "location_of", lambda *a, **k: "s3://ewc/../../other")
    with pytest.raises(UnsafePath, match="prefix of dataset"):
        worker._prefix_from_catalogue(None, "ds", "ewc", "ewc", None)
    monkeypatch.setattr(hook, "location_of", lambda *a, **k: "s3://ewc/datasets/ds.zarr/")
    assert worker._prefix_from_catalogue(None, "ds", "ewc", "ewc", None) == "datasets/ds.zarr"

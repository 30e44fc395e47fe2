"""A manifest planted in the store with keys that leave the destination (``../../x``, an absolute
path), its objects beside it so that every hash matches: the stage refuses the dataset, says which
key, and writes nothing outside its destination (nor anything at all)."""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
from pathlib import Path

import pytest
from click.testing import CliRunner

from maelflow.cli.main import cli
from maelflow.datasets.settings import ewc_settings
from maelflow.datasets.stage import stage_dataset
from maelflow.services import stack as stack_mod
from maelflow.workspace import Workspace
from maelflow_transfer.errors import TransferError
from maelflow_transfer.manifest import MANIFEST_NAME

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def s3ws(tmp_path_factory):
    """A workspace with its S3 server (rclone serve s3) running."""
    ws = Workspace(tmp_path_factory.mktemp("planted") / "ws")
    try:
        stack_mod.up(ws, names=["s3"])
        yield ws
    finally:
        stack_mod.down(ws)


def _cli(ws, *args):
    return CliRunner().invoke(cli, list(args), env={"MAELFLOW_WORKSPACE": str(ws.root)}, catch_exceptions=False)


def _zarr(path: Path) -> Path:
    (path / "data").mkdir(parents=True)
    (path / ".zgroup").write_text('{"zarr_format": 2}')
    (path / "data" / ".zarray").write_text('{"chunks": [1, 64], "shape": [3, 64]}')
    for i in range(3):
        (path / "data" / f"{i}.0").write_bytes(os.urandom(64))
    return path


def _files(root: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _s3(ws):
    """A plain S3 client with the workspace's key: what anyone holding that key can do."""
    import boto3
    from botocore.config import Config

    settings = ewc_settings(ws)
    client = boto3.client("s3", endpoint_url=settings["endpoint_url"], aws_access_key_id=settings["access_key"],
                          aws_secret_access_key=settings["secret_key"],
                          region_name=settings.get("region") or "us-east-1",
                          config=Config(s3={"addressing_style": "path"}))
    return client, settings["bucket"]


def _plant(ws, published: str, name: str, bad_key: str, payload: bytes) -> None:
    """``name``: the objects of ``published`` and ``payload`` under ``bad_key``, with a manifest
    listing them all (hashes right), written through the S3 API."""
    s3, bucket = _s3(ws)
    src, dst = f"datasets/{published}.zarr", f"datasets/{name}.zarr"
    manifest = json.loads(s3.get_object(Bucket=bucket, Key=f"{src}/{MANIFEST_NAME}")["Body"].read())
    for obj in manifest["objects"]:
        body = s3.get_object(Bucket=bucket, Key=f"{src}/{obj['key']}")["Body"].read()
        s3.put_object(Bucket=bucket, Key=f"{dst}/{obj['key']}", Body=body)
    if not bad_key.startswith("/"):      # the object itself, where the key points in the store (HTTP
        store_key = posixpath.normpath(f"{dst}/{bad_key}")      # servers clean '..' out of a URL path)
        s3.put_object(Bucket=bucket, Key=store_key, Body=payload)
    objects = manifest["objects"] + [{"key": bad_key, "size": len(payload),
                                      "sha256": hashlib.sha256(payload).hexdigest()}]
    manifest.update(dataset=name, objects=objects, total_bytes=sum(o["size"] for o in objects))
    s3.put_object(Bucket=bucket, Key=f"{dst}/{MANIFEST_NAME}", Body=json.dumps(manifest).encode())


@pytest.mark.parametrize("source", ["store", "local-copy"])
@pytest.mark.parametrize("case", ["relative", "absolute"])
def test_a_planted_manifest_with_an_escaping_key_is_refused(s3ws, tmp_path, case, source):
    """``local-copy``: the objects are read from the published folder (``--from``), the manifest
    from the store; a key leaving the folder would also read a file outside it."""
    ws = s3ws
    good_name = f"pm-good-{case}-{source}"
    src = _zarr(tmp_path / "src" / f"{good_name}.zarr")
    res = _cli(ws, "transfer", "publish", str(src), "--dataset", good_name)
    assert res.exit_code == 0, res.output
    name = f"pm-evil-{case}-{source}"
    area = tmp_path / "area"
    site = area / "one" / "two" / "site"                  # ../../x from the partial folder: area/one/x
    site.mkdir(parents=True)
    dest = site / f"{name}.zarr"
    payload = b"planted by whoever holds the S3 key\n"
    absolute = tmp_path / "abs-target"                    # where an absolute key reads and writes
    absolute.write_bytes(payload)
    (tmp_path / "x").write_bytes(payload)                 # src/../../x: what a local copy would read
    bad_key = "../../x" if case == "relative" else str(absolute)
    _plant(ws, good_name, name, bad_key, payload)
    before = _files(area)
    stat = absolute.stat()
    from_ = {"source": str(src)} if source == "local-copy" else {}

    with pytest.raises(TransferError) as err:
        stage_dataset(ws, name, via="here", dest=str(dest), **from_)
    text = str(err.value)
    assert repr(name) in text and repr(bad_key) in text and "refused" in text, text

    args = ["--from", str(src)] if source == "local-copy" else []
    res = _cli(ws, "transfer", "stage", name, "--dest", str(dest), *args)
    assert res.exit_code != 0 and repr(bad_key) in res.output and "refused" in res.output, res.output

    # nothing written anywhere: not at the escaped places, not in any parent, not even the destination
    assert _files(area) == before
    assert not (area / "one" / "x").exists() and not (area / "x").exists()
    after = absolute.stat()
    assert (after.st_ino, after.st_mtime_ns, absolute.read_bytes()) == (stat.st_ino, stat.st_mtime_ns, payload)
    assert not dest.exists() and not (site / f".{name}.zarr.partial").exists()
    assert sorted(p.name for p in site.iterdir()) == []
    for parent, only in ((site.parent, "site"), (site.parent.parent, "two"), (area, "one")):
        assert [p.name for p in parent.iterdir()] == [only]

    # the dataset it was copied from still stages, the same way, to the same kind of place
    good = site / f"{good_name}.zarr"
    stage_dataset(ws, good_name, via="here", dest=str(good), **from_)
    assert sorted(p.name for p in site.iterdir()) == [good.name]
    assert (good / "data" / "2.0").read_bytes() == (src / "data" / "2.0").read_bytes()

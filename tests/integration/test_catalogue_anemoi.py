"""The real ``anemoi-registry`` command (0.3.4) against our catalogue and our rclone S3 server.

The client is configured the way docs/catalogue.md tells users to: ``maelflow catalogue
client-config`` writes ``settings.toml`` and ``settings.secrets.toml`` (token, S3 keys) into a
private HOME, and ``AWS_ALLOW_HTTP=true`` lets its S3 library (obstore) use the plain-http endpoint.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from maelflow.cli.main import cli
from tests.integration.test_catalogue_support import BACKENDS, shared_env

pytestmark = pytest.mark.integration  # the real anemoi-registry client comes with the [anemoi] extra

NAME = "aifs-ea-an-oper-0001-mars-10p0-2020-2020-6h-v1-maelflow"
CKPT_UUID = "a5275e04-0000-0000-a0f6-be19591b09fe"


@pytest.fixture(scope="module", params=BACKENDS)
def env(tmp_path_factory, pytestconfig, request):
    return shared_env(tmp_path_factory, pytestconfig, request.param)


@pytest.fixture(scope="module")
def home(env, tmp_path_factory) -> Path:
    home = tmp_path_factory.mktemp("anemoi-home")
    result = CliRunner().invoke(cli, ["catalogue", "client-config", "--role", "admin", "--allow-delete",
                                      "--dir", str(home / ".config" / "anemoi"), "--workspace", str(env.ws.root)])
    assert result.exit_code == 0, result.output
    return home


@pytest.fixture(scope="module")
def zarr_path(tmp_path_factory) -> Path:
    from maelflow.training.synthetic import make_synthetic

    return make_synthetic(tmp_path_factory.mktemp("zarr") / f"{NAME}.zarr", dates=16)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A checkpoint as anemoi-training writes it for the registry: a zip with ``*/anemoi.json`` metadata."""
    path = tmp_path_factory.mktemp("ckpt") / "inference-last.ckpt"
    metadata = {"version": "1.0", "uuid": CKPT_UUID, "run_id": "run-anemoi-test", "timestamp": "2026-11-23T10:00:00",
                "seed": 42, "dataset": {"arguments": {"args": [f"/data/{NAME}.zarr"], "kwargs": {}}},
                "config": {"training": {"run_id": "run-anemoi-test"}}, "provenance_training": {"python": "3.11"}}
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("inference-last/data.pkl", os.urandom(20000))
        z.writestr("inference-last/anemoi-metadata/anemoi.json", json.dumps(metadata))
    return path


def anemoi(home: Path, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANEMOI_", "AWS_"))}
    env.update(HOME=str(home), AWS_ALLOW_HTTP="true")
    exe = str(Path(sys.executable).parent / "anemoi-registry")
    result = subprocess.run([exe, *args], capture_output=True, text=True, env=env, timeout=timeout, cwd=home)
    if check:
        assert result.returncode == 0, f"anemoi-registry {' '.join(args)}:\n{result.stdout}\n{result.stderr}"
    return result


def test_register_dataset_add_upload_and_remove_locations(env, home, zarr_path):
    anemoi(home, "datasets", str(zarr_path), "--register")
    again = anemoi(home, "datasets", str(zarr_path), "--register")  # 409 is 'already exists, ok'
    assert "Traceback" not in again.stderr
    record = env.client("read").get("datasets", NAME)
    assert record["metadata"]["variables"] == ["10u", "10v", "2t", "msl"] and record["metadata"]["shape"][0] == 16

    # --upload: a transfer task, the zarr copied by the client itself into our S3, then the location
    anemoi(home, "datasets", str(zarr_path), "--add-location", "ewc", "--upload")
    target = f"s3://ewc/datasets/{NAME}.zarr"
    keys = env.s3_keys("ewc", f"datasets/{NAME}.zarr/")
    assert f"datasets/{NAME}.zarr/.zattrs" in keys and len(keys) >= 10
    anemoi(home, "datasets", NAME, "--add-location", "atos", "--uri-pattern", "/ec/res/{name}.zarr")
    anemoi(home, "datasets", NAME, "--set-status", "experimental")
    locations = env.client("read").get("datasets", NAME)["locations"]
    assert locations == {"ewc": {"path": target}, "atos": {"path": f"/ec/res/{NAME}.zarr"}}
    anemoi(home, "datasets", NAME, "--remove-location", "atos")
    record = env.client("read").get("datasets", NAME)
    assert record["locations"] == {"ewc": {"path": target}} and record["status"] == "experimental"
    assert env.client("read").list("tasks", dataset=NAME) == []  # the upload task was deleted when done


def test_register_weights_with_upload_to_our_s3(env, home, checkpoint):
    anemoi(home, "weights", str(checkpoint), "--register")
    record = env.client("read").get("weights", CKPT_UUID)
    assert record["metadata"]["run_id"] == "run-anemoi-test" and record["metadata"]["size"] == checkpoint.stat().st_size
    path = record["locations"]["ewc"]["path"]
    # uploaded by the client with its write keys: to the datasets bucket (the catalogue's own bucket is
    # written by the catalogue service only)
    assert path == f"s3://ewc/artefacts/weights/{CKPT_UUID}.ckpt"
    body = env.s3_bytes("ewc", f"artefacts/weights/{CKPT_UUID}.ckpt")
    assert body == checkpoint.read_bytes()
    found = anemoi(home, "weights", CKPT_UUID)  # lookup: ?name=&type= (must be []), ?uuid=, then GET x2
    assert "Found 2" not in found.stderr
    graph = env.client("read").lineage(CKPT_UUID, collection="weights")
    assert {"source": f"datasets:{NAME}", "target": "trainings@run_id:run-anemoi-test",
            "relation": "trained-on"} in graph["edges"]


def test_list_commands(env, home, zarr_path, checkpoint):
    if not env.client("read").exists("datasets", NAME):  # each test also runs alone
        anemoi(home, "datasets", str(zarr_path), "--register")
    if not env.client("read").exists("weights", CKPT_UUID):
        anemoi(home, "weights", str(checkpoint), "--register")
    listed = anemoi(home, "list", "datasets")
    assert NAME in listed.stdout.split()
    as_json = json.loads(anemoi(home, "list", "datasets", "--json").stdout)
    assert NAME in [d["name"] for d in as_json]
    assert CKPT_UUID in anemoi(home, "list", "weights").stdout.split()


def test_transfer_worker_takes_a_queued_task(env, home, zarr_path, tmp_path):
    if not env.client("read").exists("datasets", NAME):
        anemoi(home, "datasets", str(zarr_path), "--register")
    if "ewc" not in env.client("read").get("datasets", NAME).get("locations", {}):
        anemoi(home, "datasets", str(zarr_path), "--add-location", "ewc", "--upload")
    new = anemoi(home, "tasks", "--new", "action=transfer-dataset", "source=ewc", "destination=hpc-local",
                 f"dataset={NAME}")
    task_uuid = new.stdout.strip().splitlines()[-1]
    assert env.client("read").get("tasks", task_uuid)["status"] == "queued"
    target = tmp_path / "hpc"
    target.mkdir()
    anemoi(home, "worker", "transfer-dataset", "--destination", "hpc-local", "--target-dir", str(target),
           "--published-target-dir", "/hpc/published", "--heartbeat", "1", "--timeout", "100")
    assert (target / f"{NAME}.zarr" / ".zattrs").is_file()
    locations = env.client("read").get("datasets", NAME)["locations"]
    assert locations["hpc-local"] == {"path": f"/hpc/published/{NAME}.zarr"}
    assert not env.client("read").exists("tasks", task_uuid)  # done tasks are deleted by the worker

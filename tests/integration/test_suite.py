"""The suite on a real ecflow_server: run, abort with a reason, requeue, kill, server restart."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest

from maelflow.config.loader import load_experiment
from maelflow.demo import prepare_datasets
from maelflow.ecf import client_for
from maelflow.services import stack as stack_mod
from maelflow.suite.server import control, deploy, find, tree
from maelflow.workspace import Workspace
from tests.conftest import PREBUILT, REPO, write_yaml
from tests.integration.suite_helpers import wait_for

pytestmark = pytest.mark.integration
MAELFLOW = str(Path(sys.executable).with_name("maelflow"))


def _experiment(config_root: Path, name: str, **fields) -> str:
    data = {"name": name, "sites": ["local"], "datasets": ["synth-small-numpy-10p0-2020-2020-6h-v1"], "trainings": ["tiny"], **fields}
    return str(write_yaml(config_root / "experiments" / f"{name}.yaml", data))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return False


def test_demo_end_to_end_through_the_cli(stack):
    ws, infos = stack
    env = dict(os.environ, MAELFLOW_WORKSPACE=str(ws.root))
    run = subprocess.run([MAELFLOW, "demo", "--timeout", "300"], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=400)
    assert run.returncode == 0, run.stdout + run.stderr
    status = json.loads(subprocess.run([MAELFLOW, "status", "demo", "--json"], env=env, capture_output=True,
                                       text=True, check=True).stdout)
    suite = status["suites"][0]
    assert suite["state"] == "complete"
    train = find(status, "/demo/local/train/tiny/train")
    assert train["meters"]["epoch"]["value"] == 3
    assert train["events"]["checkpoint"] is True
    assert "loss" in train["labels"]["info"] or "done" in train["labels"]["info"]
    stage = find(status, "/demo/local/data/synth_demo_local_5p0_2020_2020_6h_v1/stage")
    assert stage["meters"]["progress"]["value"] == 100 and stage["events"]["verified"] is True
    # metrics reached the MLflow server, under the run id shown in the label
    assert train["labels"]["mlflow"].startswith("run "), train["labels"]
    run_id = train["labels"]["mlflow"].split()[1]
    client = mlflow.MlflowClient(infos["mlflow"].url)
    history = client.get_metric_history(run_id, "train_loss_epoch")
    assert len(history) == 3
    # the anemoi training ran through the same suite: built dataset, checkpoints, metrics in MLflow
    assert find(status, "/demo/publish/synth_demo_local_5p0_2020_2020_6h_v1/build")["state"] == "complete"
    anemoi_train = find(status, "/demo/local/train/tiny_anemoi/train")
    assert anemoi_train["events"]["checkpoint"] is True
    anemoi_run = anemoi_train["labels"]["mlflow"].split()[1]
    assert client.get_metric_history(anemoi_run, "train_multi_dataset_loss_step")
    (anemoi_lineage,) = (ws.root / "suites/demo/runs/local/tiny-anemoi").glob("*/lineage.json")
    assert any(c["path"].endswith("last.ckpt") for c in json.loads(anemoi_lineage.read_text())["checkpoints"])
    (lineage_file,) = (ws.root / "suites/demo/runs/local/tiny").glob("*/lineage.json")  # one per deploy
    lineage = json.loads(lineage_file.read_text())
    assert lineage["run_id"] == run_id and lineage["checkpoints"]
    # ... and in the catalogue: the training, its checkpoints, and the lineage between them
    from maelflow import catalogue

    cat = catalogue.client(ws)
    entry = cat.get("trainings", lineage["key"])
    assert entry["run_id"] == run_id and entry["datasets"] == ["synth-demo-local-5p0-2020-2020-6h-v1"]
    for c in lineage["checkpoints"]:
        assert cat.get("weights", c["uuid"])["metadata"]["run_id"] == run_id
    graph = json.dumps(cat.lineage(lineage["key"], "trainings"))
    assert lineage["checkpoints"][0]["uuid"] in graph and "synth-demo-local-5p0-2020-2020-6h-v1" in graph
    assert (ws.root / "suites/demo/runs/provenance.json").exists()
    # the anemoi training and its checkpoints carry the anemoi release that made them (0.10 line here)
    anemoi_registered = json.loads(anemoi_lineage.read_text())
    anemoi_entry = cat.get("trainings", anemoi_registered["key"])
    assert anemoi_entry["anemoi_version"] == "0.10.0" and anemoi_entry["anemoi_line"] == "0.10", anemoi_entry
    for c in anemoi_registered["checkpoints"]:
        meta = cat.get("weights", c["uuid"])["metadata"]
        assert meta["anemoi_version"] == "0.10.0" and meta["anemoi_line"] == "0.10", meta


def test_abort_shows_reason_then_requeue_completes(stack, config_root):
    ws, _ = stack
    exp = _experiment(config_root, "t_abort", trainings=[])
    rx = load_experiment(exp, ["dataset.synth-small-numpy-10p0-2020-2020-6h-v1.source=" + str(ws.root / "data" / "t_abort.zarr")],
                         placeholders={"workspace": str(ws.root)})
    client = client_for(ws)
    deploy(rx, ws, client)
    node = wait_for(client, "/t_abort/publish/synth_small_numpy_10p0_2020_2020_6h_v1/publish", {"aborted"})
    assert "does not exist" in node["aborted_reason"] and "t_abort.zarr" in node["aborted_reason"]
    assert find(tree(client, "t_abort"), "/t_abort/local/data/synth_small_numpy_10p0_2020_2020_6h_v1/stage")["state"] == "queued"
    prepare_datasets(rx)  # the operator fixes the cause ...
    control(client, "requeue", "/t_abort/publish/synth_small_numpy_10p0_2020_2020_6h_v1/publish")  # ... and requeues
    wait_for(client, "/t_abort", {"complete"}, timeout=120)
    assert find(tree(client, "t_abort"), "/t_abort/local/data/synth_small_numpy_10p0_2020_2020_6h_v1/stage")["events"]["verified"] is True


def test_kill_stops_the_running_process(stack, config_root):
    ws, _ = stack
    exp = _experiment(config_root, "t_kill")
    rx = load_experiment(exp, [PREBUILT, "training.tiny.config.max_epochs=100000"], placeholders={"workspace": str(ws.root)})
    prepare_datasets(rx)
    client = client_for(ws)
    deploy(rx, ws, client)
    path = "/t_kill/local/train/tiny/train"
    node = wait_for(client, path, {"active"}, timeout=120)
    pid = int(node["rid"])
    assert _pid_alive(pid)
    t0 = time.monotonic()
    control(client, "kill", path)
    node = wait_for(client, path, {"aborted"}, timeout=30)
    assert "killed by a signal" in node["aborted_reason"]
    assert not _pid_alive(pid)
    assert time.monotonic() - t0 < 15
    # nothing of the job's process group is left either (children may take a moment to exit)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        left = subprocess.run(["ps", "-o", "pid=,stat=,args=", "-g", str(pid)], capture_output=True,
                              text=True).stdout.strip()
        if not left or all(" Z" in line for line in left.splitlines()):
            break
        time.sleep(0.2)
    assert not left or all(" Z" in line for line in left.splitlines()), left


def test_server_restart_mid_suite_resumes_from_checkpoint(services, tmp_path, config_root):
    ws = Workspace(tmp_path / "ws_restart")
    services(ws, "ecflow", "s3", "mlflow", "catalogue")
    exp = _experiment(config_root, "t_restart")
    rx = load_experiment(exp, [PREBUILT, "training.tiny.config.max_epochs=150"], placeholders={"workspace": str(ws.root)})
    prepare_datasets(rx)
    client = client_for(ws)
    deploy(rx, ws, client)
    wait_for(client, "/t_restart/local/train/tiny/train", {"active"}, timeout=120)
    ecf = stack_mod.service(ws, "ecflow")
    old_pid = ecf.pid()
    ecf.down()
    assert not _pid_alive(old_pid)
    time.sleep(2)  # the job keeps running and retries its child commands
    info = ecf.up()
    assert info.healthy and info.pid != old_pid
    client = client_for(ws)
    data = tree(client, "t_restart")
    assert data["server_state"] == "RUNNING"
    assert find(data, "/t_restart/publish/synth_small_numpy_10p0_2020_2020_6h_v1/publish")["state"] == "complete"  # from the checkpoint
    wait_for(client, "/t_restart", {"complete"}, timeout=240)
    train = find(tree(client, "t_restart"), "/t_restart/local/train/tiny/train")
    assert train["meters"]["epoch"]["value"] == 150 and train["try_no"] == 1


def test_offline_training_synced_by_the_suite_twice_without_duplicates(stack, config_root):
    ws, infos = stack
    exp = _experiment(config_root, "t_offline")
    rx = load_experiment(exp, [PREBUILT, "training.tiny.mlflow.mode=offline"], placeholders={"workspace": str(ws.root)})
    prepare_datasets(rx)
    client = client_for(ws)
    deploy(rx, ws, client)
    wait_for(client, "/t_offline", {"complete"}, timeout=240)
    sync = find(tree(client, "t_offline"), "/t_offline/local/train/tiny/sync")
    assert "1 new" in sync["labels"]["info"], sync["labels"]
    run_id = sync["labels"]["mlflow"].split()[1]
    server = mlflow.MlflowClient(infos["mlflow"].url)
    assert len(server.get_metric_history(run_id, "train_loss_epoch")) == 3
    control(client, "requeue", "/t_offline/local/train/tiny/sync")
    time.sleep(1)
    node = wait_for(client, "/t_offline/local/train/tiny/sync", {"complete"}, timeout=120)
    assert "0 new, 0 metric points, 0 artifacts" in node["labels"]["info"], node["labels"]
    assert len(server.get_metric_history(run_id, "train_loss_epoch")) == 3

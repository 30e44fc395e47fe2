"""The current anemoi line (anemoi-training 0.17.1, anemoi-models 0.19.0, anemoi-graphs 0.9.8) end to end
on CPU, in its own environment: ``.venv-anemoi17`` (``bash scripts/install.sh --anemoi-current``).

The main environment has anemoi-training 0.10 (tests/integration/test_anemoi.py); these tests are
marked ``anemoi_current`` and only run where the installed anemoi-training is of the current line
(tests/conftest.py deselects them elsewhere). ``.ci/run`` runs them with
``.venv-anemoi17/bin/python -m pytest -m integration tests/integration/test_anemoi_current.py``.

What they show: the shipped schema of the 0.17 line is the installed release's; the 0.17 base config
composes with a training's config and overrides; ``maelflow validate`` refuses 0.10 keys for a site
of this line; on the loopback SLURM site a tiny anemoi training deployed as a suite (dataset built by
anemoi-datasets, published, staged over SSH) is stopped by a real SLURM time limit, resubmitted by
maelflow, and resumes from its checkpoint into the same anemoi run and MLflow run (offline, synced
by the suite); on the local site the demo's tiny anemoi training logs online; both register their
training and checkpoints in the catalogue with the anemoi release that made them; and the operations
family reads the 0.17 checkpoint: evaluation scores beside persistence and climatology, and a forecast
by anemoi-inference.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy
import pytest

from maelflow.config.loader import load_experiment
from tests.conftest import write_yaml

pytestmark = [pytest.mark.integration, pytest.mark.anemoi_current]

MAELFLOW = str(Path(sys.executable).with_name("maelflow"))
DATASET = "synth-demo-local-5p0-2020-2020-6h-v1"


def test_the_installed_anemoi_is_the_current_line_and_its_schema_is_the_shipped_one():
    from maelflow.training import anemoi_versions as av

    version = av.installed_version()
    assert av.line_for(version).name == "0.17" and version == av.LINES[-1].tested
    described = av.describe_installed()
    shipped = av.LINES[-1].schema()
    # schema.json was made from this release: refresh it (python -m maelflow.training.anemoi_versions) when it moves
    assert described["tree"] == shipped.tree and described["groups"] == shipped.groups


def test_the_base_config_composes_in_the_current_schema(tmp_path):
    from maelflow.config.models import Training
    from maelflow.training.anemoi_app import compose_config

    t = Training(name="t", application="anemoi", datasets=[DATASET],
                 config={"model": {"num_channels": 8}, "training": {"optimization": {"lr": 0.5}}},
                 overrides=["training.max_steps=9", "model=graphtransformer", "task.multistep_input=1"])
    cfg = compose_config(t, tmp_path / "config")
    assert cfg.training.max_steps == 9 and cfg.training.optimization.lr == 0.5 and cfg.task.multistep_input == 1
    assert cfg.model.num_channels == 8 and "Transformer" in cfg.model.processor._target_
    assert cfg.training.optimization.lr_scheduler.t_initial == 9  # follows max_steps
    assert dict(cfg.model.bounding) == {"datasets": {"data": []}}  # graphtransformer's shape, emptied
    gnn = compose_config(Training(name="g", application="anemoi", datasets=[DATASET]), tmp_path / "gnn")
    assert list(gnn.model.bounding) == [] and gnn.task.timestep == "6h"  # gnn's shape (a list), emptied
    assert "anemoi-training 0.17" in (tmp_path / "config" / "maelflow-training.yaml").read_text().splitlines()[0]


def test_validate_refuses_a_key_the_sites_anemoi_does_not_have(config_root, tmp_path):
    """The local site runs the installed 0.17.1: 0.10 keys are refused, each with where it went."""
    write_yaml(config_root / "trainings" / "old-keys.yaml",
               {"name": "old-keys", "application": "anemoi", "datasets": [DATASET], "time_limit": "00:10:00",
                "config": {"training": {"lr": {"rate": 0.001}}}, "overrides": ["training.multistep_input=3"]})
    exp = write_yaml(config_root / "experiments" / "old.yaml",
                     {"name": "old", "sites": ["local"], "datasets": [DATASET], "trainings": ["old-keys"]})
    run = subprocess.run([MAELFLOW, "validate", str(exp), "--workspace", str(tmp_path / "ws")], capture_output=True,
                         text=True, cwd=tmp_path)
    out = " ".join((run.stdout + run.stderr).split())
    assert run.returncode == 2, out
    assert "config.training.lr.rate" in out and "training.optimization" in out, out
    assert "overrides[0]" in out and "task.multistep_input" in out, out
    assert "runs anemoi-training 0.17.1 (installed here)" in out
    # the same training without them is valid, and validate says which anemoi it checked against
    write_yaml(config_root / "trainings" / "old-keys.yaml",
               {"name": "old-keys", "application": "anemoi", "datasets": [DATASET], "time_limit": "00:10:00",
                "config": {"training": {"optimization": {"lr": 0.001}}}, "overrides": ["task.multistep_input=3"]})
    run = subprocess.run([MAELFLOW, "validate", str(exp), "--workspace", str(tmp_path / "ws")], capture_output=True,
                         text=True, cwd=tmp_path)
    assert run.returncode == 0 and "local 0.17.1 (installed here)" in " ".join(run.stdout.split()), run.stdout


# --------------------------------------------------------------------------- through the suite
SUITE, ONLINE = "a17_hpc", "a17_online"
TRAINING, NODE = "paced-anemoi", "paced_anemoi"
# Paced to at least 1 s a step from step 0 (maelflow.training.pace), 100 steps are 100 s of training or
# more: longer than any first job on the loopback site, which SLURM stops 60-90 s after its start (a
# 1-minute limit, checked every 30 s), so the time limit really expires mid-training whatever the
# machine's speed. The resubmitted job resumes unpaced and finishes in seconds. A checkpoint every 5
# steps leaves the first job one to resume from even on a busy machine.
STEPS, PACE = 100, 1.0


def _site_path(rx, site: str, experiment: str, training: str, *parts: str) -> Path:
    return Path(rx.sites[site].paths.outputs, experiment, training, *parts)


def _why(data: dict, output: Path | None = None) -> str:
    """What an assertion on a suite shows: the aborted tasks with their reasons (and a job output's end)."""
    found, todo = [], list(data["suites"])
    while todo:
        node = todo.pop()
        todo.extend(node.get("children", []))
        if node.get("kind") == "task" and node["state"] != "complete":
            found.append(f"{node['path']} {node['state']}: {node.get('aborted_reason')} {node.get('labels')}")
    tail = output.read_text(errors="replace")[-3000:] if output is not None and output.exists() else ""
    return "\n".join(found) + ("\n--- job output:\n" + tail if tail else "")


@pytest.fixture(scope="module")
def suites(hpc_stack, tmp_path_factory):
    """Two suites of the current anemoi line in one workspace, the second started once the first has
    staged the demo dataset (built by anemoi-datasets from the demo recipe, published to the S3 store):

    - ``a17_hpc``: a paced tiny anemoi training on the loopback SLURM site (``localhpc``: SSH, SLURM
      with a 1-minute time limit; compute nodes without network, so MLflow offline, synced by the
      suite's sync task);
    - ``a17_online``: the demo's tiny anemoi training on the local site, logging online to the
      stack's MLflow server; it runs while the first job on the SLURM site waits for its limit.
    """
    from maelflow.demo import prepare_datasets
    from maelflow.ecf import client_for
    from maelflow.placeholders import placeholders_for
    from maelflow.services.stack import discover
    from maelflow.suite.follow import follow
    from maelflow.suite.server import deploy, tree
    from tests.conftest import REPO
    from tests.integration.suite_helpers import wait_for

    ws = hpc_stack
    root = tmp_path_factory.mktemp("a17configs") / "configs"
    shutil.copytree(REPO / "configs", root)
    write_yaml(root / "trainings" / f"{TRAINING}.yaml",
               {"name": TRAINING, "application": "anemoi", "datasets": [DATASET], "time_limit": "00:01:00",
                "max_resubmissions": 4,
                "config": {"training": {"max_steps": STEPS},
                           "diagnostics": {"callbacks": [{"_target_": "maelflow.training.pace.StepPace",
                                                          "seconds": PACE, "first_start_only": True}],
                                           "checkpoint": {"every_n_train_steps": {"save_frequency": 5,
                                                                                  "num_models_saved": 1},
                                                          "every_n_epochs": {"num_models_saved": 1}}}}})
    placeholders = placeholders_for(ws)
    rx = load_experiment(str(write_yaml(root / "experiments" / f"{SUITE}.yaml",
                                        {"name": SUITE, "sites": ["localhpc"], "datasets": [DATASET],
                                         "trainings": [TRAINING]})), [], placeholders=placeholders)
    online = load_experiment(str(write_yaml(root / "experiments" / f"{ONLINE}.yaml",
                                            {"name": ONLINE, "sites": ["local"], "datasets": [DATASET],
                                             "trainings": ["tiny-anemoi"]})),
                             ["training.tiny-anemoi.config.training.max_steps=10"], placeholders=placeholders)
    prepare_datasets(rx)
    client = client_for(ws)
    deploy(rx, ws, client)
    # the dataset is in the store and on the SLURM site: the second suite's build and publish find it done
    wait_for(client, f"/{SUITE}/localhpc/data/{DATASET.replace('-', '_')}/stage", {"complete", "aborted"},
             timeout=300)
    deploy(online, ws, client)
    wait_for(client, f"/{ONLINE}", {"complete", "aborted"}, timeout=300)
    follow(client, SUITE, timeout=600, interval=0.5)   # a time-limit abort waits for its resubmission
    return SimpleNamespace(ws=ws, rx=rx, online=online, client=client, hpc=tree(client, SUITE),
                           local=tree(client, ONLINE), url=discover(ws, "mlflow").url)


def test_the_suite_trains_online_and_registers_the_release_in_the_catalogue(suites):
    """The demo's tiny anemoi training through a suite on the local site: online to the stack's MLflow
    server; the register task records the training and its checkpoints in the catalogue with the
    anemoi release that made them."""
    from mlflow import MlflowClient

    from maelflow.suite.server import find
    from maelflow.training.anemoi_versions import checkpoint_summary

    rx, data = suites.online, suites.local
    assert data["suites"][0]["state"] == "complete", _why(data)
    train_node = find(data, f"/{ONLINE}/local/train/tiny_anemoi/train")
    assert train_node["events"]["checkpoint"] is True and "10 steps" in train_node["labels"]["info"]

    # the run: anemoi 0.17.1, logged online, its checkpoint saying which release wrote it
    (state_file,) = _site_path(rx, "local", ONLINE, "tiny-anemoi").glob("*/run.json")
    state = json.loads(state_file.read_text())
    assert state["anemoi_version"] == "0.17.1" and state["anemoi_line"] == "0.17" and state["mode"] == "online"
    run_id = state["run_id"]
    assert train_node["labels"]["mlflow"].split()[1] == run_id
    first = checkpoint_summary(state_file.parent / "checkpoint" / run_id / "inference-last.ckpt")
    assert first["anemoi_version"] == "0.17.1" and first["run_id"] == run_id and first["global_step"] == 10
    assert first["datasets"] == [str(Path(rx.sites["local"].paths.datasets) / f"{DATASET}.zarr")]
    mlflow = MlflowClient(suites.url)
    run = mlflow.get_run(run_id)
    assert run.data.tags["maelflow.anemoi_version"] == "0.17.1" and run.info.status == "FINISHED"
    loss = next(k for k in run.data.metrics if k.startswith("train_") and k.endswith("_loss_step"))
    assert len(mlflow.get_metric_history(run_id, loss)) >= 9

    _registered_with_the_release(suites.ws, ONLINE, "local", "tiny-anemoi")


def _registered_with_the_release(ws, experiment: str, site: str, training: str) -> None:
    """lineage.json, the catalogue's training entry and every checkpoint entry carry the release."""
    from maelflow import catalogue

    cat = catalogue.client(ws)
    (lineage_file,) = ws.path("suites", experiment, "runs", site, training).glob("*/lineage.json")
    lineage = json.loads(lineage_file.read_text())
    assert lineage["anemoi_version"] == "0.17.1" and lineage["anemoi_line"] == "0.17", lineage
    entry = cat.get("trainings", lineage["key"])
    assert entry["anemoi_version"] == "0.17.1" and entry["anemoi_line"] == "0.17", entry
    for c in lineage["checkpoints"]:
        meta = cat.get("weights", c["uuid"])["metadata"]
        assert meta["anemoi_version"] == "0.17.1" and meta["anemoi_line"] == "0.17"
        assert meta["run_id"] == lineage["run_id"]
    graph = json.dumps(cat.lineage(lineage["key"], "trainings"))
    assert DATASET in graph and lineage["checkpoints"][0]["uuid"] in graph


def test_a_real_slurm_time_limit_is_resubmitted_and_resumes_in_the_same_run(suites):
    """On the loopback SLURM site the job's 1-minute limit expires mid-training: SLURM warns the
    batch shell (USR1), then stops the job; the header reports TIMEOUT, maelflow's resubmission
    submits the job again, and the new job resumes from ``last.ckpt`` into the same anemoi run and
    the same MLflow run (offline on the compute node, synced to the server by the suite)."""
    import os

    from mlflow import MlflowClient

    from maelflow.suite.server import find
    from maelflow.training.anemoi_versions import checkpoint_summary

    rx, data, client, ws = suites.rx, suites.hpc, suites.client, suites.ws
    path = f"/{SUITE}/localhpc/train/{NODE}/train"
    train_node = find(data, path)
    output_file = ws.path("suites", SUITE, "jobs", SUITE, "localhpc", "train", NODE, "train.1")
    assert data["suites"][0]["state"] == "complete", _why(data, output_file)
    assert find(data, f"/{SUITE}/publish/{DATASET.replace('-', '_')}/build")["state"] == "complete"
    assert f"{STEPS} steps" in train_node["labels"]["info"], train_node
    client.sync_local()
    resubmits = int(client.get_defs().find_abs_node(path).find_variable("MAELFLOW_RESUBMITS").value())
    assert resubmits >= 1, train_node
    output = output_file.read_text()
    assert "SLURM time limit approaching" in output, output[-2000:]          # SLURM's own warning, USR1
    # SLURM's job-completion log: the first job ended by its time limit, the last one completed, each a
    # job of its own (maelflow resubmitted it; not a requeue by SLURM)
    from maelflow_sandbox import hpc

    ended = subprocess.run(hpc.LoopbackHpc(ws).ssh_argv("sacct --completion -n -P -o JobID,JobName,State"),
                           capture_output=True, text=True, timeout=60).stdout
    jobs = [ln.split("|") for ln in ended.splitlines() if ln.count("|") == 2]
    jobs = [(job_id, state) for job_id, name, state in jobs if name == path.lstrip("/").replace("/", ".")]
    assert len(jobs) == resubmits + 1 and len({j for j, _ in jobs}) == len(jobs), ended
    assert jobs[0][1] == "TIMEOUT" and jobs[-1][1] == "COMPLETED", jobs

    (state_file,) = _site_path(rx, "localhpc", SUITE, TRAINING).glob("*/run.json")
    state = json.loads(state_file.read_text())
    assert state["anemoi_version"] == "0.17.1" and state["mode"] == "offline"
    run_id, mlflow_run = state["run_id"], state["mlflow_run_id"]
    assert len(state["resumed"]) == resubmits, state["resumed"]   # every resubmitted job resumed
    for resumed in state["resumed"]:
        assert resumed["from"].endswith(f"checkpoint/{run_id}/last.ckpt") and resumed["mlflow_run_id"] == mlflow_run
    last = checkpoint_summary(state_file.parent / "checkpoint" / run_id / "inference-last.ckpt")
    assert last["global_step"] == STEPS and last["run_id"] == run_id and last["anemoi_version"] == "0.17.1"
    assert last["parent_uuid"]  # the checkpoint the last job resumed from

    # one MLflow run holds every job's steps: offline on the site, then on the server after the sync
    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    offline = MlflowClient(state["tracking_uri"])
    assert [r.info.run_id for r in offline.search_runs([state["experiment_id"]])] == [mlflow_run]
    loss = next(k for k in offline.get_run(mlflow_run).data.metrics
                if k.startswith("train_") and k.endswith("_loss_step"))
    steps = sorted({m.step for m in offline.get_metric_history(mlflow_run, loss)})
    assert steps[0] == 0 and steps[-1] >= STEPS - 1 and len(steps) >= STEPS - 1, steps
    sync = find(data, f"/{SUITE}/localhpc/train/{NODE}/sync")
    assert sync["state"] == "complete", sync
    server_run = sync["labels"]["mlflow"].split()[1]
    server = MlflowClient(suites.url)
    assert server.get_run(server_run).data.tags["maelflow.anemoi_version"] == "0.17.1"
    assert sorted({m.step for m in server.get_metric_history(server_run, loss)}) == steps
    _registered_with_the_release(ws, SUITE, "localhpc", TRAINING)


def test_the_operations_read_a_checkpoint_of_the_current_line(suites, tmp_path):
    """Evaluation and inference take the 0.17 line's checkpoint (the resumed one of the SLURM site) as
    they take 0.10's: scores on held-out dates beside persistence and climatology, and a forecast by
    anemoi-inference (0.13.0, installed beside anemoi-training 0.17.1) with maelflow's provenance."""
    import math

    import netCDF4

    from maelflow.operations.forecast import CYCLE_FILE, run_cycle
    from maelflow.operations.scores import evaluate_checkpoint

    rx = suites.rx
    (state_file,) = _site_path(rx, "localhpc", SUITE, TRAINING).glob("*/run.json")
    state = json.loads(state_file.read_text())
    checkpoint = state_file.parent / "checkpoint" / state["run_id"] / "inference-last.ckpt"
    dataset = Path(rx.sites["localhpc"].paths.datasets) / f"{DATASET}.zarr"

    evaluation = evaluate_checkpoint(checkpoint, dataset, samples=4)
    summary = evaluation.summary()
    assert set(evaluation.references) == {"persistence", "climatology"} and len(evaluation.dates) == 4
    assert {"nrmse", "skill_persistence", "skill_climatology", "rmse.2t", "mae.msl"} <= set(summary)
    assert all(math.isfinite(v) for v in summary.values()), summary
    assert 0 < summary["nrmse"] < 1 and summary["skill_climatology"] > 0, summary  # it learnt something

    cycle = {"model": "a17", "version": 1, "alias": "test", "checkpoint": str(checkpoint), "weights": "",
             "dataset_path": str(dataset), "date": evaluation.dates[0], "lead_time": 12, "output": "netcdf",
             "training": TRAINING, "run_id": state["run_id"], "dataset": DATASET, "experiment": SUITE}
    (tmp_path / CYCLE_FILE).write_text(json.dumps(cycle))
    result = run_cycle(tmp_path)
    with netCDF4.Dataset(result["output"]) as nc:
        assert nc.getncattr("maelflow_run_id") == state["run_id"]
        assert "anemoi-inference 0.13" in nc.getncattr("maelflow_producer")
        values = nc.variables["2t"][:]
        # the initial state and the two 6-hour steps of the 12-hour lead, all finite
        assert values.shape[0] == 3 and bool(numpy.isfinite(values).all()), values.shape

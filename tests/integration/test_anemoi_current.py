"""The current anemoi line (anemoi-training 0.17.1, anemoi-models 0.19.0, anemoi-graphs 0.9.8) end to end
on CPU, in its own environment: ``.venv-anemoi17`` (``bash scripts/install.sh --anemoi-current``).

The main environment has anemoi-training 0.10 (tests/integration/test_anemoi.py); these tests are
marked ``anemoi_current`` and only run where the installed anemoi-training is of the current line
(tests/conftest.py deselects them elsewhere). ``.ci/run`` runs them with
``.venv-anemoi17/bin/python -m pytest -m integration tests/integration/test_anemoi_current.py``.

What they show: the shipped schema of the 0.17 line is the installed release's; the 0.17 base config
composes with a training's config and overrides; ``maelflow validate`` refuses 0.10 keys for a site
of this line; and the demo's tiny anemoi training runs through a deployed suite (dataset built by
anemoi-datasets, published, staged; online MLflow; checkpoints registered in the catalogue with the
anemoi release that made them), then starts again as a job resubmitted after its time limit does
and resumes from its checkpoint into the same MLflow run.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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
def test_demo_training_through_the_suite_then_resumed_in_the_same_run(stack, config_root, monkeypatch):
    """The demo's tiny anemoi training, deployed as a suite on the local site: the dataset built by
    anemoi-datasets from the demo recipe, published and staged; the training logs online to the
    stack's MLflow server; the register task records the checkpoints in the catalogue with the anemoi
    release that made them. Then the job starts again, as a job resubmitted after its time limit
    does (same deploy, same run folder, more steps): it resumes from last.ckpt into the same MLflow
    run, and its checkpoint names the one it resumed from."""
    from mlflow import MlflowClient

    from maelflow import catalogue
    from maelflow.demo import prepare_datasets
    from maelflow.ecf import client_for
    from maelflow.placeholders import placeholders_for
    from maelflow.suite.server import deploy, find, tree
    from maelflow.training.anemoi_versions import checkpoint_summary
    from maelflow.training.launch import train
    from tests.integration.suite_helpers import wait_for
    from tests.integration.test_anemoi import RecordingReporter

    ws, infos = stack
    url = infos["mlflow"].url
    name, training = "a17_demo", "tiny-anemoi"
    exp = write_yaml(config_root / "experiments" / f"{name}.yaml",
                     {"name": name, "sites": ["local"], "datasets": [DATASET], "trainings": [training]})
    overrides = [f"training.{training}.config.training.max_steps=10"]
    rx = load_experiment(str(exp), overrides, placeholders=placeholders_for(ws))
    prepare_datasets(rx)
    client = client_for(ws)
    deploy(rx, ws, client)
    wait_for(client, f"/{name}", {"complete", "aborted"}, timeout=420)
    data = tree(client, name)
    train_node = find(data, f"/{name}/local/train/tiny_anemoi/train")
    assert data["suites"][0]["state"] == "complete", train_node
    assert find(data, f"/{name}/publish/{DATASET.replace('-', '_')}/build")["state"] == "complete"
    assert train_node["events"]["checkpoint"] is True and "10 steps" in train_node["labels"]["info"]

    # the run: anemoi 0.17.1, logged online, its checkpoint saying which release wrote it
    (state_file,) = Path(rx.sites["local"].paths.outputs, name, training).glob("*/run.json")
    state = json.loads(state_file.read_text())
    assert state["anemoi_version"] == "0.17.1" and state["anemoi_line"] == "0.17" and state["mode"] == "online"
    run_id = state["run_id"]
    assert train_node["labels"]["mlflow"].split()[1] == run_id
    ckpt_dir = state_file.parent / "checkpoint" / run_id
    first = checkpoint_summary(ckpt_dir / "inference-last.ckpt")
    assert first["anemoi_version"] == "0.17.1" and first["run_id"] == run_id and first["global_step"] == 10
    assert first["datasets"] == [str(Path(rx.sites["local"].paths.datasets) / f"{DATASET}.zarr")]
    mlflow = MlflowClient(url)
    run = mlflow.get_run(run_id)
    assert run.data.tags["maelflow.anemoi_version"] == "0.17.1" and run.info.status == "FINISHED"
    loss = next(k for k in run.data.metrics if k.startswith("train_") and k.endswith("_loss_step"))
    assert len(mlflow.get_metric_history(run_id, loss)) >= 9

    # registered: lineage.json and every checkpoint in the catalogue carry the release
    (lineage_file,) = ws.path("suites", name, "runs", "local", training).glob("*/lineage.json")
    lineage = json.loads(lineage_file.read_text())
    assert lineage["anemoi_version"] == "0.17.1" and lineage["run_id"] == run_id
    cat = catalogue.client(ws)
    for c in lineage["checkpoints"]:
        meta = cat.get("weights", c["uuid"])["metadata"]
        assert meta["anemoi_version"] == "0.17.1" and meta["anemoi_line"] == "0.17" and meta["run_id"] == run_id
    graph = json.dumps(cat.lineage(lineage["key"], "trainings"))
    assert DATASET in graph and lineage["checkpoints"][0]["uuid"] in graph

    # the job again, as resubmitted after a time limit: same deploy (run folder), 10 more steps
    monkeypatch.setenv("MAELFLOW_DEPLOY_ID", state_file.parent.name)
    rx = load_experiment(str(exp), [f"training.{training}.config.training.max_steps=20"],
                         placeholders=placeholders_for(ws))
    rec = RecordingReporter()
    res = train(rx, training, "local", rec, tracking_uri=url)
    assert res.run_dir == state_file.parent and res.run_id == run_id and res.global_step == 20
    state = json.loads(state_file.read_text())
    assert state["resumed"][-1]["from"].endswith(f"checkpoint/{run_id}/last.ckpt")
    assert any("resumed" in t for t in rec.of("label", "info"))
    second = checkpoint_summary(ckpt_dir / "inference-last.ckpt")
    assert second["global_step"] == 20 and second["run_id"] == run_id and second["uuid"] != first["uuid"]
    assert second["parent_uuid"]  # the checkpoint it resumed from
    steps = sorted({m.step for m in mlflow.get_metric_history(run_id, loss)})
    assert steps[0] == 0 and steps[-1] >= 19  # one MLflow run holds both starts
    assert [r.info.run_id for r in mlflow.search_runs(
        [run.info.experiment_id], filter_string=f"tags.`maelflow.training` = '{training}'")] == [run_id]

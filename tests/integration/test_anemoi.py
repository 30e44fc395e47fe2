"""anemoi end to end on CPU: a dataset built by the real ``anemoi-datasets create`` from a recipe, and
anemoi-training run by maelflow's launcher, logging to a real MLflow server (online) or to files
(offline), resumed from its checkpoint in the same MLflow run.

Each training is the tiny GNN of maelflow's base config, 10 steps; the whole file takes about a minute
on 2 cores (most of it the dataset build, the imports and the MLflow server).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from maelflow.config.loader import load_experiment
from maelflow.reporting import Reporter
from maelflow.training.launch import dataset_path, run_dir
from tests.conftest import REPO, write_yaml


pytestmark = pytest.mark.integration

EXPERIMENT = "anemoi-it"
DATASET = "synth-recipe"
ONLINE = "anemoi-online"
OFFLINE = "anemoi-offline"
FORCINGS = {"cos_latitude", "sin_latitude", "cos_longitude", "sin_longitude", "cos_julian_day", "sin_julian_day",
            "cos_local_time", "sin_local_time", "insolation"}


class RecordingReporter(Reporter):
    """A reporter outside any job (inactive) that remembers what it was asked to send."""

    def __init__(self):
        super().__init__({})
        self.calls: list[tuple[str, str, object]] = []

    def meter(self, name, value):
        self.calls.append(("meter", name, int(value)))

    def label(self, name, text):
        self.calls.append(("label", name, str(text)))

    def event(self, name, value=True):
        self.calls.append(("event", name, value))

    def of(self, kind: str, name: str) -> list:
        return [v for k, n, v in self.calls if k == kind and n == name]


@dataclass
class Env:
    root: Path
    ws: Path

    def rx(self, *overrides: str):
        return load_experiment(EXPERIMENT, list(overrides), config_root=self.root,
                               placeholders={"workspace": str(self.ws), "maelflow": "maelflow"})


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> Env:
    """A config root with a recipe-built dataset and two anemoi trainings; the dataset built in place."""
    from maelflow.datasets import build_dataset

    base = tmp_path_factory.mktemp("anemoi")
    root = base / "configs"
    shutil.copytree(REPO / "configs", root)
    write_yaml(root / "datasets" / f"{DATASET}.yaml",
               {"name": DATASET, "description": "built from configs/recipes/synth-demo.yaml",
                "recipe": "recipes/synth-demo.yaml", "source": "{workspace}/data/synth-recipe.zarr"})
    for name, mode in ((ONLINE, "online"), (OFFLINE, "offline")):
        write_yaml(root / "trainings" / f"{name}.yaml",
                   {"name": name, "application": "anemoi", "datasets": [DATASET], "time_limit": "00:10:00",
                    "config": {"training": {"max_steps": 10}}, "mlflow": {"mode": mode}})
    write_yaml(root / "experiments" / f"{EXPERIMENT}.yaml",
               {"name": EXPERIMENT, "sites": ["local"], "datasets": [DATASET], "trainings": [ONLINE, OFFLINE]})
    e = Env(root, base / "ws")
    rx = e.rx()
    build_dataset(rx.datasets[DATASET], dataset_path(rx, "local", DATASET), base_dir=root)
    return e


# ------------------------------------------------------------------------------------- dataset
def test_dataset_built_from_recipe(env):
    from anemoi.datasets import open_dataset

    rx = env.rx()
    path = dataset_path(rx, "local", DATASET)
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no build leftovers
    ds = open_dataset(str(path))
    assert ds.shape == (112, 13, 1, 36 * 72)
    assert set(ds.variables) == {"2t", "10u", "10v", "msl"} | FORCINGS
    assert str(ds.dates[0]).startswith("2020-01-01T00") and str(ds.dates[-1]).startswith("2020-01-28T18")
    assert ds.field_shape == (36, 72)
    lats = ds.latitudes
    assert abs(lats).max() < 90  # no pole on the grid
    stats = ds.statistics
    assert set(stats) >= {"mean", "stdev", "minimum", "maximum"}
    t2m = ds.name_to_index["2t"]
    assert 250 < stats["mean"][t2m] < 300 and stats["stdev"][t2m] > 0
    attrs = json.loads((path / ".zattrs").read_text())
    assert attrs["frequency"] == "6h" and attrs["licence"] == "CC-BY-4.0" and attrs["statistics_end_date"]


def test_dataset_build_errors_name_the_recipe(env, tmp_path):
    from maelflow.config.models import Dataset
    from maelflow.datasets import DatasetBuildError, build_dataset

    recipe = tmp_path / "broken.yaml"
    recipe.write_text("dates: {start: 2020-01-01T00:00:00, end: 2020-01-02T00:00:00, frequency: 6h}\n"
                      f"input:\n  netcdf: {{path: {tmp_path / 'missing.nc'}}}\n")
    dest = tmp_path / "out" / "broken.zarr"
    with pytest.raises(DatasetBuildError) as err:
        build_dataset(Dataset(name="broken", recipe=str(recipe), source=str(dest)), dest)
    msg = str(err.value)
    assert str(recipe) in msg and "missing.nc" in msg and "\n" not in msg
    assert not dest.exists() and list(dest.parent.iterdir()) == []  # nothing half-built left behind


# ------------------------------------------------------------------------------------ training
@pytest.fixture(scope="module")
def online_run(env, stack):
    from maelflow.training.launch import train

    _, infos = stack
    url = infos["mlflow"].url
    rec = RecordingReporter()
    res = train(env.rx(), ONLINE, "local", rec, tracking_uri=url)
    return res, rec, url


def test_anemoi_training_online(env, online_run):
    from anemoi.utils.checkpoints import load_metadata
    from mlflow import MlflowClient

    res, rec, url = online_run
    rx = env.rx()
    out = run_dir(rx, "local", ONLINE)
    assert res.run_dir == out and res.global_step == 10 and res.tracking_uri == url
    state = json.loads((out / "run.json").read_text())
    assert state["run_id"] == res.run_id == state["mlflow_run_id"] and state["mode"] == "online"
    ckpt_dir = out / "checkpoint" / res.run_id
    names = {p.name for p in res.checkpoints}
    assert {"last.ckpt", "inference-last.ckpt"} <= names
    assert all(p.parent == ckpt_dir for p in res.checkpoints)
    meta = load_metadata(str(ckpt_dir / "inference-last.ckpt"))
    assert meta["run_id"] == res.run_id and meta["training"]["global_step"] == 10
    assert str(dataset_path(rx, "local", DATASET)) in json.dumps(meta["dataset"], default=str)
    assert (out / "config" / "anemoi.yaml").exists()
    # the anemoi release is recorded with the run, and read back from its checkpoint without anemoi
    from maelflow.training.anemoi_versions import checkpoint_summary

    assert state["anemoi_version"] == "0.10.0" and state["anemoi_line"] == "0.10"
    summary = checkpoint_summary(ckpt_dir / "inference-last.ckpt")
    assert summary["anemoi_version"] == "0.10.0" and summary["anemoi_line"] == "0.10"
    assert summary["uuid"] == meta["uuid"] and summary["run_id"] == res.run_id and summary["global_step"] == 10
    assert summary["datasets"] == [str(dataset_path(rx, "local", DATASET))]

    client = MlflowClient(url)
    run = client.get_run(res.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == ONLINE
    assert run.data.tags["maelflow.training"] == ONLINE and run.data.tags["maelflow.site"] == "local"
    assert run.data.tags["maelflow.anemoi_version"] == "0.10.0"
    assert client.get_experiment(run.info.experiment_id).name == EXPERIMENT
    steps = [m.step for m in client.get_metric_history(res.run_id, "train_multi_dataset_loss_step")]
    assert len(steps) >= 9 and max(steps) >= 9
    assert client.get_metric_history(res.run_id, "val_multi_dataset_loss_epoch")
    assert "provenance.json" in {a.path for a in client.list_artifacts(res.run_id)}

    # progress in ecFlow: the epoch meter, a label with loss and ETA, the checkpoint event, the MLflow link
    assert rec.of("meter", "epoch")[0] == 0 and rec.of("meter", "epoch")[-1] >= 1
    infos = rec.of("label", "info")
    assert any("loss" in t and "ETA" in t and "step 10/10" in t for t in infos), infos
    assert rec.of("event", "checkpoint")
    assert res.run_id in rec.of("label", "mlflow")[0] and url in rec.of("label", "mlflow")[0]


def test_anemoi_training_resumes_in_the_same_run(env, online_run):
    from mlflow import MlflowClient

    from maelflow.training.launch import train

    first, _, url = online_run
    rx = env.rx(f"training.{ONLINE}.config.training.max_steps=20")
    rec = RecordingReporter()
    res = train(rx, ONLINE, "local", rec, tracking_uri=url)
    assert res.global_step == 20  # continued from step 10 of last.ckpt
    assert res.run_id == first.run_id
    state = json.loads((res.run_dir / "run.json").read_text())
    assert state["run_id"] == first.run_id == state["mlflow_run_id"]
    assert state["resumed"][-1]["from"].endswith(f"checkpoint/{first.run_id}/last.ckpt")
    assert any("resumed" in t for t in rec.of("label", "info"))

    client = MlflowClient(url)
    run = client.get_run(first.run_id)
    assert run.info.status == "FINISHED"
    steps = sorted(m.step for m in client.get_metric_history(first.run_id, "train_multi_dataset_loss_step"))
    assert steps[0] == 0 and steps[-1] >= 19 and len(steps) >= 18  # one run holds both attempts
    runs = client.search_runs([run.info.experiment_id], filter_string=f"tags.`maelflow.training` = '{ONLINE}'")
    assert [r.info.run_id for r in runs] == [first.run_id]  # no child run


def test_anemoi_training_offline(env, monkeypatch):
    from mlflow import MlflowClient

    from maelflow.training.launch import train

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    rx = env.rx()
    res = train(rx, OFFLINE, "local", RecordingReporter(), tracking_uri=None)
    out = run_dir(rx, "local", OFFLINE)
    store = out / "mlruns"
    assert res.global_step == 10 and res.tracking_uri == store.resolve().as_uri()
    state = json.loads((out / "run.json").read_text())
    assert state["mode"] == "offline" and state["tracking_uri"] == res.tracking_uri
    assert (store / state["experiment_id"] / res.run_id / "meta.yaml").exists()
    client = MlflowClient(res.tracking_uri)
    assert len(client.get_metric_history(res.run_id, "train_multi_dataset_loss_step")) >= 9
    assert client.get_run(res.run_id).info.status == "FINISHED"
    assert (out / "checkpoint" / res.run_id / "last.ckpt").exists()


def test_config_layers_and_date_split(env, tmp_path):
    """Base config < the training's config < its overrides; null dataloader dates split 80/20."""
    from maelflow.config.models import Training
    from maelflow.training.anemoi_app import compose_config, split_dates

    t = Training(name="t", application="anemoi", datasets=[DATASET],
                 config={"model": {"num_channels": 8}, "training": {"max_steps": 7, "lr": {"rate": 0.5}}},
                 overrides=["training.max_steps=9", "model=graphtransformer"])
    cfg = compose_config(t, tmp_path / "config")
    assert cfg.training.max_steps == 9 and cfg.training.lr.rate == 0.5
    assert cfg.model.num_channels == 8 and "Transformer" in cfg.model.processor._target_
    assert cfg.training.precision == "32" and cfg.graph.nodes.hidden.node_builder.resolution == 3
    split_dates(cfg, dataset_path(env.rx(), "local", DATASET))
    dl = cfg.dataloader
    assert dl.training.datasets.data.start == "2020-01-01T00:00:00"
    assert dl.training.datasets.data.end < dl.validation.datasets.data.start
    assert dl.validation.datasets.data.end == "2020-01-28T18:00:00"

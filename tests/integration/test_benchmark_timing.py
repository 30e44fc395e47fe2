"""The demo's trainings record their timing and energy in the real MLflow server, and the benchmark
report reads them back: the tiny Lightning application through the launcher, then anemoi-training
(the tiny GNN) through its launcher, both on the numpy-made synthetic dataset."""

from __future__ import annotations

import shutil

import pytest
from click.testing import CliRunner
from mlflow import MlflowClient

from maelflow.cli.main import cli
from maelflow.config.loader import load_experiment
from maelflow.demo import prepare_datasets
from maelflow.reporting import Reporter
from maelflow.training.launch import train
from maelflow.training.runs import dataset_path
from tests.conftest import FAST_DATASET, write_yaml

pytestmark = pytest.mark.integration

CATEGORIES = ("epoch", "batch", "forward", "backward", "optimizer", "data_loading", "checkpoint")


def _check_run(client: MlflowClient, run_id: str) -> None:
    data = client.get_run(run_id).data
    for cat in CATEGORIES:
        for stat in ("count", "min", "median", "mean", "p95", "max", "stdev"):
            assert f"timing/{cat}/{stat}" in data.metrics, (cat, stat, sorted(data.metrics))
    assert data.metrics["timing/batch/count"] >= 1 and data.metrics["timing/samples_per_s"] > 0
    assert 0 < data.metrics["timing/data_loading_share"] < 1
    assert data.metrics["memory/peak_rss_bytes"] > 0
    assert client.get_metric_history(run_id, "timing/step/batch_s") or data.metrics["timing/batch/count"] < 10
    assert data.tags["maelflow.timing"] == "done"
    # no GPU, no Cray counters, no readable RAPL, not a SLURM job here: said so, with the reasons
    assert data.tags["energy_quality"] == "unavailable" and data.tags["energy_method"] == "none"
    assert "energy/total_j" not in data.metrics
    for source in ("nvml", "cray_pm", "rapl", "sacct"):
        assert data.tags[f"energy.{source}"].startswith("unavailable: ")
        assert f"{source}: " in data.tags["energy_reason"]


def test_trainings_log_timing_and_energy_and_the_report_compares_them(stack, config_root, monkeypatch, tmp_path):
    ws, infos = stack
    url = infos["mlflow"].url
    write_yaml(config_root / "experiments" / "bench.yaml",
               {"name": "bench", "sites": ["local"], "datasets": [FAST_DATASET], "trainings": ["tiny", "tiny-anemoi"]})
    site = f"site.local.paths.datasets={tmp_path / 'datasets'}"
    overrides = [f"training.tiny.datasets=[{FAST_DATASET}]", f"training.tiny-anemoi.datasets=[{FAST_DATASET}]",
                 "training.tiny.config.max_epochs=2", "training.tiny-anemoi.config.training.max_steps=12",
                 # the numpy-made dataset has no computed forcings (the recipe-built one has)
                 "training.tiny-anemoi.config.data.datasets.data.forcing=[]",
                 "training.tiny-anemoi.config.data.datasets.data.processors.normalizer.config.none=[]", site]
    rx = load_experiment(str(config_root / "experiments" / "bench.yaml"), overrides,
                         placeholders={"workspace": str(ws.root)})
    prepare_datasets(rx)
    shutil.copytree(rx.datasets[FAST_DATASET].source, dataset_path(rx, "local", FAST_DATASET), dirs_exist_ok=True)
    monkeypatch.setenv("MAELFLOW_DEPLOY_ID", "bench")
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    client = MlflowClient(url)

    lightning = train(rx, "tiny", "local", Reporter({}), tracking_uri=url)
    _check_run(client, lightning.run_id)
    anemoi = train(rx, "tiny-anemoi", "local", Reporter({}), tracking_uri=url)
    state = __import__("json").loads((anemoi.run_dir / "run.json").read_text())
    _check_run(client, state["mlflow_run_id"])
    assert client.get_run(state["mlflow_run_id"]).data.metrics["timing/batch/count"] == 12 - 3   # 3 warm-up steps

    out = tmp_path / "report"
    res = CliRunner(env={"COLUMNS": "200"}).invoke(
        cli, ["benchmark", "report", "bench", "--tracking-uri", url, "--output", str(out)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "tiny @ local" in res.output and "tiny-anemoi @ local" in res.output and "unavailable" in res.output
    assert {"report.md", "timing.csv", "runs.csv", "index.html", "step_times.png", "breakdown.png"} <= {
        p.name for p in out.iterdir()}

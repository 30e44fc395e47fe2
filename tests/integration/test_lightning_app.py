"""A Lightning application given by import path: train, resume, and fork from an earlier run."""

from __future__ import annotations

import pytest
from mlflow import MlflowClient

from maelflow.config.loader import load_experiment
from maelflow.demo import prepare_datasets
from maelflow.reporting import Reporter
from maelflow.training.launch import train
from maelflow.training.runs import dataset_path
from tests.conftest import write_yaml

pytestmark = pytest.mark.integration


class Recorder(Reporter):
    """A reporter that keeps what a job would have told ecFlow (no ecFlow involved)."""

    def __init__(self):
        super().__init__({})
        self.calls: list[tuple] = []

    def meter(self, name, value):
        self.calls.append(("meter", name, value))

    def label(self, name, text):
        self.calls.append(("label", name, text))

    def event(self, name, value=True):
        self.calls.append(("event", name, value))


def test_train_resume_and_fork(stack, config_root, monkeypatch, tmp_path):
    ws, infos = stack
    url = infos["mlflow"].url
    write_yaml(config_root / "experiments" / "lapp.yaml",
               {"name": "lapp", "sites": ["local"], "datasets": ["synth-small-numpy-10p0-2020-2020-6h-v1"], "trainings": ["tiny"]})
    # a datasets folder of its own: the shared stack's local site is staged to by the suite tests
    site = f"site.local.paths.datasets={tmp_path / 'datasets'}"
    base = ["training.tiny.datasets=[synth-small-numpy-10p0-2020-2020-6h-v1]", "training.tiny.config.max_epochs=2", site]
    rx = load_experiment(str(config_root / "experiments" / "lapp.yaml"), base, placeholders={"workspace": str(ws.root)})
    prepare_datasets(rx)
    # the staged copy the training reads on the site
    import shutil

    shutil.copytree(rx.datasets["synth-small-numpy-10p0-2020-2020-6h-v1"].source, dataset_path(rx, "local", "synth-small-numpy-10p0-2020-2020-6h-v1"), dirs_exist_ok=True)

    monkeypatch.setenv("MAELFLOW_DEPLOY_ID", "first")
    rec = Recorder()
    first = train(rx, "tiny", "local", rec, tracking_uri=url)
    assert first.epochs == 2 and first.global_step > 0
    assert ("meter", "epoch", 2) in rec.calls and ("event", "checkpoint", True) in rec.calls
    # resumed (a resubmitted job): same run, the step count goes on
    more = load_experiment(str(config_root / "experiments" / "lapp.yaml"),
                           [*base[:1], "training.tiny.config.max_epochs=4", site], placeholders={"workspace": str(ws.root)})
    again = train(more, "tiny", "local", Recorder(), tracking_uri=url)
    assert again.run_id == first.run_id and again.global_step == 2 * first.global_step
    # forked in a new deploy: a new run, tagged with its parent, starting from the parent's weights
    monkeypatch.setenv("MAELFLOW_DEPLOY_ID", "fork")
    fork_rx = load_experiment(str(config_root / "experiments" / "lapp.yaml"),
                              [*base[:1], "training.tiny.config.max_epochs=5", f"training.tiny.fork_from={first.run_id}", site],
                              placeholders={"workspace": str(ws.root)})
    fork = train(fork_rx, "tiny", "local", Recorder(), tracking_uri=url)
    assert fork.run_id != first.run_id
    assert fork.global_step == again.global_step + first.global_step // 2  # one more epoch after the parent's 4
    tags = MlflowClient(url).get_run(fork.run_id).data.tags
    assert tags["forkedRunId"] == first.run_id

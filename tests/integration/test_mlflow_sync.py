"""Offline MLflow runs synced to the real tracking server; a second sync adds nothing."""

from __future__ import annotations

import pytest
from mlflow import MlflowClient

from maelflow.tracking.sync import SOURCE_TAG, sync_store

pytestmark = pytest.mark.integration


def test_offline_run_synced_once(stack, tmp_path, monkeypatch):
    _, infos = stack
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    store = (tmp_path / "mlruns").as_uri()
    offline = MlflowClient(store)
    exp = offline.create_experiment("sync-test")
    run = offline.create_run(exp, run_name="offline-tiny", tags={"maelflow.site": "lumi"})
    rid = run.info.run_id
    for step in range(50):
        offline.log_metric(rid, "train_loss", 1.0 / (step + 1), step=step)
    offline.log_param(rid, "lr", "0.01")
    note = tmp_path / "config.json"
    note.write_text('{"lr": 0.01}')
    offline.log_artifact(rid, str(note))
    offline.set_terminated(rid)

    first = sync_store(store, infos["mlflow"].url)
    assert first.runs == 1 and first.created == 1 and first.metrics_added == 50 and first.artifacts_added == 1
    server = MlflowClient(infos["mlflow"].url)
    synced = server.get_run(first.mapping[rid])
    assert synced.data.tags[SOURCE_TAG] == rid and synced.data.params["lr"] == "0.01"
    assert len(server.get_metric_history(synced.info.run_id, "train_loss")) == 50
    assert synced.info.status == "FINISHED"

    second = sync_store(store, infos["mlflow"].url)
    assert (second.created, second.metrics_added, second.artifacts_added) == (0, 0, 0)
    assert second.mapping == first.mapping
    assert len(server.get_metric_history(synced.info.run_id, "train_loss")) == 50
    runs = server.search_runs([synced.info.experiment_id], filter_string=f"tags.`{SOURCE_TAG}` = '{rid}'")
    assert len(runs) == 1

    # the offline run goes on (a resubmitted job) and is synced again: only the new points arrive
    offline.log_metric(rid, "train_loss", 0.001, step=50)
    third = sync_store(store, infos["mlflow"].url)
    assert third.created == 0 and third.metrics_added == 1
    assert len(server.get_metric_history(synced.info.run_id, "train_loss")) == 51

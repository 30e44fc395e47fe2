"""Copy MLflow runs logged offline (a file store written on a compute node) to a tracking server.

Compute nodes have no network, so trainings there log to files; a suite task on the login or
server side syncs them afterwards. A synced run carries the tag ``maelflow.source_run_id``; syncing
again finds it and adds only what it lacks (metric points, params, tags, artifacts), so a sync can
be repeated or resumed after a failure without duplicating anything.

The offline store is written by the site's user: an artifact path that is not a plain relative key
(``..``, absolute, a control character) is skipped with a warning, never downloaded.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)
SOURCE_TAG = "maelflow.source_run_id"
BATCH = 900  # MLflow's log_batch takes at most 1000 entries


@dataclass
class SyncResult:
    runs: int
    created: int
    metrics_added: int
    artifacts_added: int
    mapping: dict[str, str]


def _dest_experiment(dest, name: str) -> str:
    from maelflow.tracking.mlflow_runs import ensure_experiment

    return ensure_experiment(dest, name)   # several syncs of one suite may create it at once


def _find_synced(dest, experiment_id: str, source_run_id: str):
    runs = dest.search_runs([experiment_id], filter_string=f"tags.`{SOURCE_TAG}` = '{source_run_id}'",
                            max_results=1)
    return runs[0] if runs else None


def sync_store(source_uri: str, tracking_uri: str, run_ids: list[str] | None = None) -> SyncResult:
    """Sync every run (or ``run_ids``) of the file store at ``source_uri`` to ``tracking_uri``."""
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param, RunTag

    src = MlflowClient(tracking_uri=source_uri)
    dest = MlflowClient(tracking_uri=tracking_uri)
    result = SyncResult(0, 0, 0, 0, {})
    for exp in src.search_experiments():
        runs = src.search_runs([exp.experiment_id], max_results=10000)
        for run in runs:
            rid = run.info.run_id
            if run_ids and rid not in run_ids:
                continue
            result.runs += 1
            dest_exp = _dest_experiment(dest, exp.name)
            target = _find_synced(dest, dest_exp, rid)
            tags = {k: v for k, v in run.data.tags.items()}
            if target is None:
                target = dest.create_run(dest_exp, start_time=run.info.start_time,
                                         tags={**tags, SOURCE_TAG: rid}, run_name=run.info.run_name)
                result.created += 1
            tid = target.info.run_id
            result.mapping[rid] = tid
            have = dest.get_run(tid).data
            params = [Param(k, v) for k, v in run.data.params.items() if k not in have.params]
            new_tags = [RunTag(k, v) for k, v in tags.items() if have.tags.get(k) != v]
            for key in run.data.metrics:
                existing = {(m.step, m.timestamp, m.value) for m in dest.get_metric_history(tid, key)}
                points = [Metric(key, m.value, m.timestamp, m.step) for m in src.get_metric_history(rid, key)
                          if (m.step, m.timestamp, m.value) not in existing]
                for i in range(0, len(points), BATCH):
                    dest.log_batch(tid, metrics=points[i:i + BATCH])
                result.metrics_added += len(points)
            for i in range(0, len(params), 100):
                dest.log_batch(tid, params=params[i:i + 100])
            if new_tags:
                dest.log_batch(tid, tags=new_tags)
            result.artifacts_added += _sync_artifacts(src, dest, rid, tid)
            if run.info.status in ("FINISHED", "FAILED", "KILLED"):
                dest.set_terminated(tid, status=run.info.status, end_time=run.info.end_time)
    return result


def _artifact_paths(client, run_id: str, path: str | None = None) -> list[str]:
    out = []
    for info in client.list_artifacts(run_id, path):
        out.extend(_artifact_paths(client, run_id, info.path) if info.is_dir else [info.path])
    return out


def _sync_artifacts(src, dest, rid: str, tid: str) -> int:
    from maelflow_transfer.paths import key_problem

    present = set(_artifact_paths(dest, tid))
    added = 0
    with tempfile.TemporaryDirectory() as tmp:
        for path in _artifact_paths(src, rid):
            if path in present:
                continue
            problem = key_problem(path)
            if problem:
                log.warning("run %s: artifact %r skipped: %s", rid, path, problem)
                continue
            local = src.download_artifacts(rid, path, tmp)
            parent = str(Path(path).parent)
            dest.log_artifact(tid, local, None if parent == "." else parent)
            added += 1
    return added

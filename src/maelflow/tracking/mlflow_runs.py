"""MLflow for suite trainings: which server, which run, and the link an operator clicks.

A training keeps its MLflow run id in its output folder so a resubmitted job continues the same run.
"""

from __future__ import annotations

import os
from pathlib import Path

from maelflow.config.models import Site, Training


def choose_mode(training: Training, site: Site, tracking_uri: str | None) -> str:
    mode = training.mlflow.mode
    if mode == "auto":
        mode = "online" if (site.internet.compute and tracking_uri) else "offline"
    if mode == "online" and not tracking_uri:
        mode = "offline"
    return mode


def offline_uri(run_dir: Path) -> str:
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return (run_dir / "mlruns").resolve().as_uri()


def run_label(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    """The ecFlow label: no '#', which ecFlow's definition format reads as a comment and drops."""
    return f"run {run_id} experiment {experiment_id} at {tracking_uri}"


def ensure_experiment(client, name: str) -> str:
    """The id of the MLflow experiment ``name``, created if it is missing.

    Why not MLflow's get-or-create: several jobs of one suite start at once (the trainings of an
    experiment share its MLflow experiment), and between one job's lookup and its create another
    job creates it: MLflow then answers RESOURCE_ALREADY_EXISTS, which here means "look it up again".
    """
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name)
    except MlflowException as exc:
        if "RESOURCE_ALREADY_EXISTS" not in f"{getattr(exc, 'error_code', '')} {exc}":
            raise
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id

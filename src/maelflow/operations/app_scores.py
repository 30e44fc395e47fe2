"""Scores of a Lightning application's checkpoint (a training given by import path), by its own evaluation.

Why the application's own: maelflow cannot know what an application predicts (a post-processed
field, a probability, a power output) nor what it should be compared with; the MAELSTROM
applications already score themselves against their baseline on held-out data (``val_score``,
``baseline_score``, ``skill_vs_baseline``, ``val_loss``: :mod:`maelflow.apps.nn`). So the evaluation
runs the application's validation on its datamodule's held-out split, with the checkpoint's
weights, and records whatever the application logs there; the gate's rules and its champion
metric name those scores. An application may instead provide its own class or static method

    evaluate(checkpoint: str, dataset_paths: list[str], config: dict) -> dict[str, float]

which is then called (and its scores recorded) instead. The champion is scored the same way on the
same held-out data, so that the gate compares like with like.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from maelflow.operations.scores import EvaluationError


@dataclass
class AppEvaluation:
    """An application's scores, in the shape the gate and the catalogue read (as an anemoi evaluation's)."""

    checkpoint: str
    dataset: str
    metrics: dict[str, float]
    how: str
    references: dict = field(default_factory=dict)

    def summary(self) -> dict[str, float]:
        return dict(self.metrics)

    def to_json(self) -> dict:
        return {"checkpoint": self.checkpoint, "dataset": self.dataset, "dates": [], "how": self.how,
                "model": {"metrics": self.metrics}, "references": self.references, "summary": self.summary()}


def _clean(metrics: dict) -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in metrics.items():
        try:
            number = float(value)
        except (TypeError, ValueError):
            continue
        if math.isfinite(number):
            out[str(key)] = number
    return out


def evaluate_application(application: str, datamodule: str | None, checkpoint: Path, dataset_paths: list[Path],
                         config: dict) -> AppEvaluation:
    """Score ``checkpoint`` of the application ``application`` (``package.module:Class``) on its held-out data."""
    from maelflow.training.runs import TrainingError, import_object

    if not checkpoint.is_file():
        raise EvaluationError(f"no checkpoint at {checkpoint}")
    missing = [str(p) for p in dataset_paths if not p.exists()]
    if missing:
        raise EvaluationError(f"dataset not staged: {', '.join(missing)}")
    try:
        app = import_object(application)
    except TrainingError as exc:
        raise EvaluationError(str(exc)) from None
    cfg = {k: v for k, v in config.items() if k != "max_epochs"}
    own = getattr(app, "evaluate", None)
    if callable(own) and isinstance(app.__dict__.get("evaluate"), (staticmethod, classmethod)):
        metrics = _clean(own(str(checkpoint), [str(p) for p in dataset_paths], dict(cfg)) or {})
        how = f"{application}.evaluate"
    else:
        metrics, how = _validate(app, application, datamodule, checkpoint, dataset_paths, cfg)
    if not metrics:
        raise EvaluationError(f"{application} reported no score for {checkpoint.name} (its validation logs none)")
    return AppEvaluation(str(checkpoint), str(dataset_paths[0]) if dataset_paths else "", metrics, how)


def _validate(app, application: str, datamodule: str | None, checkpoint: Path, dataset_paths: list[Path],
              cfg: dict) -> tuple[dict[str, float], str]:
    """The application's validation loop (its datamodule's held-out split) with the checkpoint's weights."""
    import pytorch_lightning as pl

    from maelflow.training.runs import TrainingError, application_arguments, application_datamodule

    if datamodule is None:
        raise EvaluationError(f"{application} has no datamodule to take held-out data from (and no evaluate())")
    try:
        dm = application_datamodule(datamodule, dataset_paths, cfg)
    except TrainingError as exc:
        raise EvaluationError(str(exc)) from None
    try:
        model = app.load_from_checkpoint(str(checkpoint), map_location="cpu", weights_only=False,
                                         **application_arguments(dm, cfg))
    except Exception as exc:  # noqa: BLE001 - another application's checkpoint, or a damaged file
        raise EvaluationError(f"{checkpoint} is not a checkpoint {application} can load: "
                              f"{type(exc).__name__}: {str(exc)[:300]}") from None
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    results = trainer.validate(model, datamodule=dm, verbose=False)
    metrics: dict[str, float] = {}
    for block in results or []:
        metrics.update(_clean(block))
    metrics.update({k: v for k, v in _clean(dict(trainer.callback_metrics)).items() if k not in metrics})
    return metrics, f"{application} validation ({type(dm).__name__} held-out split)"

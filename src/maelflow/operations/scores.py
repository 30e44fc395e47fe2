"""Scores of a checkpoint on held-out data of its dataset, beside persistence and climatology.

Held-out means the dates the training did not learn from: the checkpoint's own test period
(``config.dataloader.test``), else the last fifth of the dataset (what maelflow's anemoi launcher
leaves for validation and test). ``samples`` initial dates spread evenly over that period are
forecast one step (the model's time step) ahead, from the model's ``multistep_input`` states read
from the dataset, exactly as anemoi-training feeds it. The same targets are "forecast" by
persistence (the last input state) and by climatology (the mean state over the training period,
per grid point), so a model's skill is measured against what needs no model at all.

Reported per output variable: RMSE and MAE; overall: ``nrmse`` (RMSE over the variable's standard
deviation in the dataset, averaged over variables: comparable across variables) and skill scores
``skill_<reference> = 1 - nrmse / nrmse_<reference>`` (positive: better than the reference).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

TRAIN_FRACTION = 0.8
CLIMATOLOGY_DATES = 64


class EvaluationError(Exception):
    """The checkpoint or the dataset cannot be scored (the message says why)."""


@dataclass
class Scores:
    """Per-variable RMSE/MAE of one forecaster and its overall normalised RMSE."""

    rmse: dict[str, float]
    mae: dict[str, float]
    nrmse: float

    def to_json(self) -> dict:
        return {"rmse": self.rmse, "mae": self.mae, "nrmse": self.nrmse}


@dataclass
class Evaluation:
    checkpoint: str
    dataset: str
    dates: list[str]
    model: Scores
    references: dict[str, Scores] = field(default_factory=dict)

    def summary(self) -> dict[str, float]:
        """The flat scores a gate rule names: nrmse, skill_<reference>, rmse.<var>, mae.<var>."""
        out: dict[str, float] = {"nrmse": self.model.nrmse}
        for name, ref in self.references.items():
            out[f"skill_{name}"] = skill(self.model.nrmse, ref.nrmse)
        for var, value in self.model.rmse.items():
            out[f"rmse.{var}"] = value
        for var, value in self.model.mae.items():
            out[f"mae.{var}"] = value
        return out

    def to_json(self) -> dict:
        return {"checkpoint": self.checkpoint, "dataset": self.dataset, "dates": self.dates,
                "lead": "one model time step", "model": self.model.to_json(),
                "references": {k: v.to_json() for k, v in self.references.items()}, "summary": self.summary()}


def skill(nrmse: float, reference: float) -> float:
    """``1 - nrmse / reference``: 0 is the reference's quality, 1 perfect, negative worse than it."""
    if reference <= 0 or not math.isfinite(reference):
        return 0.0
    return 1.0 - nrmse / reference


def held_out_indices(dates: list[datetime], config: dict, multistep: int, samples: int) -> list[int]:
    """Indices ``i`` of target dates in the test period with their ``multistep`` inputs inside it too."""
    test = (((config.get("dataloader") or {}).get("test") or {}).get("datasets") or {}).get("data") or {}
    start, end = test.get("start"), test.get("end")
    try:
        lo = datetime.fromisoformat(str(start)) if start else dates[int(len(dates) * TRAIN_FRACTION)]
        hi = datetime.fromisoformat(str(end)) if end else dates[-1]
    except (ValueError, IndexError):
        raise EvaluationError(f"the checkpoint's test period ({start} to {end}) is not a pair of dates") from None
    first = next((i for i, d in enumerate(dates) if d >= lo), None)
    last = max((i for i, d in enumerate(dates) if d <= hi), default=None)
    if first is None or last is None or last - first < multistep:
        raise EvaluationError(f"the held-out period {lo} to {hi} has fewer than {multistep + 1} dates of the "
                              "dataset: nothing to score")
    candidates = list(range(first + multistep, last + 1))
    if samples >= len(candidates):
        return candidates
    step = (len(candidates) - 1) / max(samples - 1, 1)
    return sorted({candidates[round(k * step)] for k in range(samples)})


def _scores(pred, truth, names: list[str], stdev: dict[str, float]) -> Scores:
    import numpy as np

    err = pred - truth  # (samples, grid, variables)
    rmse = {n: float(np.sqrt(np.mean(err[..., j] ** 2))) for j, n in enumerate(names)}
    mae = {n: float(np.mean(np.abs(err[..., j]))) for j, n in enumerate(names)}
    nrmse = float(np.mean([rmse[n] / stdev[n] if stdev[n] > 0 else rmse[n] for n in names]))
    return Scores(rmse, mae, nrmse)


def _data_indices(md: dict) -> dict:
    """The data-space indices (input/output name_to_index, full) of the checkpoint's one dataset:
    ``data_indices.data`` in single-dataset releases, ``data_indices.<dataset>.data`` in multi-dataset ones."""
    di = md.get("data_indices") or {}
    for candidate in (di.get("data"), *(v.get("data") for v in di.values() if isinstance(v, dict))):
        if isinstance(candidate, dict) and "input" in candidate and "output" in candidate:
            return candidate
    return {}


def evaluate_checkpoint(checkpoint: Path, dataset: Path, samples: int = 8, dates: list[str] | None = None
                        ) -> Evaluation:
    """Score the anemoi inference checkpoint ``checkpoint`` on held-out dates of ``dataset`` (or on
    ``dates``, the target dates another evaluation used: a champion is scored on the candidate's)."""
    import numpy as np
    import torch
    from anemoi.datasets import open_dataset
    from anemoi.utils.checkpoints import load_metadata

    dates_wanted = dates
    if not checkpoint.is_file():
        raise EvaluationError(f"no checkpoint at {checkpoint}")
    if not dataset.exists():
        raise EvaluationError(f"no dataset at {dataset}")
    try:
        md = load_metadata(str(checkpoint))
    except Exception as exc:  # noqa: BLE001 - not an anemoi checkpoint, or damaged
        raise EvaluationError(f"{checkpoint} has no anemoi metadata: {exc}") from None
    config = md.get("config") or {}
    # anemoi-training 0.10 keeps it in training.multistep_input, the 0.17 line in task.multistep_input
    multistep = int(((config.get("task") or {}).get("multistep_input"))
                    or ((config.get("training") or {}).get("multistep_input")) or 2)
    indices = _data_indices(md)
    names_in = (indices.get("input") or {}).get("name_to_index") or {}
    out_full = (indices.get("output") or {}).get("full") or []
    if not names_in or not out_full:
        raise EvaluationError(f"{checkpoint}: its metadata has no data_indices (is it an anemoi forecaster?)")
    ds = open_dataset(str(dataset))
    by_name = {n: i for i, n in enumerate(ds.variables)}
    missing = [n for n in names_in if n not in by_name]
    if missing:
        raise EvaluationError(f"dataset {dataset} lacks variables the checkpoint reads: {', '.join(missing)}")
    # the checkpoint's data index -> the dataset's (they agree when the dataset is the one trained on)
    order = [by_name[n] for n, _ in sorted(names_in.items(), key=lambda kv: kv[1])]
    index_to_name = {i: n for n, i in names_in.items()}
    out_names = [index_to_name[i] for i in out_full]
    out_ds = [by_name[n] for n in out_names]
    dates = [datetime.fromisoformat(str(d)[:19]) for d in ds.dates]
    if dates_wanted:
        where = {d.isoformat(): i for i, d in enumerate(dates)}
        lost = [d for d in dates_wanted if d not in where or where[d] < multistep]
        if lost:
            raise EvaluationError(f"dataset {dataset} cannot score the dates {', '.join(lost[:3])}")
        targets = [where[d] for d in dates_wanted]
    else:
        targets = held_out_indices(dates, config, multistep, samples)
    stats = ds.statistics
    stdev = {n: float(stats["stdev"][by_name[n]]) for n in out_names}

    cut = targets[0] - multistep
    train_idx = np.linspace(0, max(cut - 1, 0), num=min(CLIMATOLOGY_DATES, max(cut, 1))).round().astype(int)
    climatology = np.mean(np.stack([ds[int(i)][out_ds, 0, :] for i in sorted(set(train_idx))]), axis=0).T

    model = torch.load(str(checkpoint), map_location="cpu", weights_only=False)
    model.eval()
    preds, truths, persist, clim = [], [], [], []
    with torch.no_grad():
        for i in targets:
            window = np.stack([ds[j][order, 0, :] for j in range(i - multistep, i)])  # (time, vars, grid)
            x = torch.from_numpy(np.transpose(window, (0, 2, 1))[None].astype("float32"))  # (1, time, grid, vars)
            y = model.predict_step({"data": x})
            y = y["data"] if isinstance(y, dict) else y
            preds.append(y.reshape(-1, y.shape[-2], y.shape[-1])[0].numpy())   # (grid, out vars)
            truths.append(ds[i][out_ds, 0, :].T)
            persist.append(ds[i - 1][out_ds, 0, :].T)
            clim.append(climatology)
    pred, truth = np.stack(preds), np.stack(truths)
    if not np.all(np.isfinite(pred)):
        raise EvaluationError(f"{checkpoint} forecasts non-finite values on the held-out dates")
    return Evaluation(
        checkpoint=str(checkpoint), dataset=str(dataset), dates=[dates[i].isoformat() for i in targets],
        model=_scores(pred, truth, out_names, stdev),
        references={"persistence": _scores(np.stack(persist), truth, out_names, stdev),
                    "climatology": _scores(np.stack(clim), truth, out_names, stdev)})


def champion_comparison(candidate: dict, champion: dict | None) -> dict[str, Any]:
    """The candidate's skill against the champion's scores (same dates, same dataset), if there is one."""
    if not champion:
        return {}
    return {"skill_champion": skill(candidate["model"]["nrmse"], champion["model"]["nrmse"])}

"""What every training launcher shares: where a training's datasets and outputs are on a site,
its result, and how an application given by import path is loaded."""

from __future__ import annotations

import importlib
import json
import os
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from maelflow.errors import MaelflowError
from maelflow.config.loader import ResolvedExperiment


class TrainingError(MaelflowError):
    pass


@dataclass
class TrainingResult:
    run_dir: Path
    run_id: str | None
    tracking_uri: str | None
    checkpoints: list[Path]
    global_step: int
    epochs: int


def import_object(path: str) -> Any:
    module, _, name = path.partition(":")
    try:
        obj = importlib.import_module(module)
    except ImportError as exc:
        raise TrainingError(f"cannot import module {module!r} of {path!r}: {exc}") from None
    for part in name.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise TrainingError(f"module {module!r} has no {name!r} (from {path!r})") from None
    return obj


def application_datamodule(datamodule: str, dataset_paths: list[Path], config: dict) -> Any:
    """The datamodule of a training given by import path, ready for ``fit`` or ``validate``.

    This is the whole protocol maelflow promises a Lightning application (docs/training.md): the
    datamodule is built with ``dataset_paths=`` (the staged zarr folders) plus the training's
    ``config`` and set up for "fit" (its training and held-out splits); the model is then built
    with the same config plus the datamodule's ``model_kwargs`` (``application_arguments``). The
    launcher and the evaluation build both the same way, so a checkpoint loads as it was trained."""
    dm = import_object(datamodule)(dataset_paths=[str(p) for p in dataset_paths], **config)
    dm.setup("fit")
    return dm


def application_arguments(dm: Any, config: dict) -> dict:
    """The keyword arguments a training's application (its ``__init__``) is built with."""
    return {**config, **getattr(dm, "model_kwargs", {})}


def dataset_path(rx: ResolvedExperiment, site: str, dataset: str) -> Path:
    return Path(rx.sites[site].paths.datasets) / f"{dataset}.zarr"


def run_dir(rx: ResolvedExperiment, site: str, training: str, deploy_id: str | None = None) -> Path:
    """``<outputs>/<experiment>/<training>/<deploy id>``: one folder per deploy of the suite, so a
    redeploy starts a new run and a resubmitted job of the same deploy resumes its own."""
    deploy_id = deploy_id or os.environ.get("MAELFLOW_DEPLOY_ID") or "0"
    path = Path(rx.sites[site].paths.outputs) / rx.name / training / deploy_id
    repeat = os.environ.get("MAELFLOW_REPEAT")
    if repeat:  # a benchmark repeat is a run of its own, and so is each day's cycle of the benchmark
        path = path / f"bench-{os.environ.get('MAELFLOW_ROUND') or '0'}-r{repeat}"
    return path


def benchmark_tags() -> dict[str, str]:
    """The MLflow tags of a benchmark-mode run (the suite's benchmark family sets the variables),
    by which the suite's report task finds its runs; none outside benchmark mode."""
    if not os.environ.get("MAELFLOW_REPEAT"):
        return {}
    return {"maelflow.benchmark": os.environ.get("MAELFLOW_BENCHMARK", ""),
            "maelflow.benchmark.repeat": os.environ["MAELFLOW_REPEAT"],
            "maelflow.benchmark.round": os.environ.get("MAELFLOW_ROUND") or "0",
            "maelflow.deploy": os.environ.get("MAELFLOW_DEPLOY_ID") or "0"}


def dataset_uuid(path: Path) -> str | None:
    try:
        return json.loads((path / ".zattrs").read_text()).get("uuid")
    except (OSError, ValueError):
        return None


def dataset_dates(attrs: dict) -> list[datetime]:
    """The dates of an anemoi dataset from its root attributes (start_date, end_date, frequency)."""
    start = datetime.fromisoformat(str(attrs["start_date"])[:19])
    end = datetime.fromisoformat(str(attrs["end_date"])[:19])
    freq = str(attrs.get("frequency", "6h"))
    unit = {"h": 3600, "m": 60, "d": 86400, "s": 1}.get(freq[-1:])
    if unit is None or not freq[:-1].isdigit() or int(freq[:-1]) <= 0:
        raise ValueError(f"frequency {freq!r} is not a number of hours, days, minutes or seconds")
    step = timedelta(seconds=int(freq[:-1]) * unit)
    return [start + i * step for i in range(int((end - start) / step) + 1)]

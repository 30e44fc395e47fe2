"""The demo, end to end on local defaults: services, a synthetic dataset, the demo suite."""

from __future__ import annotations

from pathlib import Path

from maelflow.config.loader import ResolvedExperiment
from maelflow.workspace import Workspace


def prepare_datasets(rx: ResolvedExperiment) -> list[Path]:
    """Create the synthetic source zarr of every demo dataset without a recipe (a dataset with a
    recipe is built by the suite's build task)."""
    from maelflow.training.synthetic import make_synthetic

    made = []
    for ds in rx.datasets.values():
        if ds.source and not ds.recipe and "synth" in ds.name and not Path(ds.source).exists():
            made.append(make_synthetic(Path(ds.source)))
    return made


def services_needed(rx: ResolvedExperiment) -> list[str]:
    names = ["ecflow", "s3", "mlflow"]
    if any(s.name == "localhpc" for s in rx.sites.values()):
        names.append("hpc")
    return names


def start(ws: Workspace, rx: ResolvedExperiment, on_start=None):
    from maelflow.services import stack

    return stack.up(ws, names=[n for n in services_needed(rx) if n in stack.SERVICES], on_start=on_start)

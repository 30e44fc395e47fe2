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
        if ds.source and not ds.recipe and not ds.generator and "synth" in ds.name and not Path(ds.source).exists():
            made.append(make_synthetic(Path(ds.source)))
    return made


# what each kind of suite task talks to, beyond ecFlow (tests check the demo starts all of them)
TASK_SERVICES = {"publish": "s3", "stage": "s3", "train": "mlflow", "sync": "mlflow",
                 "locate": "catalogue", "register": "catalogue", "report": "mlflow"}


def services_needed(rx: ResolvedExperiment) -> list[str]:
    """ecFlow, and what the suite's tasks use: the S3 store, MLflow, the catalogue (``locate`` and
    ``register`` record datasets, trainings and checkpoints); with the loopback HPC site, the site
    and the relay its jobs report through."""
    names = ["ecflow", "s3", "mlflow", "catalogue"]
    if any(s.name == "localhpc" for s in rx.sites.values()):
        names += ["hpc", "relay"]
    return names


def start(ws: Workspace, rx: ResolvedExperiment, on_start=None):
    from maelflow.services import stack

    # a name the installation lacks ('hpc' without maelflow-sandbox) fails here, saying what to install
    return stack.up(ws, names=services_needed(rx), on_start=on_start)

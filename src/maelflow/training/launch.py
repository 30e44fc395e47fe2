"""Run one training of an experiment on the site the job runs on.

The application is a LightningModule given by import path, with its LightningDataModule; the
datasets are read where they were staged on the site. A job that restarts (resubmitted after a time
limit) continues from the last checkpoint and the same MLflow run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from maelflow.config.loader import ResolvedExperiment
from maelflow.reporting import Reporter
from maelflow.sites.schedulers import process_rank, scheduler_for
from maelflow.training.runs import (TrainingError, TrainingResult, application_arguments, application_datamodule,
                                    benchmark_tags, dataset_path, dataset_uuid, import_object, run_dir)
from maelflow.workspace import write_atomic



def find_run_checkpoint(outputs: Path, run_id: str) -> Path | None:
    """The last checkpoint of the run ``run_id`` anywhere under a site's outputs (its run.json says)."""
    for state_file in outputs.glob("*/*/*/run.json"):
        try:
            if json.loads(state_file.read_text()).get("run_id") == run_id:
                last = state_file.parent / "checkpoints" / "last.ckpt"
                return last if last.exists() else None
        except (OSError, ValueError):
            continue
    return None


__all__ = ["train", "TrainingError", "TrainingResult", "dataset_path", "run_dir"]


def train(rx: ResolvedExperiment, training_name: str, site_name: str, reporter: Reporter,
          tracking_uri: str | None = None) -> TrainingResult:
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import ModelCheckpoint
    from pytorch_lightning.loggers import MLFlowLogger

    from maelflow.provenance import record
    from maelflow.tracking.mlflow_runs import choose_mode, offline_uri, run_label
    from maelflow.training.progress import EcflowProgress
    from maelflow.training.timing import apply_timing_config, timing_callbacks

    training = rx.trainings[training_name]
    site = rx.sites[site_name]
    apply_timing_config(training.timing)     # read by our callbacks and by those anemoi builds
    if training.nodes * max(training.gpus_per_node, 1) == 1:
        # one process still makes a rendezvous (anemoi's strategy always does) on MASTER_PORT: one
        # inherited from the job's environment, or picked beforehand by Lightning (a free one, or one
        # from the job id under SLURM), can be another training's at the bind (EADDRINUSE seen with
        # two trainings at once on one machine). Port 0 lets the kernel choose at the bind, and a
        # single process has nobody to tell the port to.
        os.environ["MASTER_PORT"] = "0"
    if training.application == "anemoi":
        from maelflow.training.anemoi_app import train_anemoi

        return train_anemoi(rx, training_name, site_name, reporter, tracking_uri)
    app = import_object(training.application)
    if training.datamodule is None:
        raise TrainingError(f"training {training_name!r}: 'datamodule' is needed with an application import path")
    paths = [dataset_path(rx, site_name, d) for d in training.datasets]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise TrainingError(f"training {training_name!r}: dataset not staged on {site_name}: {', '.join(missing)}")

    # several processes (nodes x GPUs, or nodes on CPU: DDP with gloo) are started by the scheduler's
    # launcher (SLURM: srun, one per task); rank 0 alone creates the MLflow run and writes run.json
    world = training.nodes * max(training.gpus_per_node, 1)
    scheduler = scheduler_for(site_name, site)
    if world > 1 and scheduler.rank_in() is None:
        raise TrainingError(f"training {training_name!r}: {world} processes ({training.nodes} node(s)) need one "
                            f"process per task started by the {site.scheduler} scheduler's launcher "
                            f"({scheduler.LAUNCH or 'none'}); this process was started without it")
    rank0 = process_rank() == 0

    out = run_dir(rx, site_name, training_name)
    ckpt_dir = out / "checkpoints"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    state_file = out / "run.json"
    state = json.loads(state_file.read_text()) if state_file.exists() else {}

    cfg = dict(training.config)
    max_epochs = int(cfg.pop("max_epochs", 1))
    dm = application_datamodule(training.datamodule, paths, cfg)
    model = app(**application_arguments(dm, cfg))

    last = ckpt_dir / "last.ckpt"
    start_from = str(last) if last.exists() else None
    forked = None
    if start_from is None and training.fork_from:
        # a fork starts a new run from the weights (and optimiser state) of an earlier run's last checkpoint
        parent = find_run_checkpoint(Path(site.paths.outputs), training.fork_from)
        if parent is None:
            raise TrainingError(f"training {training_name!r}: no checkpoint of run {training.fork_from} to fork "
                                f"from under {site.paths.outputs}")
        start_from, forked = str(parent), training.fork_from
        state["forked_from"] = forked

    mode = choose_mode(training, site, tracking_uri)
    logger = None
    uri = None
    if mode != "off":
        uri = tracking_uri if mode == "online" else offline_uri(out)
    if mode == "online" and rank0:   # the suite's trainings start at once and share the experiment
        from mlflow import MlflowClient

        from maelflow.tracking.mlflow_runs import ensure_experiment

        ensure_experiment(MlflowClient(uri), training.mlflow.experiment or rx.name)
    if mode != "off" and rank0:
        logger = MLFlowLogger(experiment_name=training.mlflow.experiment or rx.name, run_name=training_name,
                              tracking_uri=uri, run_id=state.get("run_id"),
                              tags={"maelflow.experiment": rx.name, "maelflow.site": site_name,
                                    "maelflow.training": training_name, "maelflow.mode": mode,
                                    **benchmark_tags(),
                                    **({"forkedRun": "True", "forkedRunId": forked} if forked else {})})
        run_id = logger.run_id
        state.update(run_id=run_id, tracking_uri=uri, experiment_id=logger.experiment_id, mode=mode)
        write_atomic(state_file, json.dumps(state, indent=2) + "\n")
        reporter.label("mlflow", run_label(uri, logger.experiment_id, run_id))
        prov = record(rx.to_json(), {"training": training_name, "site": site_name,
                                     "datasets": {str(p): dataset_uuid(p) for p in paths}})
        logger.experiment.log_dict(run_id, prov, "provenance.json")

    plugins = []
    if scheduler.job_id_in():
        # in a batch job: Lightning's view of the cluster, with the scheduler's own requeue off (the
        # suite resubmits a timed-out job itself)
        cluster = scheduler.lightning_environment()
        if cluster is not None:
            plugins.append(cluster)
    trainer = pl.Trainer(plugins=plugins,
        max_epochs=max_epochs, accelerator="gpu" if training.gpus_per_node else "cpu",
        devices=training.gpus_per_node or 1, num_nodes=training.nodes, logger=logger if logger else False,
        callbacks=[EcflowProgress(reporter), *timing_callbacks(),
                   ModelCheckpoint(dirpath=ckpt_dir, save_last=True, every_n_epochs=1)],
        default_root_dir=str(out), enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1)
    trainer.fit(model, datamodule=dm, ckpt_path=start_from)
    checkpoints = sorted(ckpt_dir.glob("*.ckpt"))
    return TrainingResult(out, state.get("run_id"), uri, checkpoints, trainer.global_step, trainer.current_epoch)

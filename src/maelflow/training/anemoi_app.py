"""Run anemoi-training for a training whose ``application`` is ``anemoi``, inside this process.

The installed anemoi-training decides the configuration: the 0.10 line and the current line (0.17)
have different schemas, and each has its own base config (``anemoi_versions``). The configuration is
composed with Hydra from three layers, each over the one before:

1. maelflow's base config of the installed line, ``anemoi_configs/<line>/maelflow-base.yaml`` (a tiny
   CPU model), whose defaults list takes the groups (data, dataloader, model, graph...) from
   anemoi-training's own packaged configs, ``pkg://anemoi.training/config``;
2. the training's ``config`` mapping, merged as nested keys (a ``defaults`` list in it replaces
   ``[maelflow-base, _self_]``);
3. the training's ``overrides``, Hydra overrides (``model=graphtransformer``, ``training.max_steps=100``).

Then maelflow sets what only it knows: the staged dataset, the run folder, the hardware, MLflow,
resume and fork. The composed files are kept in ``<run dir>/config/`` (``maelflow-training.yaml``,
what was composed, and ``anemoi.yaml``, the full config anemoi received).

A job that starts again (resubmitted after its time limit) finds ``run.json`` and
``checkpoint/<run_id>/last.ckpt`` in the run folder and resumes with ``training.run_id``: the
step count continues and, with ``diagnostics.log.mlflow.on_resume_create_child: False`` (maelflow's
default), anemoi logs into the same MLflow run.

Single device on the node is what this launcher is made for; several GPUs or nodes need one
process per GPU started by ``srun`` (SLURM), each of which runs this same code.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from maelflow.provenance import guard_anemoi
from maelflow.training.anemoi_versions import (BASE_CONFIG_NAME, AnemoiVersionError, Line, installed_line,
                                               installed_version)
from maelflow.training.runs import TrainingError, TrainingResult, benchmark_tags, dataset_path, run_dir
from maelflow.training.progress import EcflowProgress
from maelflow.training.timing import timing_callbacks
from maelflow.workspace import write_atomic

if TYPE_CHECKING:  # pragma: no cover
    from omegaconf import DictConfig

    from maelflow.config.loader import ResolvedExperiment
    from maelflow.config.models import Training
    from maelflow.reporting import Reporter

PRIMARY_NAME = "maelflow-training"
TRAIN_FRACTION = 0.8


# ------------------------------------------------------------------------------------ progress
class AnemoiProgress(EcflowProgress):
    """maelflow's ecFlow progress, reading anemoi's metric names (``train_<name>_loss_step``...).

    Meter ``epoch``; label ``info`` with step, loss and an ETA from the step rate (anemoi trains
    to ``max_steps`` more often than to ``max_epochs``); event ``checkpoint`` on every save. It
    also keeps the Lightning trainer, whose step count the launcher returns.
    """

    def __init__(self, reporter: "Reporter"):
        super().__init__(reporter)
        self.trainer = None
        self.step0 = 0

    def on_train_start(self, trainer, pl_module) -> None:
        self.trainer = trainer
        self.step0 = trainer.global_step
        super().on_train_start(trainer, pl_module)

    def on_fit_end(self, trainer, pl_module) -> None:
        self.trainer = trainer

    @staticmethod
    def _metric(trainer, prefix: str, suffix: str) -> float | None:
        metrics = trainer.callback_metrics
        for key in (f"{prefix}_loss{suffix}", f"{prefix}_multi_dataset_loss{suffix}"):
            if key in metrics:
                return float(metrics[key])
        for key, value in metrics.items():
            if key.startswith(f"{prefix}_") and key.endswith(f"_loss{suffix}"):
                return float(value)
        return None

    def _total_steps(self, trainer) -> int | None:
        limits = []
        if trainer.max_steps and trainer.max_steps > 0:
            limits.append(trainer.max_steps)
        batches = trainer.num_training_batches
        if trainer.max_epochs and trainer.max_epochs > 0 and isinstance(batches, int | float) \
                and batches != float("inf"):
            accum = max(int(trainer.accumulate_grad_batches or 1), 1)
            limits.append(int(trainer.max_epochs * batches // accum))
        return min(limits) if limits else None

    def _text(self, trainer, loss: float | None, val: float | None = None) -> str:
        total = self._total_steps(trainer)
        step = trainer.global_step
        text = f"epoch {trainer.current_epoch} step {step}" + (f"/{total}" if total else "")
        if loss is not None:
            text += f" loss {loss:.4g}"
        if val is not None:
            text += f" val {val:.4g}"
        done = step - self.step0
        if total and done > 0:
            rate = done / max(time.monotonic() - self.t0, 1e-6)
            text += f" {rate:.2f} steps/s ETA {max(total - step, 0) / rate:.0f}s"
        return text

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = self._metric(trainer, "train", "_step")
        self.reporter.throttled("label", "info", self._text(trainer, loss), every=2.0)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.reporter.meter("epoch", trainer.current_epoch + 1)
        loss = self._metric(trainer, "train", "_epoch")
        val = self._metric(trainer, "val", "_epoch")
        self.reporter.label("info", self._text(trainer, loss, val))


# ----------------------------------------------------------------------------------- config
def _line_overrides(line: Line, training: "Training", cfg: "DictConfig") -> None:
    """What a line's base config cannot say in YAML, set after composition.

    0.17: the model files disagree on the shape of ``model.bounding`` (a list in gnn, a mapping of
    dataset names to lists in graphtransformer and transformer), so the base config cannot empty it
    for every model; the tiny dataset has no ``tp`` to bound. A training that sets
    ``model.bounding`` (config or overrides) keeps its own."""
    from omegaconf import DictConfig, OmegaConf

    if line.name != "0.17":
        return
    own = "bounding" in (training.config.get("model") or {}) or any(
        o.lstrip("+~").startswith("model.bounding") for o in training.overrides)
    bounding = OmegaConf.select(cfg, "model.bounding", default=None)
    if own or bounding is None:
        return
    if isinstance(bounding, DictConfig) and "datasets" in bounding:
        empty: Any = {"datasets": {name: [] for name in bounding.datasets}}
    else:
        empty = []
    OmegaConf.update(cfg, "model.bounding", empty, merge=False)


def _first_line(exc: BaseException) -> str:
    while not str(exc).strip() and (exc.__cause__ or exc.__context__):
        exc = exc.__cause__ or exc.__context__
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    return lines[0] if lines else type(exc).__name__


def compose_config(training: "Training", config_dir: Path, line: Line | None = None) -> "DictConfig":
    """Base config of ``line`` (the installed anemoi-training's by default), then ``training.config``,
    then ``training.overrides``, then what the line needs set in code (``_line_overrides``); not yet
    resolved.

    Writes the primary config it composes from to ``config_dir/maelflow-training.yaml``.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    line = line or installed_line()
    body = dict(training.config)
    primary: dict[str, Any] = {
        "defaults": body.pop("defaults", [BASE_CONFIG_NAME, "_self_"]),
        "hydra": {"searchpath": [line.config_dir.as_uri(), "pkg://anemoi.training/config"]},
        **body,
    }
    config_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(config_dir / f"{PRIMARY_NAME}.yaml",
                 f"# composed by maelflow for anemoi-training {line.name} ({installed_version()}): base config, "
                 "then the training's config; overrides: "
                 + json.dumps(list(training.overrides)) + "\n" + OmegaConf.to_yaml(OmegaConf.create(primary)))
    GlobalHydra.instance().clear()
    try:
        # anemoi's Hydra search-path plugin puts the CWD (or CWD/config) first: make that ours
        with contextlib.chdir(config_dir.parent), \
                initialize_config_dir(config_dir=str(config_dir), version_base=None):
            cfg = compose(config_name=PRIMARY_NAME, overrides=list(training.overrides))
    except Exception as exc:  # noqa: BLE001 - Hydra wraps YAML, override and missing-group errors
        raise TrainingError(f"training {training.name!r}: cannot compose the anemoi config for anemoi-training "
                            f"{installed_version()} (the {line.name} line's schema): {_first_line(exc)}",
                            hint="maelflow validate names the keys this version does not have") from None
    finally:
        GlobalHydra.instance().clear()
    OmegaConf.set_struct(cfg, False)
    _line_overrides(line, training, cfg)
    return cfg


def _dataset_dates(path: Path) -> list[datetime] | None:
    from maelflow.training.runs import dataset_dates

    try:
        return dataset_dates(json.loads((path / ".zattrs").read_text()))
    except (OSError, ValueError, KeyError):
        return None


def split_dates(cfg: "DictConfig", dataset: Path) -> None:
    """Fill null dataloader start/end dates: the first 80% of the dataset's dates train, the rest
    validate and test. Dates a config sets are left alone."""
    from omegaconf import OmegaConf

    dates = _dataset_dates(dataset)
    if not dates or len(dates) < 8:
        return
    cut = int(len(dates) * TRAIN_FRACTION)
    ranges = {"training": (dates[0], dates[cut - 1]), "validation": (dates[cut], dates[-1]),
              "test": (dates[cut], dates[-1])}
    for split, (start, end) in ranges.items():
        node = OmegaConf.select(cfg, f"dataloader.{split}.datasets", default=None)
        if node is None:
            continue
        for name in node:
            for key, value in (("start", start), ("end", end)):
                if OmegaConf.select(cfg, f"dataloader.{split}.datasets.{name}.{key}", default=None) is None:
                    OmegaConf.update(cfg, f"dataloader.{split}.datasets.{name}.{key}",
                                     value.isoformat(timespec="seconds"), force_add=True)


def _find_checkpoint(rx: "ResolvedExperiment", site_name: str, out: Path, run_id: str) -> Path | None:
    """``checkpoint/<run_id>/last.ckpt`` in this run folder, else in another run folder of the site."""
    own = out / "checkpoint" / run_id / "last.ckpt"
    if own.exists():
        return own
    outputs = Path(rx.sites[site_name].paths.outputs)
    for depth in range(1, 5):  # <outputs>/<experiment>/<training>/<deploy id>/checkpoint/<run id>
        found = sorted(outputs.glob("/".join(["*"] * depth) + f"/checkpoint/{run_id}/last.ckpt"))
        if found:
            return found[0]
    return None


def _world_size(training: "Training") -> int:
    return max(training.gpus_per_node, 1) * training.nodes


def _rank() -> int:
    """This process's rank: torch's, else the job's scheduler's (SLURM: SLURM_PROCID), else 0."""
    from maelflow.sites.schedulers import current

    if os.environ.get("RANK", "").isdigit():
        return int(os.environ["RANK"])
    rank = current().rank_in()
    if rank is not None:
        return rank
    return int(os.environ["LOCAL_RANK"]) if os.environ.get("LOCAL_RANK", "").isdigit() else 0


# ------------------------------------------------------------------------------------ trainer
def _trainer_class():
    from anemoi.training.train.train import AnemoiTrainer

    class MaelflowAnemoiTrainer(AnemoiTrainer):
        """AnemoiTrainer with maelflow's ecFlow progress and timing among its Lightning callbacks."""

        def __init__(self, config, progress: AnemoiProgress):
            self.maelflow_progress = progress
            super().__init__(config)

        @cached_property
        def callbacks(self):
            # anemoi's own (their arguments changed in 0.17), then maelflow's
            return [*AnemoiTrainer.callbacks.func(self), self.maelflow_progress, *timing_callbacks()]

        @cached_property
        def strategy(self):
            from maelflow.sites.schedulers import current

            strategy = AnemoiTrainer.strategy.func(self)
            scheduler = current()
            if scheduler.job_id_in() and hasattr(strategy, "cluster_environment"):
                # the suite resubmits a timed-out job itself; a scheduler's own requeue (Lightning's
                # `scontrol requeue`, its default in a SLURM job) would race it
                environment = scheduler.lightning_environment()
                if environment is not None:
                    strategy.cluster_environment = environment
            return strategy

    return MaelflowAnemoiTrainer


def _validation_message(exc: Exception) -> str:
    errors = getattr(exc, "errors", None)
    if callable(errors):
        try:
            items = errors()
            if items:
                first = items[0]
                loc = ".".join(str(p) for p in first.get("loc", ()))
                more = f" (and {len(items) - 1} more)" if len(items) > 1 else ""
                return f"{loc}: {first.get('msg')}{more}"
        except Exception:  # noqa: BLE001 - fall back to the text
            pass
    return _first_line(exc)


def train_anemoi(rx: "ResolvedExperiment", training_name: str, site_name: str, reporter: "Reporter",
                 tracking_uri: str | None) -> TrainingResult:
    from omegaconf import OmegaConf

    from maelflow.sites.schedulers import scheduler_for
    from maelflow.tracking.mlflow_runs import choose_mode, offline_uri, run_label

    training = rx.trainings[training_name]
    site = rx.sites[site_name]
    if training.application != "anemoi":
        raise TrainingError(f"training {training_name!r} is not an anemoi training")
    if not training.datasets:
        raise TrainingError(f"training {training_name!r}: anemoi needs a dataset ('datasets' is empty)")
    ds_path = dataset_path(rx, site_name, training.datasets[0])
    if not ds_path.exists():
        raise TrainingError(f"training {training_name!r}: dataset not staged on {site_name}: {ds_path}")
    world = _world_size(training)
    if world > 1 and scheduler_for(site_name, site).rank_in() is None:
        raise TrainingError(f"training {training_name!r}: {world} devices need one process per GPU started by "
                            f"the {site.scheduler} scheduler's launcher; this launcher runs one device in-process")
    rank0 = _rank() == 0
    try:
        line = installed_line()  # the base config and the schema follow the installed release
    except AnemoiVersionError as exc:
        raise TrainingError(f"training {training_name!r} on {site_name}: {exc}", hint=exc.hint) from None
    version = installed_version()

    out = run_dir(rx, site_name, training_name).absolute()
    out.mkdir(parents=True, exist_ok=True)
    state_file = out / "run.json"
    state: dict[str, Any] = json.loads(state_file.read_text()) if state_file.exists() else {}

    mode = choose_mode(training, site, tracking_uri)
    uri = None
    save_dir = out / "mlruns"
    if mode == "online":
        uri = tracking_uri
        from mlflow import MlflowClient

        from maelflow.tracking.mlflow_runs import ensure_experiment

        # the suite's trainings start at once and share the experiment: create it race-free first
        ensure_experiment(MlflowClient(uri), training.mlflow.experiment or rx.name)
    elif mode == "offline":
        uri = offline_uri(out)  # also lets MLflow 3 write a file store (MLFLOW_ALLOW_FILE_STORE)

    # resume (a previous start of this training left a checkpoint), fork, or a fresh start
    settings: dict[str, Any] = {}
    previous = state.get("run_id")
    last = out / "checkpoint" / previous / "last.ckpt" if previous else None
    resumed = forked = None
    if previous and last is not None and last.exists():
        if state.get("mode", mode) == mode and state.get("tracking_uri") == uri:
            settings["training.run_id"] = previous
            resumed = previous
        else:  # the tracking server changed: continue from the checkpoint in a new run
            settings["system.input.warm_start"] = str(last)
            resumed = previous
    elif training.fork_from:  # no checkpoint of its own yet: start from the parent run's
        parent = _find_checkpoint(rx, site_name, out, training.fork_from)
        if parent is None:
            raise TrainingError(f"training {training_name!r}: no checkpoint of run {training.fork_from} to fork from "
                                f"(looked for checkpoint/{training.fork_from}/last.ckpt under {out} and "
                                f"the site's outputs {site.paths.outputs})")
        if mode == "online":
            settings["training.fork_run_id"] = training.fork_from  # anemoi tags forkedRun/forkedRunId
        if mode != "online" or parent.parent.parent != out / "checkpoint":
            settings["system.input.warm_start"] = str(parent)
        forked = training.fork_from

    config_dir = out / "config"
    cfg = compose_config(training, config_dir, line)
    settings.update({
        "system.input.dataset": str(ds_path),
        "system.output.root": str(out),
        "system.hardware.accelerator": "gpu" if training.gpus_per_node else "cpu",
        "system.hardware.num_gpus_per_node": max(training.gpus_per_node, 1),
        "system.hardware.num_nodes": training.nodes,
        "diagnostics.log.mlflow.enabled": mode != "off",
        "diagnostics.log.mlflow.offline": mode == "offline",
        "diagnostics.log.mlflow.tracking_uri": uri if mode == "online" else str(save_dir),
        # anemoi's schema sets the logger's save_dir to this path (joined to output.root/logs)
        "system.output.logs.mlflow": str(save_dir),
        "diagnostics.log.mlflow.save_dir": str(save_dir),
        "diagnostics.log.mlflow.experiment_name": training.mlflow.experiment or rx.name,
        "diagnostics.log.mlflow.run_name": training_name,
    })
    if OmegaConf.select(cfg, "system.input.graph", default=None) is None:
        settings["system.input.graph"] = str(out / "graphs" / f"{training_name}.pt")
    for key, value in settings.items():
        OmegaConf.update(cfg, key, value, force_add=True)
    # a fine-tuning cycle (maelflow.operations.finetune): its dates, and the champion's weights to start from
    from maelflow.training.warm_start import apply_warm_start

    warm = apply_warm_start(cfg, out, resuming=bool(resumed))
    precision = OmegaConf.select(cfg, "training.precision", default=None)
    if isinstance(precision, int):  # `precision: 32` in YAML is an int; anemoi's schema wants "32"
        OmegaConf.update(cfg, "training.precision", str(precision))
    split_dates(cfg, ds_path)
    write_atomic(config_dir / "anemoi.yaml", OmegaConf.to_yaml(cfg))

    progress = AnemoiProgress(reporter)
    trainer_cls = _trainer_class()
    # anemoi gathers provenance (GitPython) for its checkpoint metadata: a shared installation
    # owned by another user must not end the training there
    guard_anemoi()
    with contextlib.chdir(out):
        try:
            trainer = trainer_cls(cfg, progress)
        except TrainingError:
            raise
        except Exception as exc:
            from pydantic import ValidationError

            if isinstance(exc, ValidationError):
                raise TrainingError(f"training {training_name!r}: invalid anemoi config: "
                                    f"{_validation_message(exc)}") from None
            raise
        run_id = str(trainer.run_id) if trainer.run_id else None
        mlflow_run_id = experiment_id = None
        if mode != "off" and rank0:
            logger = trainer.mlflow_logger
            mlflow_run_id, experiment_id = logger.run_id, logger.experiment_id
            _tag_run(logger, rx, training_name, site_name, mode, ds_path, resumed, forked, version)
        if rank0:
            state.update(run_id=run_id, mlflow_run_id=mlflow_run_id, tracking_uri=uri, mode=mode,
                         experiment_id=experiment_id,
                         experiment_name=training.mlflow.experiment or rx.name,
                         checkpoint_dir=str(out / "checkpoint" / run_id) if run_id else None,
                         dataset=str(ds_path), application="anemoi",
                         anemoi_version=version, anemoi_line=line.name)
            if forked:
                state["forked_from"] = forked
            if resumed:
                state.setdefault("resumed", []).append(
                    {"time": datetime.now().astimezone().isoformat(timespec="seconds"),
                     "from": str(last), "mlflow_run_id": mlflow_run_id})
            write_atomic(state_file, json.dumps(state, indent=2) + "\n")
            if uri and mlflow_run_id:
                reporter.label("mlflow", run_label(uri, experiment_id, mlflow_run_id))
        reporter.label("info", f"anemoi run {run_id}" + (f", resumed from {last.name}" if resumed else "")
                       + (f", forked from {forked}" if forked else "")
                       + (f", warm start from {warm['model']} v{warm['version']}" if warm else ""))
        if warm:  # recorded in the new checkpoint's metadata, as anemoi records the parent of a fork
            trainer.metadata.update(warm["metadata"])
        trainer.train()

    pl_trainer = progress.trainer
    global_step = pl_trainer.global_step if pl_trainer is not None else _step_of(out, run_id)
    epochs = pl_trainer.current_epoch if pl_trainer is not None else 0
    checkpoints = sorted(out.rglob("*.ckpt"))
    return TrainingResult(out, run_id, uri, checkpoints, int(global_step), int(epochs))


def _tag_run(logger, rx, training_name: str, site_name: str, mode: str, ds_path: Path,
             resumed: str | None, forked: str | None, anemoi_version: str | None = None) -> None:
    """maelflow's tags and provenance on the MLflow run (best effort: logging must not stop training)."""
    from maelflow.provenance import record
    from maelflow.training.runs import dataset_uuid as _dataset_uuid

    try:
        client, run_id = logger.experiment, logger.run_id
        tags = {"maelflow.experiment": rx.name, "maelflow.site": site_name, "maelflow.training": training_name,
                "maelflow.mode": mode, "maelflow.application": "anemoi", **benchmark_tags()}
        if anemoi_version:
            tags["maelflow.anemoi_version"] = anemoi_version
        if resumed:
            tags["maelflow.resumed_from"] = resumed
        if forked:
            tags["maelflow.forked_from"] = forked
        for key, value in tags.items():
            client.set_tag(run_id, key, value)
        if not resumed:
            prov = record(rx.to_json(), {"training": training_name, "site": site_name,
                                         "datasets": {str(ds_path): _dataset_uuid(ds_path)}})
            client.log_dict(run_id, prov, "provenance.json")
    except Exception as exc:  # noqa: BLE001
        import logging

        logging.getLogger(__name__).warning("could not tag MLflow run: %s", _first_line(exc))


def _step_of(out: Path, run_id: str | None) -> int:
    if not run_id:
        return 0
    last = out / "checkpoint" / run_id / "last.ckpt"
    if not last.exists():
        return 0
    return checkpoint_step(last)


def checkpoint_step(path: Path) -> int:
    """``global_step`` of a Lightning checkpoint, without running the pickle it holds (the run
    folder is the site user's to write): torch's ``weights_only`` load, and where the checkpoint
    holds more than tensors (anemoi keeps its config objects in it), a reading that builds none of
    its objects. 0 when it cannot be read."""
    import torch

    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - UnpicklingError for any object weights_only does not allow
        data = _inert_load(path)
    try:
        return int(data.get("global_step", 0)) if isinstance(data, dict) else 0
    except (TypeError, ValueError):
        return 0


class _Inert:
    """Whatever a checkpoint's pickle names (a class, a function): built as nothing, called as nothing."""

    def __new__(cls, *args, **kwargs) -> "_Inert":
        return object.__new__(cls)

    def __init__(self, *args, **kwargs) -> None:
        pass

    def __call__(self, *args, **kwargs) -> "_Inert":
        return _Inert()

    def __setstate__(self, state) -> None:
        pass

    def __setitem__(self, key, value) -> None:
        pass

    def append(self, value) -> None:
        pass

    def extend(self, values) -> None:
        pass


def _inert_load(path: Path) -> object:
    """The checkpoint's top-level dict with every object that is not a plain value replaced by an
    inert stand-in: no class of the pickle is imported, none of its code runs, no tensor is read."""
    import pickle
    import zipfile

    class Unpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str):
            return _Inert

        def persistent_load(self, pid):
            return None

    try:
        with zipfile.ZipFile(path) as zf:
            name = next(n for n in zf.namelist() if n.endswith("/data.pkl") or n == "data.pkl")
            with zf.open(name) as fh:
                return Unpickler(fh).load()
    except Exception:  # noqa: BLE001 - not a torch zip checkpoint, or damaged
        return None

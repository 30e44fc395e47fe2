"""The configuration schema: sites, datasets, trainings and experiments.

These models are the spec, the validator and the reference documentation at once: every field's
description feeds both the error messages of ``maelflow validate`` and docs/configuration.md.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from maelflow.config.slurmtime import parse_slurm_time  # also read as models.parse_slurm_time

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def check_name(value: str) -> str:
    if not NAME_RE.match(value):
        raise ValueError("must start with a letter or digit and contain only letters, digits, '-', '_' and '.'")
    return value


class Strict(BaseModel):
    """Unknown keys are errors: a typo in a config must never be silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# ---------------------------------------------------------------------------------------- sites
class SshSettings(Strict):
    host: str = Field(description="Login node host name (or an alias from ssh_config).")
    port: int = Field(22, ge=1, le=65535, description="SSH port of the login node.")
    user: str | None = Field(None, description="Remote user name; None takes it from ssh_config or $USER.")
    auth: Literal["key", "agent", "certificate", "2fa"] = Field(
        "key", description="How the site authenticates: a key file, an SSH agent, a short-lived SSH "
        "certificate, or 2FA (reuse of a live multiplexed session).")
    identity_file: str | None = Field(None, description="Private key file for auth key/certificate.")
    certificate_file: str | None = Field(None, description="SSH certificate (…-cert.pub) for auth certificate.")
    known_hosts: str | None = Field(None, description="known_hosts file pinning the login node's host key.")
    proxy_jump: str | None = Field(None, description="Jump host, as in ssh -J.")
    connect_timeout: float = Field(10.0, gt=0, le=120, description="Seconds to wait for the SSH handshake.")
    renew_hint: str = Field(
        "renew your SSH credential for this site and retry",
        description="What to tell an operator when the credential is missing or expired.")


class Connection(Strict):
    type: Literal["local", "ssh"] = Field(description="local: this machine; ssh: a login node over SSH.")
    ssh: SshSettings | None = Field(None, description="SSH settings, required when type is ssh.")

    @model_validator(mode="after")
    def _ssh_needed(self) -> "Connection":
        if self.type == "ssh" and self.ssh is None:
            raise ValueError("connection type ssh needs an 'ssh' section with at least 'host'")
        return self


class SlurmSettings(Strict):
    partition: str | None = Field(None, description="Default partition (queue) for jobs.")
    gpu_partition: str | None = Field(None, description="Partition for GPU jobs, if different.")
    account: str | None = Field(None, description="Project account charged (--account).")
    qos: str | None = Field(None, description="Quality of service (--qos).")
    max_time: str = Field("24:00:00", description="Longest time limit the partition allows.")
    gpu_directive: Literal["gpus-per-node", "gres"] = Field(
        "gpus-per-node", description="How GPUs are requested: --gpus-per-node=N or --gres=gpu:N.")
    extra_directives: list[str] = Field(default_factory=list,
                                        description="More #SBATCH options, e.g. '--exclusive'.")

    @field_validator("max_time", mode="before")
    @classmethod
    def _time(cls, v: object) -> str:
        if isinstance(v, int) and not isinstance(v, bool):
            v = f"{v // 60:02d}:{v % 60:02d}:00"  # SLURM reads a bare number as minutes
        if not isinstance(v, str):
            raise ValueError("must be a SLURM time limit such as 01:30:00 or 2-00:00:00")
        parse_slurm_time(v)
        return v


class Gpus(Strict):
    vendor: Literal["nvidia", "amd", "intel", "none"] = Field("none", description="GPU vendor.")
    model: str | None = Field(None, description="GPU model, for the record (e.g. A100-64GB, MI250X).")
    per_node: int = Field(0, ge=0, le=64, description="GPUs (or GCDs) per compute node.")


class Internet(Strict):
    login: bool = Field(True, description="Whether login nodes reach the internet (and the EWC).")
    compute: bool = Field(False, description="Whether compute nodes reach the internet (MLflow, ecFlow).")


class SitePaths(Strict):
    root: str = Field(description="Site folder for maelflow's job files, logs and spool (shared filesystem).")
    datasets: str = Field(description="Where staged datasets live on the site.")
    outputs: str = Field(description="Where training outputs and checkpoints go.")


class SiteLimits(Strict):
    jobs: int = Field(4, ge=1, le=10000, description="Suite tasks of one experiment running at once on this site.")
    transfers: int = Field(2, ge=1, le=1000, description="Dataset transfers running at once to this site.")


class Container(Strict):
    """A container the site's task and training commands run in: the centre's PyTorch image, with the
    site part's virtual environment on the shared filesystem (docs/sites.md)."""

    image: str = Field(description="The image: a .sif file for apptainer/singularity; for bwrap the folder "
                       "mounted read-only as the container's root ('/' shares the node's own).")
    runtime: Literal["apptainer", "singularity", "bwrap"] = Field(
        "apptainer", description="What runs it: apptainer or singularity (`exec`, --nv/--rocm from gpus.vendor), "
        "or bwrap (bubblewrap: a sandbox without images, for trying a container prefix where there is none).")
    binds: list[str] = Field(default_factory=list, description="More folders visible read-write inside, 'SRC' or "
                             "'SRC:DST'; the site's paths (root, datasets, outputs) are always bound.")
    options: list[str] = Field(default_factory=list, description="More options of the runtime, e.g. --cleanenv.")


class Accelerator(Strict):
    """What the site part is built for, and the environment every job of the site gets."""

    arch: Literal["x86_64", "aarch64"] = Field("x86_64", description="CPU architecture of the login and compute "
                                               "nodes: `site setup` gathers wheels for it.")
    torch_variant: str = Field("cpu", pattern=r"^(cpu|cu\d+|rocm\d+(\.\d+)*|xpu)$",
                               description="The torch build `site setup` installs: cpu, cuNNN (CUDA) or rocmX.Y "
                               "(ROCm), the local version tag of its wheels (torch 2.13.0+rocm6.4).")
    torch_index: str | None = Field(None, description="Package index holding that build, e.g. "
                                    "https://download.pytorch.org/whl/rocm6.4; default: pip's own configuration.")
    environment: dict[str, str] = Field(default_factory=dict, description="Variables exported at the start of "
                                        "every job of the site (NCCL/RCCL, MIOpen cache ...); the job's shell "
                                        "expands $VARIABLES in them.")


class SiteInstall(Strict):
    """Where and what `maelflow site setup` installs on the site (no root needed)."""

    venv: str | None = Field(None, description="The site part's virtual environment; default <paths.root>/venv "
                             "(maelflow_command is then <venv>/bin/maelflow).")
    fallback_command: str | None = Field(
        None, description="The maelflow jobs run while `maelflow site setup` has not installed the site part "
        "(with maelflow_command unset); unset: none, check and deploy ask for the setup. The loopback site "
        "names this machine's own installation, so its demo needs no setup.")
    python: str = Field("python3", description="The interpreter the environment is made with, after the "
                        "environment lines (a module's python, or the container's).")
    packages: list[str] = Field(default_factory=list, description="More distributions in the site part, pinned "
                                "like the rest (a scheduler or connection plugin); one installed here from a "
                                "source checkout is built into a wheel from it, like maelflow's own.")
    startup: list[str] = Field(default_factory=list, description="Modules every Python of the site part imports "
                               "at its start (a .pth file): the loopback site's torchvision shim for CPU torch.")
    parts: list[Literal["core", "train", "anemoi"]] = Field(
        default_factory=lambda: ["core", "train", "anemoi"],
        description="What the site part holds: core (job entry points, reporting, stage), train (torch, "
        "Lightning, MLflow's client), anemoi (anemoi-training and its models, graphs, datasets).")


    @field_validator("startup")
    @classmethod
    def _modules(cls, v: list[str]) -> list[str]:
        bad = [m for m in v if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$", m)]
        if bad:
            raise ValueError(f"{bad[0]!r} is not a module name")
        return v


class Site(Strict):
    name: str = Field(description="Site name, used for its ecFlow family.")
    description: str = Field("", description="What and where the machine is.")
    scheduler: str = Field(
        description="How jobs start on the site: a scheduler of the 'maelflow.schedulers' entry points "
        "(local: plain background processes; slurm: sbatch; a package may add more, see docs/extending.md).")
    connection: Connection = Field(description="How maelflow reaches the site.")
    reporting: Literal["direct", "relay"] = Field(
        "direct", description="direct: jobs call the ecFlow server; relay: jobs write to a spool on the "
        "shared filesystem and maelflow replays it over SSH (compute nodes that cannot reach the server).")
    slurm: SlurmSettings | None = Field(None, description="SLURM settings, required when scheduler is slurm.")
    gpus: Gpus = Field(default_factory=Gpus, description="GPUs of one compute node.")
    cpus_per_node: int = Field(1, ge=1, le=4096, description="CPU cores of one compute node.")
    internet: Internet = Field(default_factory=Internet, description="Which nodes reach the internet.")
    paths: SitePaths = Field(description="Folders on the site.")
    limits: SiteLimits = Field(default_factory=SiteLimits, description="Concurrency limits on the site.")
    environment: list[str] = Field(default_factory=list,
                                   description="Shell lines run at the start of every job (module load ...).")
    maelflow_command: str | None = Field(
        None, description="How jobs call maelflow on the site. Unset: the site part `maelflow site setup` "
        "installs, <install.venv>/bin/maelflow (before the setup, install.fallback_command if set); set it only "
        "for a maelflow installed otherwise.")
    anemoi_version: str | None = Field(
        None, pattern=r"^\d+\.\d+(\.\d+)?$",
        description="The anemoi-training release installed on the site (e.g. 0.17.1): anemoi trainings are "
        "validated against that release's configuration keys. Unset: the installed package for a local "
        "site, no key check for a remote one (docs/training.md, anemoi versions).")
    container: Container | None = Field(None, description="A container the site's task and training commands "
                                        "run in (apptainer/singularity image); none: the login shell's environment.")
    accelerator: Accelerator = Field(default_factory=Accelerator,
                                     description="CPU architecture, torch build and job environment of the nodes.")
    install: SiteInstall = Field(default_factory=SiteInstall,
                                 description="The site part `maelflow site setup` installs (docs/sites.md).")

    _check_name = field_validator("name")(classmethod(lambda cls, v: check_name(v)))

    @field_validator("scheduler")
    @classmethod
    def _scheduler(cls, v: str) -> str:
        from maelflow import plugins

        # a lookup among maelflow's own entry points first: every job submission validates this
        if plugins.find(plugins.SCHEDULERS, v) is None:
            names = plugins.names(plugins.SCHEDULERS)
            raise ValueError(f"no scheduler {v!r} is installed (known: {', '.join(names) or 'none'}); a package "
                             "adds one through the 'maelflow.schedulers' entry points")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "Site":
        if self.scheduler == "slurm" and self.slurm is None:
            raise ValueError("scheduler slurm needs a 'slurm' section")
        if self.gpus.vendor == "none" and self.gpus.per_node:
            raise ValueError("gpus.per_node is set but gpus.vendor is 'none'")
        return self


# ------------------------------------------------------------------------------------- datasets
class Dataset(Strict):
    name: str = Field(description="Dataset name (anemoi naming convention), its identity in the catalogue.")
    description: str = Field("", description="What the dataset holds.")
    source: str | None = Field(None, description="Path of the ML-ready zarr where it is built (published from).")
    recipe: str | None = Field(None, description="anemoi-datasets recipe that creates the zarr at 'source' (a path, "
                                                 "relative to the config root), if the suite builds it.")
    s3_prefix: str | None = Field(None, description="Key prefix in the EWC bucket; default datasets/<name>.zarr.")
    generator: str | None = Field(None, description="'package.module:function' that writes the zarr at 'source' "
                                  "(a seeded synthetic dataset, e.g. maelflow.apps.ap1_data:generate), if the "
                                  "suite builds it that way instead of from a 'recipe'.")
    generator_options: dict[str, Any] = Field(default_factory=dict,
                                              description="Keyword arguments of the 'generator' (seed, sizes).")

    _check_name = field_validator("name")(classmethod(lambda cls, v: check_name(v)))

    @field_validator("generator")
    @classmethod
    def _generator(cls, v: str | None) -> str | None:
        if v is None or re.match(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$", v):
            return v
        raise ValueError("must be an import path 'package.module:function'")

    @model_validator(mode="after")
    def _origin(self) -> "Dataset":
        if not self.source:
            raise ValueError("a dataset needs a 'source': the zarr it is published from (built there by "
                             "its 'recipe', if it has one)")
        if self.recipe and self.generator:
            raise ValueError("a dataset is built from a 'recipe' or by a 'generator', not both")
        if self.generator_options and not self.generator:
            raise ValueError("'generator_options' are given but there is no 'generator'")
        return self

    @property
    def key_prefix(self) -> str:
        return self.s3_prefix or f"datasets/{self.name}.zarr"


# ------------------------------------------------------------------------------------ trainings
class MlflowSettings(Strict):
    mode: Literal["auto", "online", "offline", "off"] = Field(
        "auto", description="online: log to the server; offline: log to files, synced after the job; "
        "auto: online where compute nodes reach the internet, offline elsewhere.")
    experiment: str | None = Field(None, description="MLflow experiment name; default: the experiment's name.")


class TimingConfig(Strict):
    """The timing callback of every training (maelflow.training.timing); the job's environment
    (MAELFLOW_TIMING, MAELFLOW_TIMING_WARMUP, MAELFLOW_TIMING_EVERY, MAELFLOW_ENERGY) wins over it."""

    enabled: bool = Field(True, description="Time epochs, batches, forward/backward, IO, validation, "
                                            "checkpoints and communication, and log them to MLflow.")
    warmup_steps: int = Field(3, ge=0, le=100_000, description="First steps kept apart from the statistics.")
    sample_every: int = Field(10, ge=0, le=1_000_000, description="Log every Nth step's times as MLflow "
                                                                  "samples; 0 logs none (statistics only).")
    energy: bool = Field(True, description="Read the node's energy sources (GPUs, Cray, RAPL, sacct).")


class Training(Strict):
    name: str = Field(description="Training name, used for its ecFlow family and MLflow run name.")
    description: str = Field("", description="What this training is for.")
    application: str = Field(description="'anemoi' for anemoi-training, or 'package.module:Class' of a "
                                         "LightningModule or a LightningCLI-style entry point.")
    datamodule: str | None = Field(None, description="'package.module:Class' of the LightningDataModule "
                                                     "for an application given by import path.")
    datasets: list[str] = Field(default_factory=list, description="Names of the datasets it trains on.")
    nodes: int = Field(1, ge=1, le=4096, description="Compute nodes.")
    gpus_per_node: int = Field(0, ge=0, le=64, description="GPUs per node; 0 trains on CPU.")
    time_limit: str = Field("01:00:00", description="SLURM time limit of one job.")
    max_resubmissions: int = Field(3, ge=0, le=100,
                                   description="How often a job stopped at its time limit is resubmitted.")
    fork_from: str | None = Field(None, description="MLflow run id to fork a new run from.")
    config: dict[str, Any] = Field(default_factory=dict, description="Application configuration.")
    overrides: list[str] = Field(default_factory=list, description="Hydra overrides for anemoi-training.")
    mlflow: MlflowSettings = Field(default_factory=MlflowSettings, description="Experiment tracking.")
    timing: TimingConfig = Field(default_factory=TimingConfig, description="Step timing and energy.")

    _check_name = field_validator("name")(classmethod(lambda cls, v: check_name(v)))

    @field_validator("application")
    @classmethod
    def _application(cls, v: str) -> str:
        if v == "anemoi" or re.match(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$", v):
            return v
        raise ValueError("must be 'anemoi' or an import path 'package.module:Class'")

    @field_validator("time_limit", mode="before")
    @classmethod
    def _time(cls, v: object) -> str:
        return SlurmSettings._time(v)


# ---------------------------------------------------------------------------------- experiments
class Benchmark(Strict):
    """Benchmark mode: the same trainings on every site of the experiment, repeated, then one report."""

    name: str | None = Field(None, description="Benchmark name, tagged on its MLflow runs "
                                               "(maelflow.benchmark); default: the experiment's name.")
    repeats: int = Field(1, ge=1, le=100, description="Runs of each training on each site, one after another, "
                                                      "each its own ecFlow task and MLflow run.")
    trainings: list[str] | None = Field(None, description="Trainings of the experiment to benchmark (they run "
                                        "in the benchmark family instead of the sites' train families); "
                                        "default: all of them.")
    baseline: str | None = Field(None, description="Baseline for the report's regression check: a run id, "
                                 "KEY=VALUE or a name tagged maelflow.baseline=NAME; the report task aborts "
                                 "on a regression.")
    tolerance: float = Field(0.10, ge=0, le=1, description="Throughput may be this fraction below the baseline's.")
    memory_tolerance: float = Field(0.01, ge=0, le=10,
                                    description="Peak memory may be this fraction above the baseline's.")
    cron: str | None = Field(None, description="ecFlow cron of the benchmark family for periodic runs, as in a "
                             "suite definition, e.g. '-m 1,4,7,10 -d 1 03:00' (quarterly); each day's cycle "
                             "starts new runs (their folders and tags carry the suite's date).")

    _check_name = field_validator("name")(classmethod(lambda cls, v: v if v is None else check_name(v)))

    @field_validator("cron")
    @classmethod
    def _cron(cls, v: str | None) -> str | None:
        if v is None:
            return v
        from maelflow.config.ecftime import parse_cron

        try:
            parse_cron(v)
        except ValueError as exc:
            raise ValueError(f"{exc}; e.g. '-m 1,4,7,10 -d 1 03:00' (quarterly)") from None
        return v


# ----------------------------------------------------------------------------- model production
ALIAS_RE = re.compile(r"^[A-Za-z0-9_-]{1,255}$")
DAY_RE = re.compile(r"^\d{4}-?\d{2}-?\d{2}$")


def check_alias(value: str) -> str:
    """A model alias: MLflow's rules, so it mirrors there (letters, digits, '-', '_'; not latest/vN)."""
    if not ALIAS_RE.match(value):
        raise ValueError("must use letters, digits, '-' and '_' (an MLflow alias)")
    if value == "latest" or re.match(r"^[vV]\d+$", value):
        raise ValueError("'latest' and 'v<number>' are reserved by MLflow's model registry")
    return value


class GateRule(Strict):
    """One condition a candidate's evaluation must meet."""

    metric: str = Field(description="A score of the evaluation: nrmse (RMSE over the dataset's standard "
                        "deviation, mean over variables), skill_persistence, skill_climatology (1 - nrmse / "
                        "the reference's), rmse.<variable>, mae.<variable>.")
    min: float | None = Field(None, description="The score must be at least this.")
    max: float | None = Field(None, description="The score must be at most this.")

    @model_validator(mode="after")
    def _bound(self) -> "GateRule":
        if self.min is None and self.max is None:
            raise ValueError(f"gate rule on {self.metric!r} needs 'min' or 'max'")
        return self


class Gate(Strict):
    """What lets a checkpoint become a model version: thresholds, and a margin over the champion."""

    rules: list[GateRule] = Field(default_factory=lambda: [GateRule(metric="skill_persistence", min=0.0)],
                                  description="Conditions on the candidate's scores, all of which must hold.")
    champion_margin: float | None = Field(
        0.0, ge=-1, le=1, description="The candidate's nrmse must be lower than the champion's (the version the "
        "operations alias names) by this fraction (0.01: 1% lower); null: no comparison with the champion.")
    champion_alias: str = Field("production", description="The alias whose version is the champion.")
    champion_metric: str = Field("nrmse", description="The score compared with the champion's (lower is better): "
                                 "nrmse for anemoi models; a loss a Lightning application logs in validation "
                                 "(e.g. val_loss, val_score) for an application's model.")
    alias: str = Field("candidate", description="The alias a passing candidate's new version gets "
                                                "(e.g. candidate, or production directly).")

    _check_alias = field_validator("alias", "champion_alias")(classmethod(lambda cls, v: check_alias(v)))


class ModelEvaluation(Strict):
    samples: int = Field(8, ge=1, le=10000, description="Held-out initial dates scored (spread evenly over the "
                                                        "dataset's test period: the dates after training's).")
    checkpoint: str | None = Field(None, description="The checkpoint file of a training that is evaluated and "
                                   "promoted; default: anemoi's inference-last.ckpt, an application's last.ckpt.")


class DateCycles(Strict):
    """One cycle per date from ``start`` to ``end`` (an ecFlow ``repeat date``)."""

    start: str = Field(description="First cycle date, YYYY-MM-DD (or YYYYMMDD).")
    end: str = Field(description="Last cycle date, YYYY-MM-DD (or YYYYMMDD).")
    every: int = Field(1, ge=1, le=366, description="Days from one cycle to the next (1: daily, 7: weekly); "
                       "the last cycle is the last date on that step not after `end`.")

    @field_validator("start", "end", mode="before")
    @classmethod
    def _day(cls, v: object) -> str:
        import datetime as _dt

        if isinstance(v, (_dt.date, int)):
            v = str(v) if isinstance(v, int) else v.isoformat()
        if not isinstance(v, str) or not DAY_RE.match(v):
            raise ValueError("must be a date YYYY-MM-DD or YYYYMMDD")
        digits = v.replace("-", "")
        try:
            _dt.date(int(digits[:4]), int(digits[4:6]), int(digits[6:]))
        except ValueError as exc:
            raise ValueError(str(exc)) from None
        return f"{digits[:4]}-{digits[4:6]}-{digits[6:]}"

    @model_validator(mode="after")
    def _order(self):
        if self.end < self.start:
            raise ValueError(f"end {self.end} is before start {self.start}")
        return self

    @property
    def ymd_start(self) -> int:
        return int(self.start.replace("-", ""))

    @property
    def ymd_end(self) -> int:
        return int(self.end.replace("-", ""))


class FineTune(DateCycles):
    """Cyclic fine-tuning: one warm-started training per date (an ecFlow repeat date), evaluated and gated."""

    training: str = Field(description="The anemoi training of the experiment each cycle runs (its config: "
                          "steps, learning rate, dataset); it runs only in the cycles, warm-started from the "
                          "champion's weights (training.load_weights_only).")
    from_alias: str | None = Field(None, description="The alias whose version is warm-started from, resolved "
                                   "when each cycle starts; default: the gate's champion_alias.")
    time: int = Field(0, ge=0, le=23, description="Hour (UTC) of each cycle's date: its training data end "
                                                  "before it, its held-out data start at it.")
    window: float | None = Field(None, gt=0, le=3660, description="Days of data before the cycle's date a cycle "
                                 "trains on; null: the data since the end of the champion's own training period "
                                 "(new data only).")
    holdout: float = Field(2.0, gt=0, le=3660, description="Days from the cycle's date on held out for validation "
                           "and the evaluation (never trained on).")
    alias: str | None = Field(None, description="The alias a passing cycle's version gets; default: the gate's "
                              "alias (e.g. candidate, for a parallel run before production).")

    _check_alias = field_validator("from_alias", "alias")(
        classmethod(lambda cls, v: v if v is None else check_alias(v)))


class ModelSpec(Strict):
    """A model of the experiment: the trainings whose checkpoints are evaluated and gated into it."""

    name: str = Field(description="Model name in the catalogue and in MLflow's model registry.")
    description: str = Field("", description="What the model is for.")
    trainings: list[str] = Field(min_length=1, description="Trainings of the experiment whose checkpoint is "
                                 "evaluated and gated into this model, in this order.")
    evaluation: ModelEvaluation = Field(default_factory=ModelEvaluation, description="How candidates are scored.")
    gate: Gate = Field(default_factory=Gate, description="What a candidate must score to become a version.")
    finetune: FineTune | None = Field(None, description="Cyclic fine-tuning from the champion's checkpoint on new "
                                      "data, each cycle evaluated and gated (docs/operations.md).")

    _check_name = field_validator("name")(classmethod(lambda cls, v: check_name(v)))


class Operations(DateCycles):
    """Forecast production: one cycle per date (an ecFlow repeat date), with the version an alias names."""

    model: str = Field(description="The model whose alias makes the forecasts (a name in the catalogue).")
    alias: str = Field("production", description="The alias resolved at the start of each cycle.")
    dataset: str = Field(description="The staged dataset the initial conditions come from.")
    site: str | None = Field(None, description="The site the forecasts run on; default: the experiment's first.")
    time: int = Field(0, ge=0, le=23, description="Hour (UTC) of each cycle's initial time.")
    lead_time: int = Field(12, ge=1, le=24 * 366, description="Forecast length in hours.")
    output: Literal["netcdf", "zarr"] = Field("netcdf", description="Output format of anemoi-inference.")
    late: str | None = Field(None, description="ecFlow late flag of each cycle's forecast task, as in a .def "
                             "(e.g. '-s +00:15 -c +02:00'): only sets a flag operators see.")
    prefix: str = Field("forecasts", description="Key prefix of published forecasts in the EWC bucket.")

    _check_alias = field_validator("alias")(classmethod(lambda cls, v: check_alias(v)))

    @field_validator("late")
    @classmethod
    def _late(cls, v: str | None) -> str | None:
        if v is not None:
            from maelflow.config.ecftime import parse_late

            parse_late(v)  # a ValueError saying what is wrong
        return v


class Experiment(Strict):
    name: str = Field(description="Experiment name; the ecFlow suite is named after it.")
    description: str = Field("", description="What the experiment is for.")
    owner: str | None = Field(None, description="Who is responsible for it.")
    sites: list[str] = Field(min_length=1, description="Names of the sites it runs on (configs/sites/).")
    datasets: list[str] = Field(default_factory=list, description="Names of its datasets (configs/datasets/).")
    trainings: list[str] = Field(default_factory=list, description="Names of its trainings (configs/trainings/).")
    services: str | None = Field(None, description="Services profile it runs against (configs/services/NAME.yaml "
                                 "or a path): ecFlow, S3, MLflow and the catalogue embedded or external; "
                                 "checked by validate; deploy needs it in force in the workspace "
                                 "('maelflow services use NAME').")
    benchmark: Benchmark | None = Field(None, description="Benchmark mode: repeats of the trainings on every "
                                                          "site and a report task (docs/training.md).")
    models: list[ModelSpec] = Field(default_factory=list, description="Models its trainings are evaluated and "
                                    "gated into (docs/operations.md).")
    operations: Operations | None = Field(None, description="Forecast production with a model's alias, one cycle "
                                          "per date (docs/operations.md).")

    _check_name = field_validator("name")(classmethod(lambda cls, v: check_name(v)))

    @model_validator(mode="after")
    def _benchmark(self) -> "Experiment":
        if self.benchmark is not None:
            unknown = [t for t in self.benchmark.trainings or [] if t not in self.trainings]
            if unknown:
                raise ValueError(f"benchmark.trainings names trainings the experiment lacks: {', '.join(unknown)}")
            if not self.benchmark_trainings:
                raise ValueError("benchmark mode needs at least one training")
        return self

    @model_validator(mode="after")
    def _models(self) -> "Experiment":
        names = [m.name for m in self.models]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"models listed more than once: {', '.join(dup)}")
        gated: dict[str, str] = {}
        for m in self.models:
            for t in m.trainings:
                if t not in self.trainings:
                    raise ValueError(f"model {m.name!r} names training {t!r}, which the experiment lacks")
                if t in self.benchmark_trainings:
                    raise ValueError(f"model {m.name!r}: training {t!r} is benchmarked, not trained to be gated")
                if t in gated:
                    raise ValueError(f"training {t!r} is gated into two models ({gated[t]!r} and {m.name!r})")
                gated[t] = m.name
        for m in self.models:
            ft = m.finetune
            if ft is None:
                continue
            if ft.training not in self.trainings:
                raise ValueError(f"model {m.name!r}: finetune.training {ft.training!r} is not among the "
                                 "experiment's trainings")
            if ft.training in gated or ft.training in self.benchmark_trainings:
                raise ValueError(f"model {m.name!r}: finetune.training {ft.training!r} is also gated or benchmarked; "
                                 "a fine-tuning training runs only in its cycles")
            gated[ft.training] = m.name
        ops = self.operations
        if ops is not None:
            if ops.dataset not in self.datasets:
                raise ValueError(f"operations.dataset {ops.dataset!r} is not among the experiment's datasets")
            if ops.site is not None and ops.site not in self.sites:
                raise ValueError(f"operations.site {ops.site!r} is not among the experiment's sites")
        return self

    @property
    def operations_site(self) -> str | None:
        if self.operations is None:
            return None
        return self.operations.site or self.sites[0]

    @property
    def finetune_trainings(self) -> list[str]:
        """Trainings that run only in a model's fine-tuning cycles (not in the site's train family)."""
        return [m.finetune.training for m in self.models if m.finetune is not None]

    @property
    def regular_trainings(self) -> list[str]:
        """The trainings of the site's train family: neither benchmark repeats nor fine-tuning cycles."""
        elsewhere = set(self.benchmark_trainings) | set(self.finetune_trainings)
        return [t for t in self.trainings if t not in elsewhere]

    @property
    def benchmark_trainings(self) -> list[str]:
        if self.benchmark is None:
            return []
        return list(self.benchmark.trainings) if self.benchmark.trainings is not None else list(self.trainings)

    @field_validator("sites", "datasets", "trainings")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        dup = sorted({x for x in v if v.count(x) > 1})
        if dup:
            raise ValueError(f"listed more than once: {', '.join(dup)}")
        return v

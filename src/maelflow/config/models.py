"""The configuration schema: sites, datasets, trainings and experiments.

These models are the spec, the validator and the reference documentation at once: every field's
description feeds both the error messages of ``maelflow validate`` and docs/configuration.md.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
TIME_RE = re.compile(r"^(?:(\d+)-)?(\d{1,3}):([0-5]\d)(?::([0-5]\d))?$")


def check_name(value: str) -> str:
    if not NAME_RE.match(value):
        raise ValueError("must start with a letter or digit and contain only letters, digits, '-', '_' and '.'")
    return value


def parse_slurm_time(value: str) -> int:
    """Seconds in a SLURM time limit written [D-]HH:MM[:SS]."""
    m = TIME_RE.match(value.strip())
    if not m:
        raise ValueError("must be a SLURM time limit such as 01:30:00 or 2-00:00:00")
    days, hours, minutes, seconds = (int(g) if g else 0 for g in m.groups())
    return ((days * 24 + hours) * 60 + minutes) * 60 + seconds


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
    maelflow_command: str = Field("maelflow", description="How jobs call maelflow on the site.")

    _check_name = field_validator("name")(classmethod(lambda cls, v: check_name(v)))

    @field_validator("scheduler")
    @classmethod
    def _scheduler(cls, v: str) -> str:
        from maelflow.sites.schedulers import known

        names = known()
        if v not in names:
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

    _check_name = field_validator("name")(classmethod(lambda cls, v: check_name(v)))

    @model_validator(mode="after")
    def _origin(self) -> "Dataset":
        if not self.source:
            raise ValueError("a dataset needs a 'source': the zarr it is published from (built there by "
                             "its 'recipe', if it has one)")
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
        from maelflow.suite.builder import parse_cron

        try:
            parse_cron(v)
        except ValueError as exc:
            raise ValueError(f"{exc}; e.g. '-m 1,4,7,10 -d 1 03:00' (quarterly)") from None
        return v


class Experiment(Strict):
    name: str = Field(description="Experiment name; the ecFlow suite is named after it.")
    description: str = Field("", description="What the experiment is for.")
    owner: str | None = Field(None, description="Who is responsible for it.")
    sites: list[str] = Field(min_length=1, description="Names of the sites it runs on (configs/sites/).")
    datasets: list[str] = Field(default_factory=list, description="Names of its datasets (configs/datasets/).")
    trainings: list[str] = Field(default_factory=list, description="Names of its trainings (configs/trainings/).")
    benchmark: Benchmark | None = Field(None, description="Benchmark mode: repeats of the trainings on every "
                                                          "site and a report task (docs/training.md).")

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

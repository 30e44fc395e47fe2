"""Where a training's time goes, recorded by every maelflow training into its MLflow run.

Why: comparing sites (is LUMI or Leonardo better for this model?) and catching a change that slowed
a model down both need the same few numbers from every run, not a separate profiling command. This
Lightning callback, on by default in both launchers (anemoi-training and Lightning-by-import-path),
times the categories of MAELSTROM's benchmarks (D2.6) per training step:

========================  =====================================================================
``batch``                 ``on_train_batch_start`` to ``on_train_batch_end``: one training step
``forward``               step start to the first of ``on_before_zero_grad``/``on_before_backward``
``backward``              ``on_before_backward`` to ``on_after_backward``
``optimizer``             ``on_before_optimizer_step`` to the step's end (clipping + update)
``data_loading``          waiting for the batch: from the fetch of the next batch (Lightning's
                          fetcher hook) to the step's start, host-to-device copy included; the
                          first step of an epoch counts from the epoch's start (iterator and
                          worker start-up)
``communication``         with DDP and more than one process: the window from the first bucket's
                          all-reduce (a DDP comm hook around the default one) to the last one's
                          completion, which overlaps the backward pass
``epoch``                 ``on_train_epoch_start`` to ``on_train_epoch_end`` (validation at the
                          epoch's end included)
``validation``            one validation run inside the fit (the sanity check is not counted)
``checkpoint``            one checkpoint save (``ModelCheckpoint._save_checkpoint``, anemoi's
                          inference checkpoint included, or ``trainer.save_checkpoint``)
========================  =====================================================================

The clock is ``time.perf_counter_ns``; on a GPU, CUDA (or HIP) events are recorded beside it from a
pool and read lazily at the end of each epoch, so no step waits for the device (``gpu_batch``,
``gpu_forward``, ``gpu_backward``, ``gpu_optimizer``, ``gpu_communication``). The first
``warmup_steps`` steps (3 by default) are kept apart and left out of the statistics.

Logged to the run's MLflow (by global rank 0, never raising: timing must not end a training):

- per step, every ``sample_every`` steps (10): ``timing/step/batch_s``, ``timing/step/data_loading_s``
  (buffered, sent in batches at epoch ends: an offline file store costs some 40 µs a point), and
  ``timing/step/epoch_s`` per epoch; every step's batch and data-loading time goes into the
  artifact at the end (``steps`` in ``maelflow/timing.json``, µs; thinned evenly beyond 100 000);
- at the end, per category: ``timing/<category>/{count,total,min,median,mean,p95,max,stdev}`` in
  seconds; ``timing/samples_per_s`` (all processes: this one's samples times the world size, over
  the step time including data loading), ``timing/steps_per_s``, ``timing/data_loading_share``
  (data loading / (data loading + batch)), ``timing/time_to_train_s``, ``timing/warmup_steps``,
  ``timing/warmup_s``; ``memory/peak_rss_bytes`` and, on a GPU, ``memory/peak_gpu_bytes``;
- energy (:mod:`maelflow.training.energy`): ``energy/*`` metrics and the ``energy_quality``,
  ``energy_method``, ``energy_scope``, ``energy_reason`` tags;
- the tag ``maelflow.timing`` and the artifact ``maelflow/timing.json`` (statistics, settings, notes,
  energy sources).

Settings, from the job's environment: ``MAELFLOW_TIMING=0`` turns it off,
``MAELFLOW_TIMING_WARMUP`` (steps, 3), ``MAELFLOW_TIMING_EVERY`` (per-step metric interval, 10;
0 sends none), ``MAELFLOW_ENERGY=0`` skips the energy sources, ``MAELFLOW_ENERGY_ROOT`` reads sysfs
under another root. A resumed job starts its statistics afresh: the run's latest values describe
its latest start.
"""

from __future__ import annotations

import functools
import logging
import os
import resource
import time
from array import array
from dataclasses import dataclass
from typing import Any, Callable, Mapping, MutableMapping, Sequence

import pytorch_lightning as pl

log = logging.getLogger(__name__)

STEP_CATEGORIES = ("batch", "forward", "backward", "optimizer", "data_loading", "communication")
OTHER_CATEGORIES = ("epoch", "validation", "checkpoint")
CATEGORIES = STEP_CATEGORIES + OTHER_CATEGORIES
GPU_CATEGORIES = ("gpu_batch", "gpu_forward", "gpu_backward", "gpu_optimizer", "gpu_communication")
STATS = ("count", "total", "min", "median", "mean", "p95", "max", "stdev")
MAX_PENDING_SAMPLES = 1000   # per-step samples sent at the latest every this many steps
MAX_ARTIFACT_STEPS = 100_000  # steps kept in timing.json (evenly thinned beyond)
NS = 1e-9


def describe(values: Sequence[float]) -> dict[str, float]:
    """count, total, min, median, mean, p95 (linear interpolation), max and sample stdev."""
    import numpy as np

    a = np.asarray(values, dtype=float)
    n = int(a.size)
    if n == 0:
        return {"count": 0}
    return {"count": n, "total": float(a.sum()), "min": float(a.min()), "median": float(np.median(a)),
            "mean": float(a.mean()), "p95": float(np.percentile(a, 95)), "max": float(a.max()),
            "stdev": float(a.std(ddof=1)) if n > 1 else 0.0}


@dataclass
class TimingSettings:
    enabled: bool = True
    warmup_steps: int = 3
    sample_every: int = 10
    energy: bool = True

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "TimingSettings":
        env = os.environ if env is None else env

        def flag(name: str) -> bool:
            return env.get(name, "1").strip().lower() not in ("0", "false", "no", "off")

        def number(name: str, default: int) -> int:
            try:
                return max(int(env.get(name, default)), 0)
            except ValueError:
                log.warning("%s=%r is not a whole number: using %d", name, env.get(name), default)
                return default

        return cls(enabled=flag("MAELFLOW_TIMING"), warmup_steps=number("MAELFLOW_TIMING_WARMUP", 3),
                   sample_every=number("MAELFLOW_TIMING_EVERY", 10), energy=flag("MAELFLOW_ENERGY"))


ENV_OF_CONFIG = {"enabled": "MAELFLOW_TIMING", "warmup_steps": "MAELFLOW_TIMING_WARMUP",
                 "sample_every": "MAELFLOW_TIMING_EVERY", "energy": "MAELFLOW_ENERGY"}


def apply_timing_config(config: Any, env: MutableMapping[str, str] | None = None) -> None:
    """A training's ``timing:`` block into the job's environment, where the callbacks (ours, and
    those anemoi-training builds) read it; a variable the job already has is left as it is, so an
    operator can switch timing off for one job without editing the experiment."""
    env = os.environ if env is None else env
    for field_name, var in ENV_OF_CONFIG.items():
        value = getattr(config, field_name)
        env.setdefault(var, ("1" if value else "0") if isinstance(value, bool) else str(value))


def timing_callbacks(settings: TimingSettings | None = None) -> list[pl.Callback]:
    """What a launcher adds to its Trainer's callbacks: the timing callback, unless switched off."""
    settings = settings or TimingSettings.from_env()
    if not settings.enabled:
        return []
    return [TimingCallback(warmup_steps=settings.warmup_steps, sample_every=settings.sample_every,
                           energy=settings.energy)]


# ------------------------------------------------------------------------------------ MLflow
class MlflowSink:
    """The run of the trainer's MLflow logger, written with the client's batched calls. Best effort:
    a failure is logged once per kind of write and never raised."""

    def __init__(self, client: Any, run_id: str):
        self.client, self.run_id = client, run_id
        self._failing: set[str] = set()

    @classmethod
    def of(cls, trainer: pl.Trainer) -> "MlflowSink | None":
        for logger in trainer.loggers:
            run_id = getattr(logger, "run_id", None)
            if run_id is None or not hasattr(logger, "experiment"):
                continue
            try:
                client = logger.experiment
            except Exception as exc:  # noqa: BLE001
                log.warning("timing: no MLflow client: %s", exc)
                continue
            if hasattr(client, "log_batch"):
                return cls(client, str(run_id))
        return None

    def _guard(self, kind: str, fn: Callable[[], Any]) -> None:
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - timing must not end a training
            if kind not in self._failing:
                self._failing.add(kind)
                log.warning("timing: MLflow %s not written: %s: %s", kind, type(exc).__name__, exc)
            return
        self._failing.discard(kind)

    def metrics(self, points: Sequence[tuple[str, float, int]]) -> None:
        """(key, value, step) points, 1000 per request (MLflow's limit)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(key, float(value), now, int(step)) for key, value, step in points]
        for i in range(0, len(metrics), 1000):
            chunk = metrics[i:i + 1000]
            self._guard("metrics", lambda: self.client.log_batch(self.run_id, metrics=chunk))

    def tags(self, tags: Mapping[str, str]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, str(v)) for k, v in tags.items()]
        for i in range(0, len(items), 100):
            chunk = items[i:i + 100]
            self._guard("tags", lambda: self.client.log_batch(self.run_id, tags=chunk))

    def artifact(self, data: dict, path: str) -> None:
        self._guard("artifact", lambda: self.client.log_dict(self.run_id, data, path))


# ------------------------------------------------------------------------------- GPU events
class EventTimer:
    """CUDA/HIP events at the step's marks, from a pool, read when the device has passed them.

    Marks: 0 step start, 1 forward end, 2 backward start, 3 backward end, 4 optimizer start, 5 step
    end, 6 first all-reduce, 7 last all-reduce done. ``collect(block=False)`` reads only steps whose
    last event has completed (``query``); ``collect()`` at an epoch's end waits for the last one.
    """

    SLOTS = 8

    def __init__(self, new_event: Callable[[], Any], max_pending: int = 256):
        self._new = new_event
        self._pool: list[Any] = []
        self._cur: list[Any] = [None] * self.SLOTS
        self._pending: list[tuple[bool, list[Any]]] = []
        self.max_pending = max_pending
        self.samples: dict[str, array] = {c: array("d") for c in GPU_CATEGORIES}
        self.warm: dict[str, array] = {c: array("d") for c in GPU_CATEGORIES}

    def mark(self, slot: int) -> None:
        ev = self._pool.pop() if self._pool else self._new()
        ev.record()
        old = self._cur[slot]
        if old is not None:
            self._pool.append(old)
        self._cur[slot] = ev

    def end_step(self, warm: bool) -> None:
        self._pending.append((warm, self._cur))
        self._cur = [None] * self.SLOTS
        if len(self._pending) > self.max_pending:
            self.collect(block=False)

    def collect(self, block: bool = True) -> None:
        done = 0
        for warm, evs in self._pending:
            last = evs[5]
            if last is None:
                done += 1
                continue
            if block:
                last.synchronize()
            elif not last.query():
                break
            dst = self.warm if warm else self.samples
            for cat, a, b in (("gpu_batch", 0, 5), ("gpu_forward", 0, 1), ("gpu_backward", 2, 3),
                              ("gpu_optimizer", 4, 5), ("gpu_communication", 6, 7)):
                if evs[a] is not None and evs[b] is not None:
                    dst[cat].append(evs[a].elapsed_time(evs[b]) / 1000.0)   # ms -> s
            self._pool.extend(e for e in evs if e is not None)
            done += 1
        del self._pending[:done]


def _cuda_event() -> Any:
    import torch

    return torch.cuda.Event(enable_timing=True)


def _batch_size(batch: Any) -> int:
    for _ in range(4):
        shape = getattr(batch, "shape", None)
        if shape is not None:
            return int(shape[0]) if len(shape) else 1
        if isinstance(batch, (list, tuple)) and batch:
            batch = batch[0]
        elif isinstance(batch, dict) and batch:
            batch = next(iter(batch.values()))
        else:
            break
    return 1


def peak_rss_bytes() -> int:
    """The process's peak resident set size (Linux reports KiB)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


# -------------------------------------------------------------------------------- callback
class TimingCallback(pl.Callback):
    """Times every training step by category; see the module's docstring for what each one covers."""

    def __init__(self, warmup_steps: int = 3, sample_every: int = 10, energy: Any = True,
                 clock: Callable[[], int] = time.perf_counter_ns, new_event: Callable[[], Any] | None = None,
                 sink_factory: Callable[[pl.Trainer], MlflowSink | None] = MlflowSink.of):
        """``energy``: True for an :class:`~maelflow.training.energy.EnergyMeter` of this node, False
        for none, or a meter. ``new_event``: the GPU event factory (CUDA's when the module is on a
        GPU); tests pass fakes for it, the clock and the sink."""
        self.warmup_steps = max(int(warmup_steps), 0)
        self.sample_every = max(int(sample_every), 0)
        self.energy = energy
        self.clock = clock
        self._new_event = new_event
        self._sink_factory = sink_factory
        self.samples: dict[str, array] = {c: array("q") for c in CATEGORIES}
        self.warm: dict[str, array] = {c: array("q") for c in CATEGORIES}
        self.summary: dict[str, Any] = {}
        self.notes: list[str] = []
        self.gpu: EventTimer | None = None
        self.sink: MlflowSink | None = None
        self.meter: Any = None
        self.steps = 0
        self.n_samples = 0
        self._restore: list[Callable[[], None]] = []
        self._pending: list[tuple[int, int, int]] = []   # (step, batch ns, data loading ns)
        self._epochs: list[tuple[int, int]] = []          # (epoch, ns)
        self._finished = False
        self._first = True
        self._t_train = self._t_epoch = self._ref = self._fetch0 = self._data = 0
        self._t0 = self._tf = self._tb0 = self._tb1 = self._to = self._tv = 0
        self._c0 = self._c1 = 0
        self._ckpt_depth = 0
        self._bs = 1
        self._step0 = 0
        self._world = 1
        self._device: Any = None

    # -- set-up ---------------------------------------------------------------------------------
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._t_train = self.clock()
        self._finished = False
        self._step0 = int(trainer.global_step)
        self._world = max(int(trainer.world_size), 1)
        if trainer.is_global_zero:
            self.sink = self._sink_factory(trainer)
        for install in (self._hook_fetcher, self._hook_checkpoints, self._hook_communication):
            try:
                install(trainer)
            except Exception as exc:  # noqa: BLE001 - a Lightning without the private hook: fall back
                self.notes.append(f"{install.__name__.lstrip('_')}: {type(exc).__name__}: {exc}")
        device = getattr(pl_module, "device", None)
        if (device is not None and device.type == "cuda") or self._new_event is not None:
            self._device = device
            self.gpu = EventTimer(self._new_event or _cuda_event)
            if device is not None and device.type == "cuda":
                import torch

                torch.cuda.reset_peak_memory_stats(device)
        if trainer.is_global_zero and self.energy:
            try:
                if self.energy is True:
                    from maelflow.training.energy import EnergyMeter

                    self.meter = EnergyMeter()
                else:
                    self.meter = self.energy
                self.meter.start()
            except Exception as exc:  # noqa: BLE001
                self.notes.append(f"energy: {type(exc).__name__}: {exc}")
                self.meter = None
        if self.sink is not None:
            tags = {"maelflow.timing": "on", "timing.clock": "perf_counter_ns" + ("+gpu_events" if self.gpu else ""),
                    "timing.warmup_steps": str(self.warmup_steps), "timing.world_size": str(self._world)}
            job = os.environ.get("SLURM_JOB_ID")
            if job:
                tags["maelflow.slurm_job_id"] = job
            self.sink.tags(tags)

    def _hook_fetcher(self, trainer: pl.Trainer) -> None:
        """Lightning's training loop calls its ``_on_before_fetch`` before each ``next()`` on the
        dataloader: note the first such call after a step."""
        loop = trainer.fit_loop.epoch_loop
        before = loop._on_before_fetch

        def on_before_fetch() -> None:
            if not self._fetch0:
                self._fetch0 = self.clock()
            before()

        self._patch(loop, "_on_before_fetch", on_before_fetch)

    def _patch(self, obj: Any, name: str, value: Any) -> None:
        """Set ``obj.name`` for this fit; teardown gives back what was there (the class's method)."""
        own = vars(obj)
        had, old = name in own, own.get(name)
        setattr(obj, name, value)
        self._restore.append(lambda: setattr(obj, name, old) if had else vars(obj).pop(name, None))

    def _timed_save(self, fn: Callable) -> Callable:
        @functools.wraps(fn)
        def save(*args, **kwargs):
            if self._ckpt_depth:
                return fn(*args, **kwargs)
            self._ckpt_depth += 1
            t = self.clock()
            try:
                return fn(*args, **kwargs)
            finally:
                d = self.clock() - t
                self._ckpt_depth -= 1
                self.samples["checkpoint"].append(d)
                self._ref += d
        return save

    def _hook_checkpoints(self, trainer: pl.Trainer) -> None:
        from pytorch_lightning.callbacks import ModelCheckpoint

        targets = [cb for cb in trainer.callbacks if isinstance(cb, ModelCheckpoint)]
        for obj, name in [(cb, "_save_checkpoint") for cb in targets] + [(trainer, "save_checkpoint")]:
            self._patch(obj, name, self._timed_save(getattr(obj, name)))

    def _hook_communication(self, trainer: pl.Trainer, force: bool = False) -> None:
        if trainer.world_size <= 1 and not force:
            return
        from torch.nn.parallel import DistributedDataParallel

        model = getattr(trainer.strategy, "model", None)
        if not isinstance(model, DistributedDataParallel):
            self.notes.append(f"communication not timed: {type(trainer.strategy).__name__} does not wrap the "
                              "model in DistributedDataParallel")
            return
        if getattr(trainer.strategy, "_ddp_comm_hook", None) is not None:
            self.notes.append("communication not timed: the strategy registers its own DDP comm hook")
            return
        model.register_comm_hook(model.process_group, self.comm_hook)

    def comm_hook(self, process_group, bucket):  # no annotations: DDP checks them against its own types
        """DDP's default all-reduce, timed from the first bucket's start to the last one's end."""
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        if not self._c0:
            self._c0 = self.clock()
            if self.gpu is not None:
                self.gpu.mark(6)
        fut = allreduce_hook(process_group, bucket)

        def done(f):
            self._c1 = self.clock()
            if self.gpu is not None:
                self.gpu.mark(7)
            return f.value()

        return fut.then(done)

    # -- steps ----------------------------------------------------------------------------------
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._t_epoch = self._ref = self.clock()
        self._first = True
        self._fetch0 = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        t = self.clock()
        if self._first:
            ref = self._t_epoch
            self._first = False
        else:
            ref = self._fetch0 or self._ref
        self._data = t - ref
        self._fetch0 = 0
        self._t0 = t
        self._tf = self._tb0 = self._tb1 = self._to = 0
        self._bs = _batch_size(batch)
        if self.gpu is not None:
            self.gpu.mark(0)

    def on_before_zero_grad(self, trainer, pl_module, optimizer) -> None:
        if self._t0 and not self._tf:
            self._tf = self.clock()
            if self.gpu is not None:
                self.gpu.mark(1)

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        t = self.clock()
        if self.gpu is not None:
            if not self._tf:
                self.gpu.mark(1)
            self.gpu.mark(2)
        if not self._tf:
            self._tf = t
        self._tb0 = t

    def on_after_backward(self, trainer, pl_module) -> None:
        self._tb1 = self.clock()
        if self.gpu is not None:
            self.gpu.mark(3)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self._to = self.clock()
        if self.gpu is not None:
            self.gpu.mark(4)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        t = self.clock()
        if not self._t0:
            return
        if self.gpu is not None:
            self.gpu.mark(5)
        warm = self.steps < self.warmup_steps
        self.steps += 1
        s = self.warm if warm else self.samples
        batch_ns = t - self._t0
        s["batch"].append(batch_ns)
        s["data_loading"].append(self._data)
        if self._tf:
            s["forward"].append(self._tf - self._t0)
        if self._tb0 and self._tb1:
            s["backward"].append(self._tb1 - self._tb0)
        if self._to:
            s["optimizer"].append(t - self._to)
        if self._c0:
            s["communication"].append(max(self._c1 - self._c0, 0))
            self._c0 = self._c1 = 0
        if self.gpu is not None:
            self.gpu.end_step(warm)
        if not warm:
            self.n_samples += self._bs
            if self.sample_every and self.steps % self.sample_every == 0 and self.sink is not None:
                self._pending.append((self._step0 + self.steps, batch_ns, self._data))
                if len(self._pending) >= MAX_PENDING_SAMPLES:
                    self._flush_samples()
        self._t0 = 0
        self._ref = t

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        d = self.clock() - self._t_epoch
        self.samples["epoch"].append(d)
        if self.gpu is not None:
            self.gpu.collect()
        if self.sink is not None:
            self._epochs.append((int(trainer.current_epoch), d))
            self._flush_samples()

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking and trainer.state.fn == "fit":
            self._tv = self.clock()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._tv:
            d = self.clock() - self._tv
            self.samples["validation"].append(d)
            self._ref += d
            self._tv = 0

    def _flush_samples(self) -> None:
        pending, self._pending = self._pending, []
        epochs, self._epochs = self._epochs, []
        if self.sink is None or not (pending or epochs):
            return
        points = [("timing/step/epoch_s", ns * NS, epoch) for epoch, ns in epochs]
        for step, batch_ns, data_ns in pending:
            points.append(("timing/step/batch_s", batch_ns * NS, step))
            points.append(("timing/step/data_loading_s", data_ns * NS, step))
        self.sink.metrics(points)

    # -- the end --------------------------------------------------------------------------------
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._finish(trainer, None)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._finish(trainer, exception)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._unhook()

    def _unhook(self) -> None:
        while self._restore:
            try:
                self._restore.pop()()
            except Exception:  # noqa: BLE001
                pass

    def compute(self) -> dict[str, Any]:
        """The statistics of what was recorded so far (seconds)."""
        out: dict[str, Any] = {"categories": {}, "warmup": {}}
        for cat in CATEGORIES:
            if self.samples[cat]:
                out["categories"][cat] = describe([v * NS for v in self.samples[cat]])
        if self.gpu is not None:
            for cat in GPU_CATEGORIES:
                if self.gpu.samples[cat]:
                    out["categories"][cat] = describe(self.gpu.samples[cat])
        for cat in ("batch", "data_loading"):
            if self.warm[cat]:
                out["warmup"][cat] = describe([v * NS for v in self.warm[cat]])
        batch = sum(self.samples["batch"]) * NS
        data = sum(self.samples["data_loading"]) * NS
        step_time = batch + data
        measured = len(self.samples["batch"])
        out["steps"] = self.steps
        out["measured_steps"] = measured
        out["warmup_steps"] = len(self.warm["batch"])
        out["warmup_s"] = (sum(self.warm["batch"]) + sum(self.warm["data_loading"])) * NS
        out["world_size"] = self._world
        out["samples"] = self.n_samples
        if step_time > 0:
            out["samples_per_s"] = self.n_samples * self._world / step_time
            out["steps_per_s"] = measured / step_time
            out["data_loading_share"] = data / step_time
        if self._t_train:
            out["time_to_train_s"] = (self.clock() - self._t_train) * NS
        out["peak_rss_bytes"] = peak_rss_bytes()
        if self._device is not None and getattr(self._device, "type", None) == "cuda":
            import torch

            out["peak_gpu_bytes"] = int(torch.cuda.max_memory_allocated(self._device))
        return out

    def step_samples(self) -> dict[str, list[float]]:
        """Every measured step's batch and data-loading time in µs (the report's distributions)."""
        n = len(self.samples["batch"])
        stride = max(1, -(-n // MAX_ARTIFACT_STEPS))
        return {cat: [round(v / 1000, 1) for v in self.samples[cat][::stride]] for cat in ("batch", "data_loading")}

    def metrics(self, summary: dict[str, Any]) -> dict[str, float]:
        """The summary as MLflow metric names (see the module's docstring)."""
        m: dict[str, float] = {}
        for cat, stats in summary["categories"].items():
            for stat, value in stats.items():
                m[f"timing/{cat}/{stat}"] = float(value)
        for key in ("samples_per_s", "steps_per_s", "data_loading_share", "time_to_train_s", "warmup_steps",
                    "warmup_s", "world_size"):
            if key in summary:
                m[f"timing/{key}"] = float(summary[key])
        for key in ("peak_rss_bytes", "peak_gpu_bytes"):
            if key in summary:
                m[f"memory/{key}"] = float(summary[key])
        return m

    def _finish(self, trainer: pl.Trainer, exception: BaseException | None) -> None:
        if self._finished:
            return
        self._finished = True
        try:
            if self.gpu is not None:
                self.gpu.collect()
            self.summary = self.compute()
            readings, energy = self._energy()
            metrics = self.metrics(self.summary)
            if self.sink is not None:
                self._flush_samples()
                self.sink.metrics([(k, v, int(trainer.global_step)) for k, v in metrics.items()])
                tags = {"maelflow.timing": "done" if exception is None else f"partial: {type(exception).__name__}"}
                if self.notes:
                    tags["timing.notes"] = "; ".join(self.notes)[:5000]
                if energy is not None:
                    from maelflow.training.energy import mlflow_fields

                    e_metrics, e_tags = mlflow_fields(readings, energy)
                    self.sink.metrics([(k, v, int(trainer.global_step)) for k, v in e_metrics.items()])
                    tags.update(e_tags)
                self.sink.tags(tags)
                self.sink.artifact({"summary": self.summary, "notes": self.notes, "steps": self.step_samples(),
                                    "settings": {"warmup_steps": self.warmup_steps, "sample_every": self.sample_every},
                                    "energy": {"summary": energy.to_json() if energy else None,
                                               "sources": [r.to_json() for r in readings]}},
                                   "maelflow/timing.json")
            if trainer.is_global_zero:
                log.info("%s", self.describe_line(energy))
        except Exception as exc:  # noqa: BLE001 - timing must not end (or hide the end of) a training
            log.warning("timing: could not finish: %s: %s", type(exc).__name__, exc)
        finally:
            self._unhook()

    def _energy(self):
        if self.meter is None:
            return [], None
        from maelflow.training.energy import summarize

        readings = self.meter.stop()
        return readings, summarize(readings)

    def describe_line(self, energy: Any = None) -> str:
        s = self.summary
        batch = s.get("categories", {}).get("batch", {})
        text = f"timing: {s.get('measured_steps', 0)} steps (+{s.get('warmup_steps', 0)} warm-up)"
        if batch.get("count"):
            text += f", batch median {batch['median'] * 1e3:.2f} ms p95 {batch['p95'] * 1e3:.2f} ms"
        if "samples_per_s" in s:
            text += f", {s['samples_per_s']:.1f} samples/s, data loading {s['data_loading_share']:.1%}"
        if energy is not None:
            text += (f"; energy {energy.quality}" + (f" {energy.total_j:.0f} J ({energy.method})"
                                                     if energy.total_j is not None else f" ({energy.reason})"))
        return text


__all__ = ["TimingCallback", "TimingSettings", "timing_callbacks", "describe", "EventTimer", "MlflowSink"]

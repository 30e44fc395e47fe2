#!/usr/bin/env python3
"""Benchmark: what the timing callback costs a training, with and without it in the same run.

The training is the demo's tiny Lightning application (``maelflow.training.examples.tiny``:
TinyForecaster on ZarrPairs, batch 8) on a synthetic zarr of a year of 6-hourly fields on the demo's
5 degree grid, set up as the launcher sets it up: an MLflow logger (a file store here) logging every
step, a checkpoint every epoch, the timing callback with its energy probes. Each repeat trains once
with and once without the callback, in alternating order; the time is the fit's own (train start to
train end), so process start and data set-up are left out; torch runs one intra-op thread. Each fit is measured in wall time
and in this process's CPU time (user + system: data loading, the step, MLflow and checkpoint writes
all run in it); the CPU time is the headline, since on a shared machine the wall time mostly
measures the neighbours. The callback's once-a-training work (energy probes and tags at the start;
statistics, metrics and the artifact at the end) is measured apart, and the headline is the
per-step ratio: (CPU time with the callback, less that one-off work) / (CPU time without), as the
median of the pairs.

Two more figures split the per-step cost: the callback's own step hooks called back to back (a fake
trainer, no Lightning dispatch), and what Lightning itself spends calling one more (no-op) callback
at those six hooks, the floor any callback pays.

BENCH_SMALL=1: fewer repeats and epochs (about a minute). BENCH_REPEATS=N overrides the repeats.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
warnings.filterwarnings("ignore")


def make_span():
    """Two callbacks, first and last in the list: train start to train end (the timing callback's own
    start and end inside), wall clock and this process's CPU time, and the steps in between."""
    import pytorch_lightning as pl

    class Start(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            self.t0, self.c0 = time.perf_counter(), time.process_time()
            self.step0 = trainer.global_step

    class End(pl.Callback):
        def on_train_end(self, trainer, pl_module):
            self.wall = time.perf_counter() - start.t0
            self.cpu = time.process_time() - start.c0
            self.steps = trainer.global_step - start.step0

    start = Start()
    return start, End()


ONE_OFF = {"cpu": 0.0}


def count_one_off() -> None:
    """Add the CPU time of the callback's once-a-training work (its start: energy probes, tags; its
    end: statistics, the last samples, metrics, tags, artifact) to ONE_OFF."""
    import functools

    from maelflow.training.timing import TimingCallback

    for name in ("on_train_start", "_finish"):
        method = getattr(TimingCallback, name)

        @functools.wraps(method)
        def timed(self, *args, _method=method, **kwargs):
            c0 = time.process_time()
            try:
                return _method(self, *args, **kwargs)
            finally:
                ONE_OFF["cpu"] += time.process_time() - c0

        setattr(TimingCallback, name, timed)


def fit(data: Path, work: Path, epochs: int, timed: bool, tag: str) -> tuple[float, float, int]:
    import logging

    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import ModelCheckpoint
    from pytorch_lightning.loggers import MLFlowLogger

    from maelflow.training.examples.tiny import TinyForecaster, ZarrPairs
    from maelflow.training.timing import TimingCallback

    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    dm = ZarrPairs([str(data)], batch_size=8)
    dm.setup("fit")
    model = TinyForecaster(**dm.model_kwargs)
    start, end = make_span()
    callbacks = [start, ModelCheckpoint(dirpath=work / tag / "ckpt", save_last=True, every_n_epochs=1), end]
    if timed:
        callbacks.insert(1, TimingCallback())
    logger = MLFlowLogger(experiment_name="bench", run_name=tag, tracking_uri=(work / "mlruns").as_uri())
    trainer = pl.Trainer(max_epochs=epochs, logger=logger, callbacks=callbacks, accelerator="cpu", devices=1,
                         enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1,
                         default_root_dir=str(work / tag), num_sanity_val_steps=0)
    trainer.fit(model, datamodule=dm)
    return end.wall, end.cpu, end.steps


def hook_cost(steps: int = 20_000) -> float:
    """Seconds per step of the callback's own step hooks, without Lightning's dispatch."""
    import torch

    from maelflow.training.timing import TimingCallback

    cb = TimingCallback(warmup_steps=3, energy=False, sink_factory=lambda t: None)
    loop = SimpleNamespace(_on_before_fetch=lambda: None)
    trainer = SimpleNamespace(global_step=0, world_size=1, is_global_zero=True, current_epoch=0, callbacks=[],
                              loggers=[], sanity_checking=False, state=SimpleNamespace(fn="fit"),
                              fit_loop=SimpleNamespace(epoch_loop=loop), strategy=SimpleNamespace(),
                              save_checkpoint=lambda *a: None)
    cb.on_train_start(trainer, None)
    cb.on_train_epoch_start(trainer, None)
    batch = (torch.zeros(8, 4, 16), torch.zeros(8, 4, 16))
    fetch = trainer.fit_loop.epoch_loop._on_before_fetch
    t0 = time.perf_counter()
    for _ in range(steps):
        fetch()
        cb.on_train_batch_start(trainer, None, batch, 0)
        cb.on_before_zero_grad(trainer, None, None)
        cb.on_before_backward(trainer, None, None)
        cb.on_after_backward(trainer, None)
        cb.on_before_optimizer_step(trainer, None, None)
        cb.on_train_batch_end(trainer, None, None, batch, 0)
    per_step = (time.perf_counter() - t0) / steps
    cb._unhook()
    return per_step


def dispatch_cost(steps: int = 20_000) -> float:
    """Seconds per step Lightning spends calling one more callback (a no-op one) at the six step
    hooks the timing callback uses: the floor any callback pays, whatever it does."""
    import pytorch_lightning as pl
    from pytorch_lightning.trainer import call

    def per_step(callbacks) -> float:
        trainer = pl.Trainer(callbacks=callbacks, logger=False, enable_progress_bar=False,
                             enable_model_summary=False, enable_checkpointing=False)
        t0 = time.perf_counter()
        for _ in range(steps):
            call._call_callback_hooks(trainer, "on_train_batch_start", None, 0)
            call._call_callback_hooks(trainer, "on_before_zero_grad", None)
            call._call_callback_hooks(trainer, "on_before_backward", None)
            call._call_callback_hooks(trainer, "on_after_backward")
            call._call_callback_hooks(trainer, "on_before_optimizer_step", None)
            call._call_callback_hooks(trainer, "on_train_batch_end", None, None, 0)
        return (time.perf_counter() - t0) / steps

    return per_step([pl.Callback()]) - per_step([])


def main() -> None:
    import torch

    from maelflow.training.synthetic import make_synthetic

    torch.set_num_threads(1)   # one intra-op thread: spinning OpenMP threads make CPU time noisy under load

    small = bool(os.environ.get("BENCH_SMALL"))
    repeats = int(os.environ.get("BENCH_REPEATS", 4 if small else 8))
    epochs = 1 if small else 3
    work = Path(tempfile.mkdtemp(prefix="maelflow-bench-timing-"))
    data = make_synthetic(work / "synth.zarr", dates=4 * 365, lat=36, lon=72)
    print(f"tiny Lightning model, batch 8, a year of 6-hourly fields on a 5 degree grid; {epochs} epoch(s), "
          f"{repeats} alternating repeats; work folder {work}")
    fit(data, work, 1, True, "warm-with")       # imports, first MLflow run, page cache
    fit(data, work, 1, False, "warm-without")
    count_one_off()
    one_off = []
    wall = {True: [], False: []}
    cpu = {True: [], False: []}
    wall_ratios, cpu_ratios = [], []
    steps = 0
    for r in range(repeats):
        order = (True, False) if r % 2 == 0 else (False, True)
        for timed in order:
            ONE_OFF["cpu"] = 0.0
            w, c, steps = fit(data, work, epochs, timed, f"{'with' if timed else 'without'}-{r}")
            if timed:
                one_off.append(ONE_OFF["cpu"])
            wall[timed].append(w)
            cpu[timed].append(c)
        wall_ratios.append(wall[True][-1] / wall[False][-1])
        cpu_ratios.append(cpu[True][-1] / cpu[False][-1])
        print(f"  repeat {r + 1}: wall with {wall[True][-1]:.3f} s, without {wall[False][-1]:.3f} s "
              f"({wall_ratios[-1]:.4f}); CPU with {cpu[True][-1]:.3f} s, without {cpu[False][-1]:.3f} s "
              f"({cpu_ratios[-1]:.4f})", flush=True)
    med = statistics.median
    step_cpu = med(cpu[False]) / steps
    hooks = hook_cost(5_000 if small else 20_000)
    print(f"{steps} steps a fit. wall: with {med(wall[True]):.3f} s (best {min(wall[True]):.3f}), without "
          f"{med(wall[False]):.3f} s (best {min(wall[False]):.3f}); pair ratios median {med(wall_ratios):.4f}, "
          f"best/best {min(wall[True]) / min(wall[False]):.4f}")
    print(f"CPU: with {med(cpu[True]):.3f} s (best {min(cpu[True]):.3f}), without {med(cpu[False]):.3f} s "
          f"(best {min(cpu[False]):.3f}); pair ratios {min(cpu_ratios):.4f}..{max(cpu_ratios):.4f}, best/best "
          f"{min(cpu[True]) / min(cpu[False]):.4f}")
    dispatch = dispatch_cost(5_000 if small else 20_000)
    print(f"the callback's own step hooks: {hooks * 1e6:.1f} us per step = {hooks / step_cpu:.2%} of a "
          f"{step_cpu * 1e3:.2f} ms step (CPU); Lightning's dispatch of any one more callback: "
          f"{dispatch * 1e6:.1f} us = {dispatch / step_cpu:.2%}")
    # per step: what the callback adds beyond its once-a-training work, pair by pair
    per_step = [((cpu[True][i] - one_off[i]) - cpu[False][i]) / steps for i in range(repeats)]
    step_ratio = 1 + med(per_step) / step_cpu
    print(f"once a training (start: energy probes, tags; end: statistics, metrics, artifact): "
          f"{med(one_off) * 1e3:.1f} ms CPU; whole-fit CPU ratio {med(cpu_ratios):.4f}, wall {med(wall_ratios):.4f}")
    print(f"timing callback overhead per step: ratio {step_ratio:.4f} ({med(per_step) * 1e6:+.1f} us on a "
          f"{step_cpu * 1e3:.2f} ms step, median of {repeats} alternating pairs)")

if __name__ == "__main__":
    main()

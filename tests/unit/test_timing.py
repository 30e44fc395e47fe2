"""The timing callback: what each category measures (driven by a fake clock), the statistics, GPU
events read lazily, the DDP comm hook, and real Lightning fits of a tiny model on CPU."""

from __future__ import annotations

import statistics
import time
from types import SimpleNamespace

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from maelflow.training.examples.tiny import TinyForecaster
from maelflow.training.timing import (CATEGORIES, STATS, EventTimer, TimingCallback, TimingSettings, describe,
                                      timing_callbacks)

pytestmark = pytest.mark.unit


@pytest.fixture
def no_process_group(monkeypatch):
    """A fresh distributed start: an in-process training earlier in the same pytest run (anemoi's
    strategy) may have left the default process group and its MASTER_PORT behind."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    for var in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK"):
        monkeypatch.delenv(var, raising=False)

MS = 1_000_000  # ns


# --------------------------------------------------------------------------- statistics
def test_describe_matches_the_standard_library():
    rng = np.random.default_rng(7)
    values = list(rng.gamma(2.0, 0.01, size=101))
    d = describe(values)
    assert d["count"] == 101
    assert d["min"] == min(values) and d["max"] == max(values)
    assert d["median"] == pytest.approx(statistics.median(values))
    assert d["mean"] == pytest.approx(statistics.fmean(values))
    assert d["stdev"] == pytest.approx(statistics.stdev(values))
    assert d["total"] == pytest.approx(sum(values))
    # p95 by linear interpolation between the order statistics
    assert d["p95"] == pytest.approx(statistics.quantiles(values, n=20, method="inclusive")[-1])
    assert describe([0.5]) == {"count": 1, "total": 0.5, "min": 0.5, "median": 0.5, "mean": 0.5, "p95": 0.5,
                               "max": 0.5, "stdev": 0.0}
    assert describe([]) == {"count": 0}


def test_settings_from_the_environment():
    assert TimingSettings.from_env({}) == TimingSettings(True, 3, 10, True)
    s = TimingSettings.from_env({"MAELFLOW_TIMING_WARMUP": "5", "MAELFLOW_TIMING_EVERY": "10", "MAELFLOW_ENERGY": "0"})
    assert (s.warmup_steps, s.sample_every, s.energy) == (5, 10, False)
    assert TimingSettings.from_env({"MAELFLOW_TIMING_WARMUP": "many"}).warmup_steps == 3
    assert timing_callbacks(TimingSettings.from_env({"MAELFLOW_TIMING": "off"})) == []
    (cb,) = timing_callbacks(TimingSettings(warmup_steps=2, energy=False))
    assert isinstance(cb, TimingCallback) and cb.warmup_steps == 2 and cb.energy is False


def test_a_trainings_timing_block_reaches_the_callbacks_unless_the_job_says_otherwise():
    from pydantic import ValidationError

    from maelflow.config.models import Training
    from maelflow.training.timing import apply_timing_config

    t = Training(name="t", application="anemoi", timing={"warmup_steps": 7, "sample_every": 0, "energy": False})
    env: dict[str, str] = {}
    apply_timing_config(t.timing, env)
    assert TimingSettings.from_env(env) == TimingSettings(True, 7, 0, False)
    env = {"MAELFLOW_TIMING": "0"}                  # the operator's switch for one job wins
    apply_timing_config(t.timing, env)
    assert timing_callbacks(TimingSettings.from_env(env)) == [] and env["MAELFLOW_TIMING_WARMUP"] == "7"
    assert Training(name="t", application="anemoi").timing.enabled is True
    with pytest.raises(ValidationError, match="sample_every"):
        Training(name="t", application="anemoi", timing={"sample_every": -1})
    with pytest.raises(ValidationError, match="warmup"):
        Training(name="t", application="anemoi", timing={"warmup": 2})


# --------------------------------------------------------------------------- a fake clock
class Clock:
    def __init__(self):
        self.now = 1_000 * MS

    def __call__(self) -> int:
        return self.now

    def advance(self, ms: float) -> None:
        self.now += int(ms * MS)


class Sink:
    def __init__(self):
        self.points, self.tag_sets, self.artifacts = [], {}, {}

    def metrics(self, points):
        self.points.extend(points)

    def tags(self, tags):
        self.tag_sets.update(tags)

    def artifact(self, data, path):
        self.artifacts[path] = data

    def last(self, key):
        return [v for k, v, _ in self.points if k == key][-1]


def _fake_trainer():
    loop = SimpleNamespace(_on_before_fetch=lambda: None)
    trainer = SimpleNamespace(global_step=0, world_size=1, is_global_zero=True, current_epoch=0,
                              sanity_checking=False, state=SimpleNamespace(fn="fit"), callbacks=[], loggers=[],
                              fit_loop=SimpleNamespace(epoch_loop=loop), strategy=SimpleNamespace())
    trainer.save_checkpoint = lambda *a, **k: None
    return trainer


def _step(cb, trainer, clock, *, fetch=0.0, transfer=0.0, fwd=0.0, bwd=0.0, opt=0.0, batch_size=4, logging=0.0):
    """One training step as Lightning calls the hooks, with the given durations (ms)."""
    clock.advance(logging)                                 # the previous step's logging: not data loading
    trainer.fit_loop.epoch_loop._on_before_fetch()
    clock.advance(fetch + transfer)
    cb.on_train_batch_start(trainer, None, torch.zeros(batch_size, 3), 0)
    clock.advance(fwd)
    cb.on_before_zero_grad(trainer, None, None)
    cb.on_before_backward(trainer, None, None)
    clock.advance(bwd)
    cb.on_after_backward(trainer, None)
    cb.on_before_optimizer_step(trainer, None, None)
    clock.advance(opt)
    cb.on_train_batch_end(trainer, None, None, None, 0)
    trainer.global_step += 1


def test_each_category_gets_exactly_its_own_time():
    clock, sink = Clock(), Sink()
    cb = TimingCallback(warmup_steps=2, sample_every=1, energy=False, clock=clock, sink_factory=lambda t: sink)
    trainer = _fake_trainer()
    cb.on_train_start(trainer, SimpleNamespace(device=torch.device("cpu")))
    clock.advance(1)
    cb.on_train_epoch_start(trainer, None)
    clock.advance(30)                                       # iterator and workers start: the first step's wait
    _step(cb, trainer, clock, fetch=0, fwd=50, bwd=90, opt=10)      # warm-up, slow
    _step(cb, trainer, clock, fetch=9, fwd=40, bwd=80, opt=10)      # warm-up
    for i in range(6):
        _step(cb, trainer, clock, fetch=2 + i, transfer=1, fwd=10, bwd=20, opt=3, logging=7)
    # validation and a checkpoint between steps are neither data loading nor steps
    cb.on_validation_start(trainer, None)
    clock.advance(25)
    cb.on_validation_end(trainer, None)
    clock_before = clock.now
    trainer.save_checkpoint("x.ckpt")
    assert clock.now == clock_before                        # (the save itself takes no fake time)
    _step(cb, trainer, clock, fetch=4, fwd=10, bwd=20, opt=3, logging=5)
    clock.advance(2)
    cb.on_train_epoch_end(trainer, None)
    cb.on_train_end(trainer, None)

    cats = cb.summary["categories"]
    assert cats["batch"]["count"] == 7 and cb.summary["warmup_steps"] == 2
    assert cats["forward"]["median"] == pytest.approx(0.010)
    assert cats["backward"]["median"] == pytest.approx(0.020)
    assert cats["optimizer"]["median"] == pytest.approx(0.003)
    assert cats["batch"]["mean"] == pytest.approx(0.033)
    # fetch + host-to-device copy, never the logging before it
    expected_io = [0.003 + i * 0.001 for i in range(6)] + [0.004]
    assert cats["data_loading"]["total"] == pytest.approx(sum(expected_io))
    assert cats["data_loading"]["max"] == pytest.approx(max(expected_io))
    assert cats["validation"]["total"] == pytest.approx(0.025) and cats["checkpoint"]["count"] == 1
    assert cb.summary["warmup"]["data_loading"]["max"] == pytest.approx(0.030)   # the epoch's first wait
    assert cb.summary["warmup_s"] == pytest.approx((30 + 150 + 9 + 130) / 1000)
    step_time = 7 * 0.033 + sum(expected_io)
    assert cb.summary["samples_per_s"] == pytest.approx(7 * 4 / step_time)
    assert cb.summary["data_loading_share"] == pytest.approx(sum(expected_io) / step_time)
    assert "communication" not in cats          # one process: no all-reduce
    # MLflow: statistics per category, per-step samples after the warm-up, the tags
    for stat in STATS:
        assert sink.last(f"timing/batch/{stat}") == pytest.approx(cats["batch"][stat])
    assert sink.last("timing/samples_per_s") == pytest.approx(cb.summary["samples_per_s"])
    steps = [(v, s) for k, v, s in sink.points if k == "timing/step/batch_s"]
    assert [s for _, s in steps] == list(range(3, 10)) and steps[0][0] == pytest.approx(0.033)
    assert [v for k, v, _ in sink.points if k == "timing/step/epoch_s"] == [pytest.approx(cats["epoch"]["max"])]
    assert sink.tag_sets["maelflow.timing"] == "done"
    steps_us = sink.artifacts["maelflow/timing.json"]["steps"]
    assert steps_us["batch"] == [33000.0] * 7 and steps_us["data_loading"] == [v * 1e6 for v in expected_io]
    assert sink.last("memory/peak_rss_bytes") > 0
    # the loop's hook and the trainer's save are given back as they were
    assert trainer.fit_loop.epoch_loop._on_before_fetch.__name__ == "<lambda>"
    assert trainer.save_checkpoint.__name__ == "<lambda>"


def test_sample_interval_and_no_sink():
    clock, sink = Clock(), Sink()
    cb = TimingCallback(warmup_steps=0, sample_every=3, energy=False, clock=clock, sink_factory=lambda t: sink)
    trainer = _fake_trainer()
    cb.on_train_start(trainer, None)
    cb.on_train_epoch_start(trainer, None)
    for _ in range(10):
        _step(cb, trainer, clock, fwd=1)
    cb.on_train_end(trainer, None)
    assert [s for k, _, s in sink.points if k == "timing/step/data_loading_s"] == [3, 6, 9]
    # not rank 0: nothing is sent, the statistics are still there
    other = TimingCallback(energy=False, clock=clock, sink_factory=lambda t: pytest.fail("rank 0 only"))
    trainer = _fake_trainer()
    trainer.is_global_zero = False
    other.on_train_start(trainer, None)
    other.on_train_epoch_start(trainer, None)
    for _ in range(5):
        _step(other, trainer, clock, fwd=1)
    other.on_train_end(trainer, None)
    assert other.summary["categories"]["batch"]["count"] == 2


class FakeEvent:
    """A CUDA event on a fake device that runs ``lag`` behind the host."""

    device = {"now": 0.0, "done": 0.0, "syncs": 0}

    def record(self):
        self.t = self.device["now"]

    def query(self):
        return self.t <= self.device["done"]

    def synchronize(self):
        self.device["syncs"] += 1
        self.device["done"] = max(self.device["done"], self.t)

    def elapsed_time(self, end):
        assert self.query() and end.query(), "read before the device got there"
        return end.t - self.t


def test_gpu_events_are_pooled_and_read_only_when_the_device_is_there():
    dev = FakeEvent.device
    dev.update(now=0.0, done=0.0, syncs=0)
    made = []

    def new():
        made.append(FakeEvent())
        return made[-1]

    timer = EventTimer(new, max_pending=4)
    for step in range(12):
        for slot, ms in ((0, 0), (1, 4), (2, 4), (3, 10), (4, 10), (5, 12)):
            dev["now"] = step * 100 + ms
            timer.mark(slot)
        timer.end_step(warm=step == 0)
        dev["done"] = step * 100 - 150        # the device lags behind the host
    assert dev["syncs"] == 0                   # never waited during the steps
    assert 0 < len(timer.samples["gpu_batch"]) < 11
    timer.collect()                            # the epoch's end: waits once, reads the rest
    assert dev["syncs"] >= 1
    assert len(timer.samples["gpu_batch"]) == 11 and len(timer.warm["gpu_batch"]) == 1
    assert set(timer.samples["gpu_forward"]) == {0.004} and set(timer.samples["gpu_backward"]) == {0.006}
    assert set(timer.samples["gpu_optimizer"]) == {0.002} and set(timer.samples["gpu_batch"]) == {0.012}
    assert len(made) < 12 * 6                  # events come back to the pool


def test_gpu_categories_reach_the_summary():
    clock, sink = Clock(), Sink()
    FakeEvent.device.update(now=0.0, done=1e12, syncs=0)
    cb = TimingCallback(warmup_steps=1, energy=False, clock=clock, new_event=FakeEvent, sink_factory=lambda t: sink)
    trainer = _fake_trainer()
    cb.on_train_start(trainer, None)
    cb.on_train_epoch_start(trainer, None)
    for _ in range(4):
        _step(cb, trainer, clock, fwd=2, bwd=3)
    cb.on_train_epoch_end(trainer, None)
    cb.on_train_end(trainer, None)
    assert cb.summary["categories"]["gpu_batch"]["count"] == 3
    assert sink.last("timing/gpu_batch/count") == 3
    assert sink.tag_sets["timing.clock"] == "perf_counter_ns+gpu_events"


# --------------------------------------------------------------------------- communication
def test_the_comm_hook_times_ddps_all_reduce_and_keeps_the_gradients(tmp_path, no_process_group):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        plain = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 8))
        hooked = DistributedDataParallel(torch.nn.Sequential(*[torch.nn.Linear(64, 256), torch.nn.ReLU(),
                                                              torch.nn.Linear(256, 8)]), bucket_cap_mb=0.05)
        hooked.module.load_state_dict(plain.state_dict())
        cb = TimingCallback(warmup_steps=0, energy=False, sink_factory=lambda t: None)
        trainer = _fake_trainer()
        trainer.strategy = SimpleNamespace(model=hooked)
        cb._hook_communication(trainer, force=True)
        x = torch.randn(16, 64)
        cb.on_train_epoch_start(trainer, None)
        for _ in range(3):
            cb.on_train_batch_start(trainer, None, x, 0)
            cb.on_before_backward(trainer, None, None)
            hooked(x).square().mean().backward()
            cb.on_after_backward(trainer, None)
            cb.on_train_batch_end(trainer, None, None, None, 0)
        plain(x).square().mean().backward()
        for a, b in zip(plain.parameters(), hooked.module.parameters()):
            assert torch.allclose(3 * a.grad, b.grad, atol=1e-6)     # three steps without zero_grad
        comm = list(cb.samples["communication"])
        assert len(comm) == 3 and all(c > 0 for c in comm)
    finally:
        dist.destroy_process_group()


# --------------------------------------------------------------------------- real fits
class SlowPairs(Dataset):
    """Pairs whose loading takes ``seconds`` per sample, to stand in for a slow file system."""

    def __init__(self, n: int, seconds: float):
        self.x = torch.randn(n + 1, 4, 16)
        self.seconds = seconds

    def __len__(self):
        return len(self.x) - 1

    def __getitem__(self, i):
        time.sleep(self.seconds)
        return self.x[i], self.x[i + 1]


def _fit(callbacks, loader, model=None, epochs=2, tmp_path=None, **kwargs):
    trainer = pl.Trainer(max_epochs=epochs, logger=False, callbacks=callbacks, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu", default_root_dir=tmp_path, **kwargs)
    trainer.fit(model or TinyForecaster(), train_dataloaders=loader, val_dataloaders=loader)
    return trainer


def test_a_real_fit_attributes_slow_loading_and_a_slow_step(tmp_path):
    from pytorch_lightning.callbacks import ModelCheckpoint

    cb = TimingCallback(warmup_steps=1, energy=False)
    loader = DataLoader(SlowPairs(12, 0.004), batch_size=2)          # >= 8 ms to load a batch
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True, every_n_epochs=1)
    trainer = _fit([cb, ckpt], loader, TinyForecaster(step_seconds=0.006), tmp_path=tmp_path,
                   limit_val_batches=1, num_sanity_val_steps=0)
    cats = cb.summary["categories"]
    assert cats["batch"]["count"] == 2 * 6 - 1
    assert cats["data_loading"]["median"] >= 0.008 and cats["forward"]["median"] >= 0.006
    assert cats["data_loading"]["median"] < 0.008 + 0.02                # not the validation nor the saves
    assert cats["backward"]["count"] == cats["optimizer"]["count"] == cats["batch"]["count"]
    for name in ("forward", "backward", "optimizer"):
        assert cats[name]["mean"] < cats["batch"]["mean"]
    assert cats["forward"]["mean"] + cats["backward"]["mean"] + cats["optimizer"]["mean"] <= cats["batch"]["mean"]
    assert cats["epoch"]["count"] == 2 and cats["validation"]["count"] == 2
    assert cats["validation"]["min"] >= 0.008                            # its one batch loads slowly too
    assert cats["checkpoint"]["count"] >= 2                              # one a epoch at least (+ last.ckpt)
    assert cats["checkpoint"]["total"] < cats["epoch"]["total"]
    assert 0.3 < cb.summary["data_loading_share"] < 0.9
    assert cb.summary["samples"] == 2 * 12 - 2
    assert set(cats) <= set(CATEGORIES)
    assert "_save_checkpoint" not in vars(ckpt) and "save_checkpoint" not in vars(trainer)   # unhooked
    assert "_on_before_fetch" not in vars(trainer.fit_loop.epoch_loop)


def test_a_failing_tracking_server_never_ends_the_training(tmp_path, caplog):
    class Broken:
        def log_batch(self, *a, **k):
            raise ConnectionError("tracking server gone")

        def log_dict(self, *a, **k):
            raise ConnectionError("tracking server gone")

    from maelflow.training.timing import MlflowSink

    cb = TimingCallback(warmup_steps=0, energy=False, sink_factory=lambda t: MlflowSink(Broken(), "r"))
    x = torch.randn(33, 4, 8)
    trainer = _fit([cb], DataLoader(TensorDataset(x[:-1], x[1:]), batch_size=8), epochs=1, tmp_path=tmp_path)
    assert trainer.global_step == 4 and cb.summary["categories"]["batch"]["count"] == 4
    assert "tracking server gone" in caplog.text


def test_an_exception_still_logs_what_was_measured(tmp_path):
    class Boom(TinyForecaster):
        def training_step(self, batch, batch_idx):
            if self.global_step == 5:
                raise RuntimeError("diverged")
            return super().training_step(batch, batch_idx)

    sink = Sink()
    cb = TimingCallback(warmup_steps=2, energy=False, sink_factory=lambda t: sink)
    x = torch.randn(81, 4, 8)
    with pytest.raises(RuntimeError, match="diverged"):
        _fit([cb], DataLoader(TensorDataset(x[:-1], x[1:]), batch_size=8), Boom(), epochs=1, tmp_path=tmp_path)
    assert sink.tag_sets["maelflow.timing"] == "partial: RuntimeError"
    assert sink.last("timing/batch/count") == 3


def test_two_processes_time_their_all_reduce(tmp_path, monkeypatch, no_process_group):
    """DDP on CPU (gloo, 2 processes spawned by Lightning): rank 0 logs the communication window."""
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow import MlflowClient
    from pytorch_lightning.loggers import MLFlowLogger

    uri = (tmp_path / "mlruns").as_uri()
    x = torch.randn(65, 4, 32)
    trainer = pl.Trainer(max_epochs=1, logger=MLFlowLogger(experiment_name="ddp", tracking_uri=uri),
                         callbacks=[TimingCallback(warmup_steps=1, energy=False)], strategy="ddp_spawn", devices=2,
                         accelerator="cpu", enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path, enable_checkpointing=False)
    trainer.fit(TinyForecaster(), train_dataloaders=DataLoader(TensorDataset(x[:-1], x[1:]), batch_size=8))
    client = MlflowClient(uri)
    runs = [r for r in client.search_runs([client.get_experiment_by_name("ddp").experiment_id])
            if "timing/batch/count" in r.data.metrics]
    assert len(runs) == 1                                       # rank 0 only
    m = runs[0].data.metrics
    assert m["timing/world_size"] == 2 and m["timing/batch/count"] == 64 / 8 / 2 - 1
    assert m["timing/communication/count"] == m["timing/batch/count"] and m["timing/communication/min"] > 0

"""What must never end a training or hide why a task failed: provenance (ours and anemoi's) that
cannot be gathered, ecFlow progress the server does not take, a checkpoint's pickle, and a task's
traceback that click would swallow."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import types

import pytest

from maelflow import provenance

pytestmark = pytest.mark.unit


def _broken_pipe(*args, **kwargs):
    raise BrokenPipeError(32, "Broken pipe")


def test_anemois_gatherer_that_raises_gives_a_record_saying_why(monkeypatch):
    from anemoi.utils import provenance as prov

    monkeypatch.setattr(os, "environ", dict(os.environ))       # trust_installation writes here
    monkeypatch.setattr(prov, "gather_provenance_info", _broken_pipe)
    trainer_module = types.ModuleType("fake_anemoi_trainer")   # took the gatherer by name, as anemoi-training does
    trainer_module.gather_provenance_info = _broken_pipe
    monkeypatch.setitem(sys.modules, "fake_anemoi_trainer", trainer_module)

    assert provenance.guard_anemoi() is True
    for gather in (trainer_module.gather_provenance_info, prov.gather_provenance_info):
        info = gather()
        assert info["unavailable"].startswith("unavailable: BrokenPipeError") and "Broken pipe" in info["unavailable"]
        assert info["git_versions"] == {} and isinstance(info["module_versions"], dict)
    assert provenance.guard_anemoi() is True                   # twice: wrapped once
    assert trainer_module.gather_provenance_info.__wrapped__ is _broken_pipe
    # and the process's git now trusts the installation's checkout
    roots = provenance.installation_roots()
    count = int(os.environ.get("GIT_CONFIG_COUNT", "0"))
    trusted = {os.environ[f"GIT_CONFIG_VALUE_{i}"] for i in range(count)
               if os.environ[f"GIT_CONFIG_KEY_{i}"] == "safe.directory"}
    assert set(roots) <= trusted


def test_a_working_gatherer_is_passed_through():
    calls = []

    def gather(full=False):
        calls.append(full)
        return {"python": "3"}

    assert provenance.guarded(gather)(full=True) == {"python": "3"} and calls == [True]


def test_trust_git_keeps_what_is_there():
    env = {"GIT_CONFIG_COUNT": "1", "GIT_CONFIG_KEY_0": "core.pager", "GIT_CONFIG_VALUE_0": "cat"}
    provenance.trust_git(["/opt/install", "/opt/install"], env)
    provenance.trust_git(["/opt/install", "/srv/other"], env)
    assert env == {"GIT_CONFIG_COUNT": "3", "GIT_CONFIG_KEY_0": "core.pager", "GIT_CONFIG_VALUE_0": "cat",
                   "GIT_CONFIG_KEY_1": "safe.directory", "GIT_CONFIG_VALUE_1": "/opt/install",
                   "GIT_CONFIG_KEY_2": "safe.directory", "GIT_CONFIG_VALUE_2": "/srv/other"}
    bogus = {"GIT_CONFIG_COUNT": "x"}
    assert provenance.trust_git(["/opt"], bogus) == {"GIT_CONFIG_COUNT": "x"}


def test_our_record_never_raises(monkeypatch):
    def no_user():
        raise KeyError("getpwuid(): uid not found: 4242")

    monkeypatch.setattr(provenance.getpass, "getuser", no_user)
    monkeypatch.setattr(provenance, "packages", _broken_pipe)
    monkeypatch.setattr(provenance, "git_info", _broken_pipe)
    rec = provenance.record({"when": object()}, {"training": "t"})
    assert rec["user"].startswith("unavailable: KeyError")
    assert rec["packages"].startswith("unavailable: BrokenPipeError")
    assert rec["maelflow"]["git"].startswith("unavailable: BrokenPipeError") and rec["maelflow"]["version"]
    assert rec["training"] == "t" and len(rec["config_sha256"]) == 64


def test_progress_the_server_does_not_take_does_not_end_the_training():
    from maelflow.training.progress import EcflowProgress

    class Refusing:
        calls = 0

        def meter(self, *a):
            Refusing.calls += 1
            raise RuntimeError("ClientInvoker: Connection error: server halted")

        label = event = meter

        def throttled(self, kind, *a, **k):
            getattr(self, kind)(*a)

    trainer = types.SimpleNamespace(current_epoch=0, global_step=3, max_epochs=2,
                                    callback_metrics={"train_loss_step": 0.5})
    cb = EcflowProgress(Refusing())
    cb.on_train_start(trainer, None)
    cb.on_train_batch_end(trainer, None, None, None, 0)
    cb.on_train_epoch_end(trainer, None)
    cb.on_save_checkpoint(trainer, None, {})
    assert Refusing.calls == 6


def test_a_checkpoints_step_is_read_without_running_its_pickle(tmp_path):
    import torch

    from maelflow.training.anemoi_app import checkpoint_step

    plain = tmp_path / "plain.ckpt"
    torch.save({"global_step": 12, "state_dict": {"w": torch.ones(2)}}, plain)
    assert checkpoint_step(plain) == 12

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    planted = tmp_path / "planted.ckpt"
    torch.save({"global_step": 34, "hyper_parameters": {"config": Payload()},
                "state_dict": {"w": torch.ones(2)}}, planted)
    assert checkpoint_step(planted) == 34
    assert not marker.exists(), "the checkpoint's pickle ran"
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    assert checkpoint_step(tmp_path / "junk.ckpt") == 0


TASK_SCRIPT = textwrap.dedent("""
    import sys
    from maelflow.suite import tasks

    def from_env(cls, *a, **k):
        return tasks.TaskContext(None, None, tasks.Reporter(), None)

    def body(ctx):
        def inner():
            raise BrokenPipeError(32, "Broken pipe")   # as GitPython's, writing to a git that has exited
        inner()

    tasks.TaskContext.from_env = classmethod(from_env)
    tasks.provenance = body
    from maelflow.cli.main import cli
    cli(["task", "provenance"])
""")


def test_a_failed_task_prints_its_traceback_and_leaves_the_reason(tmp_path):
    abort = tmp_path / "abort"
    env = {**os.environ, "MAELFLOW_ABORT_FILE": str(abort)}
    env.pop("ECF_NAME", None)
    res = subprocess.run([sys.executable, "-c", TASK_SCRIPT], env=env, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 1
    assert "Traceback (most recent call last)" in res.stderr, res.stderr
    assert "in inner" in res.stderr and "BrokenPipeError: [Errno 32] Broken pipe" in res.stderr
    reason = abort.read_text()
    # ":" arrives as its look-alike (maelflow.reporting.abort_text)
    assert reason.startswith("BrokenPipeError\u2236 [Errno 32] Broken pipe at ") and "(traceback in the job output)" in reason


def test_a_task_that_fails_for_a_known_reason_says_it_without_a_traceback(tmp_path):
    abort = tmp_path / "abort"
    cfg = tmp_path / "missing.json"
    env = {**os.environ, "MAELFLOW_ABORT_FILE": str(abort), "MAELFLOW_CONFIG": str(cfg)}
    res = subprocess.run([sys.executable, "-m", "maelflow", "task", "provenance"], env=env, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert "resolved experiment config not found" in abort.read_text()
    assert "maelflow task failed" in res.stderr

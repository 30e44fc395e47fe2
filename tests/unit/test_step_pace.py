"""maelflow.training.pace.StepPace: the pacing that makes a tiny training outlast a time limit."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

from maelflow.training.pace import StepPace

pytestmark = pytest.mark.unit


def _one_step(pace: StepPace, trainer) -> float:
    t0 = time.monotonic()
    pace.on_train_batch_start(trainer, None, None, 0)
    pace.on_train_batch_end(trainer, None, None, None, 0)
    return time.monotonic() - t0


def test_a_step_lasts_at_least_the_pace():
    pace, trainer = StepPace(seconds=0.2), SimpleNamespace(global_step=7)
    pace.on_train_start(trainer, None)
    assert _one_step(pace, trainer) >= 0.2  # paced from any step without first_start_only


def test_first_start_only_paces_a_fresh_start_and_not_a_resumed_one():
    fresh = StepPace(seconds=0.2, first_start_only=True)
    fresh.on_train_start(SimpleNamespace(global_step=0), None)
    assert _one_step(fresh, SimpleNamespace(global_step=0)) >= 0.2
    resumed = StepPace(seconds=60, first_start_only=True)
    resumed.on_train_start(SimpleNamespace(global_step=40), None)  # started from a checkpoint
    assert _one_step(resumed, SimpleNamespace(global_step=40)) < 30

"""A Lightning callback that makes every training step last at least a given time.

Why: a tiny model trains in a fraction of a second per step, so how far it gets before a scheduler's
time limit depends on how busy the machine is. Paced, a tiny training stands in for a heavier one: a
time limit falls in the middle of it, while the model and its checkpoints stay tiny. The Lightning
apps have ``step_seconds`` for this; an anemoi training names this class among anemoi's own
``diagnostics.callbacks``:

    config:
      diagnostics:
        callbacks:
          - {_target_: maelflow.training.pace.StepPace, seconds: 1.0, first_start_only: true}

``first_start_only``: only a training that starts from step 0 is paced; the job resubmitted after the
time limit (it resumes from a checkpoint) trains at full speed. A test then knows the first job
cannot finish before its limit, and the second finishes in one job however busy the machine is.
"""

from __future__ import annotations

import time

from pytorch_lightning.callbacks import Callback


class StepPace(Callback):
    """Sleeps after a training step for whatever is left of ``seconds`` since the step began."""

    def __init__(self, seconds: float = 0.0, first_start_only: bool = False):
        super().__init__()
        self.seconds = max(float(seconds), 0.0)
        self.first_start_only = bool(first_start_only)
        self._start = 0.0

    def on_train_start(self, trainer, pl_module) -> None:
        if self.first_start_only and trainer.global_step > 0:  # resumed from a checkpoint
            self.seconds = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = time.monotonic()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        left = self.seconds - (time.monotonic() - self._start)
        if left > 0:
            time.sleep(left)

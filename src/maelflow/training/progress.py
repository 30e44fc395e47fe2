"""A Lightning callback that shows training progress in ecFlow: epoch meter, loss/ETA label, events.

Progress is a view of the training, never a reason to stop it: a meter or label the server does not
take (halted, restarting, unreachable) is logged and dropped, since an exception in a Lightning
callback would end the fit.
"""

from __future__ import annotations

import logging
import time

import pytorch_lightning as pl

from maelflow.reporting import Reporter


log = logging.getLogger(__name__)


class BestEffort:
    """``reporter`` whose calls never raise: a failure is logged (once per kind of call until one
    succeeds again) and the call returns None."""

    def __init__(self, reporter: Reporter):
        self._reporter = reporter
        self._failing: set[str] = set()

    def __getattr__(self, name: str):
        attr = getattr(self._reporter, name)
        if not callable(attr):
            return attr

        def call(*args, **kwargs):
            try:
                result = attr(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - progress must not end a training
                if name not in self._failing:
                    self._failing.add(name)
                    log.warning("ecFlow progress (%s) not sent: %s: %s", name, type(exc).__name__, exc)
                return None
            self._failing.discard(name)
            return result
        return call


class EcflowProgress(pl.Callback):
    def __init__(self, reporter: Reporter):
        self.reporter = reporter if isinstance(reporter, BestEffort) else BestEffort(reporter)
        self.t0 = time.monotonic()
        self.start_epoch = None

    def on_train_start(self, trainer, pl_module) -> None:
        self.t0 = time.monotonic()
        self.start_epoch = trainer.current_epoch
        self.reporter.meter("epoch", trainer.current_epoch)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = trainer.callback_metrics.get("train_loss_step")
        if loss is not None:
            self.reporter.throttled("label", "info", f"epoch {trainer.current_epoch} step {trainer.global_step} "
                                    f"loss {float(loss):.4g}", every=2.0)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        done = trainer.current_epoch + 1
        self.reporter.meter("epoch", done)
        elapsed = time.monotonic() - self.t0
        per_epoch = elapsed / max(done - (self.start_epoch or 0), 1)
        eta = per_epoch * max(trainer.max_epochs - done, 0) if trainer.max_epochs else 0
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.endswith("epoch") or k == "val_loss"}
        loss = metrics.get("train_loss_epoch")
        val = metrics.get("val_loss")
        text = f"epoch {done}/{trainer.max_epochs} step {trainer.global_step}"
        if loss is not None:
            text += f" loss {loss:.4g}"
        if val is not None:
            text += f" val {val:.4g}"
        self.reporter.label("info", f"{text} ETA {eta:.0f}s")

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        self.reporter.event("checkpoint")
        self.reporter.label("checkpoint", f"epoch {trainer.current_epoch} step {trainer.global_step}")

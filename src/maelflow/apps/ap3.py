"""AP3 (ECMWF): emulating radiative heating rates with a bidirectional LSTM over the levels.

MAELSTROM's AP3 emulates ecRad: a column model reads the profiles of a column and predicts its
heating rates, either a vertical (Bi)LSTM, which carries the fluxes' dependence on every layer above
and below, or an MLP. Here the BiLSTM on :mod:`maelflow.apps.ap3_data`: per level the temperature,
the log of the absorber and the cloud fraction, with the column's solar zenith angle, albedo and
surface temperature; out come the heating rates of every level.

Baseline: linear regression (least squares, fitted on the training columns) of all heating rates on
all inputs of the column. Score: the mean squared error of the heating rates ((K/day)^2), on the
held-out (latest) times.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from maelflow.apps import ap3_data
from maelflow.apps.common import held_out, read_anemoi
from maelflow.apps.nn import InMemoryData, SkillModule, seed_torch


def _standardise(a: np.ndarray, train: np.ndarray, axis) -> np.ndarray:
    mean = a[train].mean(axis=axis, keepdims=True)
    std = a[train].std(axis=axis, keepdims=True)
    return (a - mean) / np.where(std > 1e-8, std, 1.0)


class Columns(InMemoryData):
    """Per-level inputs (batch, levels, 6), heating rates (batch, levels) in units of ``hr_scale``,
    and the baseline's prediction of them."""

    def prepare(self, path: str):
        ds = read_anemoi(path)
        levels = int(ds.attrs["levels"])
        n_times, _, _, ncol = ds.data.shape
        train_t, val_t = held_out(n_times, self.val_fraction, minimum=1)

        def profile(name):  # (times * columns, levels)
            idx = [ds.index(v) for v in ap3_data.level_names(name, levels)]
            return ds.data[:, idx, 0, :].transpose(0, 2, 1).reshape(-1, levels).astype("float64")

        scalars = np.stack([ds.var(v)[:, 0, :].reshape(-1) for v in ap3_data.SCALARS], axis=1)
        rows = np.arange(n_times * ncol).reshape(n_times, ncol)
        train, val = rows[train_t].ravel(), rows[val_t].ravel()
        t = _standardise(profile("t"), train, axis=0)
        q = _standardise(np.log(np.maximum(profile("q"), 1e-9)), train, axis=0)
        cc = profile("cc")
        s = _standardise(scalars, train, axis=0)
        x = np.concatenate([np.stack([t, q, cc], axis=-1),
                            np.repeat(s[:, None, :], levels, axis=1)], axis=-1)   # (n, levels, 6)
        hr = profile(ap3_data.TARGET)
        scale = float(hr[train].std())
        y = hr / scale
        # the baseline: least squares of the heating rates on the column's inputs (and a constant)
        flat = np.concatenate([x.reshape(len(x), -1), np.ones((len(x), 1))], axis=1)
        coef, *_ = np.linalg.lstsq(flat[train], y[train], rcond=None)
        linear = flat @ coef
        tensors = [torch.from_numpy(a.astype("float32")) for a in (x, y, linear)]
        return (tuple(a[train] for a in tensors), tuple(a[val] for a in tensors),
                {"n_features": x.shape[-1], "hr_scale": scale})


class HeatingRateLSTM(SkillModule):
    def __init__(self, n_features: int = 6, hidden: int = 32, hr_scale: float = 1.0, lr: float = 3e-3,
                 seed: int = 0, threads: int | None = None, **_: object):
        super().__init__()
        self.save_hyperparameters("n_features", "hidden", "hr_scale", "lr", "seed")
        seed_torch(seed, threads)
        self.lstm = nn.LSTM(n_features, hidden, batch_first=True, bidirectional=True)
        self.head = nn.Sequential(nn.Linear(2 * hidden, hidden), nn.GELU(), nn.Linear(hidden, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Heating rates (batch, levels) in units of ``hr_scale`` K/day."""
        h, _ = self.lstm(x)
        return self.head(h).squeeze(-1)

    def loss(self, batch) -> torch.Tensor:
        x, y, _ = batch
        return nn.functional.mse_loss(self(x), y)

    def scores(self, batch):
        x, y, linear = batch
        k = self.hparams.hr_scale ** 2
        model = ((self(x) - y) ** 2).sum() * k
        base = ((linear - y) ** 2).sum() * k
        return model, base, y.numel()

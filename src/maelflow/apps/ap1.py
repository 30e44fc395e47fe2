"""AP1 (MET Norway): post-processing of NWP 2 m temperature with a quantile U-Net.

MAELSTROM's AP1 model is a 3-level U-Net trained with the quantile (pinball) loss at 0.1, 0.5 and
0.9 on 256-point patches of ten NWP predictors, predicting the observation-corrected temperature.
Here the same model (smaller) on :mod:`maelflow.apps.ap1_data`: it predicts a correction of the NWP
temperature (the median) and two positive offsets (the 0.1 and 0.9 quantiles, so they never cross).

Baseline: the raw NWP forecast, used as every quantile. Score: the mean pinball loss over the three
quantiles (K), on the held-out (latest) valid times.
"""

from __future__ import annotations

import torch
from torch import nn

from maelflow.apps import ap1_data
from maelflow.apps.common import read_anemoi, held_out
from maelflow.apps.nn import InMemoryData, SkillModule, UNet, seed_torch

QUANTILES = (0.1, 0.5, 0.9)


def pinball(pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Pinball loss per value, averaged over the quantiles: ``pred`` (batch, 3, ...), ``y`` (batch, ...)."""
    q = torch.tensor(QUANTILES, dtype=pred.dtype, device=pred.device).view(1, -1, *([1] * (pred.dim() - 2)))
    err = y.unsqueeze(1) - pred
    return torch.maximum(q * err, (q - 1) * err).mean(dim=1)


class GriddedPredictors(InMemoryData):
    """Normalised predictors (batch, 10, ny, nx), the NWP temperature and the target (batch, ny, nx)."""

    def prepare(self, path: str):
        ds = read_anemoi(path)
        ny, nx = ds.field_shape
        n = ds.data.shape[0]
        idx = [ds.index(v) for v in ap1_data.PREDICTORS]
        mean = ds.mean[idx][None, :, None]
        std = ds.stdev[idx][None, :, None]
        x = (ds.data[:, idx, 0, :] - mean) / (std + 1e-6)
        nwp = ds.var("nwp_2t")[:, 0]
        obs = ds.var(ap1_data.TARGET)[:, 0]
        tensors = [torch.from_numpy(a.reshape(n, *a.shape[1:-1], ny, nx).astype("float32")) for a in (x, nwp, obs)]
        train, val = held_out(n, self.val_fraction)
        return (tuple(t[train] for t in tensors), tuple(t[val] for t in tensors),
                {"n_predictors": len(idx)})


class QuantileUNet(SkillModule):
    def __init__(self, n_predictors: int = 10, width: int = 8, levels: int = 3, lr: float = 3e-3, seed: int = 0,
                 threads: int | None = None, **_: object):
        super().__init__()
        self.save_hyperparameters("n_predictors", "width", "levels", "lr", "seed")
        seed_torch(seed, threads)
        self.net = UNet(n_predictors, 3, width=width, levels=levels)

    def forward(self, x: torch.Tensor, nwp: torch.Tensor) -> torch.Tensor:
        """The 0.1, 0.5 and 0.9 quantiles of 2 m temperature (batch, 3, ny, nx), in K."""
        out = self.net(x)
        median = nwp + out[:, 1]
        low = median - nn.functional.softplus(out[:, 0])
        high = median + nn.functional.softplus(out[:, 2])
        return torch.stack([low, median, high], dim=1)

    def loss(self, batch) -> torch.Tensor:
        x, nwp, y = batch
        return pinball(self(x, nwp), y).mean()

    def scores(self, batch):
        x, nwp, y = batch
        model = pinball(self(x, nwp), y)
        base = pinball(nwp.unsqueeze(1).expand(-1, len(QUANTILES), -1, -1), y)
        return model.sum(), base.sum(), y.numel()

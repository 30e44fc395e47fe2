"""AP4 (ETH): ensemble post-processing with a U-Net trained on the CRPS.

MAELSTROM's AP4 trains a U-Net on ENS-10 to correct the ensemble's mean and spread, scoring the
resulting Gaussian forecast with the continuous ranked probability score (CRPS). Here the same on
:mod:`maelflow.apps.ap4_data` for 2 m temperature: from the ensemble mean and spread of 2 m
temperature, the means of T850 and Z500, and the position on the globe, the U-Net predicts a
correction of the mean and a factor on the spread (both zero, i.e. the raw ensemble, at the start).

Baseline: the raw ensemble as a Gaussian (its mean and standard deviation). Score: the Gaussian
CRPS (K), on the held-out (latest) forecasts.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from maelflow.apps import ap4_data
from maelflow.apps.common import held_out, read_anemoi
from maelflow.apps.nn import InMemoryData, SkillModule, UNet, seed_torch


def crps_gaussian(mu: torch.Tensor, sigma: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """CRPS of N(mu, sigma**2) for the outcome y, per value (closed form)."""
    z = (y - mu) / sigma
    pdf = torch.exp(-0.5 * z ** 2) / math.sqrt(2 * math.pi)
    cdf = 0.5 * (1 + torch.erf(z / math.sqrt(2)))
    return sigma * (z * (2 * cdf - 1) + 2 * pdf - 1 / math.sqrt(math.pi))


class EnsembleFields(InMemoryData):
    """Inputs (batch, 7, ny, nx); the ensemble mean and spread of 2 m temperature and the analysis."""

    def prepare(self, path: str):
        ds = read_anemoi(path)
        ny, nx = ds.field_shape
        n = ds.data.shape[0]
        train, val = held_out(n, self.val_fraction)
        ens = {v: ds.var(v).astype("float64") for v in ap4_data.FORECAST}      # (n, members, grid)
        mean = ens["2t"].mean(axis=1)
        spread = ens["2t"].std(axis=1, ddof=1) + 1e-3
        target = ds.var(ap4_data.TARGET)[:, 0].astype("float64")
        lat, lon = np.radians(ds.latitudes), np.radians(ds.longitudes)
        channels = [mean, spread, ens["t_850"].mean(axis=1), ens["z_500"].mean(axis=1)]
        channels = [(c - c[train].mean()) / (c[train].std() + 1e-9) for c in channels]
        static = [np.broadcast_to(a.ravel(), (n, ny * nx)) for a in (np.cos(lat), np.cos(lon), np.sin(lon))]
        x = np.stack(channels + static, axis=1).reshape(n, -1, ny, nx)
        tensors = [torch.from_numpy(a.astype("float32")) for a in
                   (x, mean.reshape(n, ny, nx), spread.reshape(n, ny, nx), target.reshape(n, ny, nx))]
        return (tuple(t[train] for t in tensors), tuple(t[val] for t in tensors), {"n_inputs": x.shape[1]})


class EnsembleUNet(SkillModule):
    def __init__(self, n_inputs: int = 7, width: int = 16, levels: int = 2, lr: float = 3e-3, seed: int = 0,
                 threads: int | None = None, **_: object):
        super().__init__()
        self.save_hyperparameters("n_inputs", "width", "levels", "lr", "seed")
        seed_torch(seed, threads)
        self.net = UNet(n_inputs, 2, width=width, levels=levels)
        torch.nn.init.zeros_(self.net.head.weight)
        torch.nn.init.zeros_(self.net.head.bias)

    def forward(self, x: torch.Tensor, mean: torch.Tensor, spread: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and standard deviation of the post-processed Gaussian forecast (batch, ny, nx)."""
        out = self.net(x)
        return mean + out[:, 0], spread * torch.exp(out[:, 1].clamp(-5, 5))

    def loss(self, batch) -> torch.Tensor:
        x, mean, spread, y = batch
        return crps_gaussian(*self(x, mean, spread), y).mean()

    def scores(self, batch):
        x, mean, spread, y = batch
        return crps_gaussian(*self(x, mean, spread), y).sum(), crps_gaussian(mean, spread, y).sum(), y.numel()

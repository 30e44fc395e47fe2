"""AP5 (JSC): downscaling 2 m temperature with a U-Net that knows the orography.

MAELSTROM's AP5 Tier-1 downscales IFS 2 m temperature from 0.8 to 0.1 degree with a U-Net (Tier-2,
ERA5 to COSMO-REA6, uses a WGAN of about 9 M parameters). Here the U-Net on
:mod:`maelflow.apps.ap5_data`: from the coarse field interpolated to the fine grid and the fine
orography, it predicts what the interpolation misses.

Baseline: bilinear interpolation of the coarse field, the usual first guess of downscaling. Score:
the mean squared error (K^2), on the held-out (latest) days.
"""

from __future__ import annotations

import torch
from torch import nn

from maelflow.apps.common import held_out, read_anemoi
from maelflow.apps.nn import InMemoryData, SkillModule, UNet, seed_torch


def bilinear(coarse_on_fine: torch.Tensor, factor: int) -> torch.Tensor:
    """Bilinear interpolation to the fine grid of a block-constant field (batch, ny, nx)."""
    blocks = nn.functional.avg_pool2d(coarse_on_fine.unsqueeze(1), factor)
    return nn.functional.interpolate(blocks, size=coarse_on_fine.shape[-2:], mode="bilinear",
                                     align_corners=False).squeeze(1)


class CoarseAndOrography(InMemoryData):
    """Inputs (batch, 2, ny, nx): interpolated coarse field and orography, standardised; the
    interpolated field (K) and the fine target (K)."""

    def prepare(self, path: str):
        ds = read_anemoi(path)
        ny, nx = ds.field_shape
        n = ds.data.shape[0]
        factor = int(ds.attrs["coarsening_factor"])
        train, val = held_out(n, self.val_fraction)
        coarse = torch.from_numpy(ds.var("2t_coarse")[:, 0].reshape(n, ny, nx).astype("float32"))
        interp = bilinear(coarse, factor)
        fine = torch.from_numpy(ds.var("2t")[:, 0].reshape(n, ny, nx).astype("float32"))
        oro = ds.var("orography")[:, 0].reshape(n, ny, nx).astype("float32")
        oro = torch.from_numpy((oro - oro.mean()) / (oro.std() + 1e-6))
        t_mean, t_std = float(interp[train].mean()), float(interp[train].std())
        x = torch.stack([(interp - t_mean) / t_std, oro], dim=1)
        tensors = (x, interp, fine)
        return (tuple(t[train] for t in tensors), tuple(t[val] for t in tensors), {"n_inputs": 2})


class DownscalingUNet(SkillModule):
    def __init__(self, n_inputs: int = 2, width: int = 16, levels: int = 3, lr: float = 3e-3, seed: int = 0,
                 threads: int | None = None, **_: object):
        super().__init__()
        self.save_hyperparameters("n_inputs", "width", "levels", "lr", "seed")
        seed_torch(seed, threads)
        self.net = UNet(n_inputs, 1, width=width, levels=levels)

    def forward(self, x: torch.Tensor, interp: torch.Tensor) -> torch.Tensor:
        """Fine 2 m temperature (batch, ny, nx), K."""
        return interp + self.net(x)[:, 0]

    def loss(self, batch) -> torch.Tensor:
        x, interp, y = batch
        return nn.functional.mse_loss(self(x, interp), y)

    def scores(self, batch):
        x, interp, y = batch
        return ((self(x, interp) - y) ** 2).sum(), ((interp - y) ** 2).sum(), y.numel()


"""AP6 (4cast): wind and solar power from the weather fields, through a small CNN embedding.

MAELSTROM's AP6 relates weather regimes to renewable production: gradient boosting on IFS fields
(NMAE wind 12 %, solar 7 %) and a DCv2 (DeepCluster v2, ResNet-50 backbone) clustering of the
fields into regimes. Here the regression on :mod:`maelflow.apps.ap6_data`: a tiny CNN (the stand-in
for DCv2's backbone) embeds a day's Z500, 10 m wind and cloud fields, and a head turns the
embedding into the day's wind and solar capacity factors. The planted regimes are stored with the
data for checking a clustering of the embeddings; this application's check is the power.

Baseline: climatology, the training days' mean capacity factors. Score: the mean absolute error of
the capacity factors, i.e. the NMAE (normalised by capacity), on the held-out (latest) days.
"""

from __future__ import annotations

import torch
from torch import nn

from maelflow.apps import ap6_data
from maelflow.apps.common import held_out, read_anemoi
from maelflow.apps.nn import InMemoryData, SkillModule, seed_torch


class DailyFields(InMemoryData):
    """Fields (batch, 4, ny, nx), standardised per variable; capacity factors (batch, 2)."""

    def prepare(self, path: str):
        ds = read_anemoi(path)
        ny, nx = ds.field_shape
        n = ds.data.shape[0]
        train, val = held_out(n, self.val_fraction)
        x = ds.data[:, :, 0, :].astype("float64")
        mean = x[train].mean(axis=(0, 2), keepdims=True)
        std = x[train].std(axis=(0, 2), keepdims=True) + 1e-9
        x = ((x - mean) / std).reshape(n, len(ds.variables), ny, nx)
        power = ds.extra["power"].astype("float64")
        tensors = [torch.from_numpy(a.astype("float32")) for a in (x, power)]
        return (tuple(t[train] for t in tensors), tuple(t[val] for t in tensors),
                {"n_fields": x.shape[1], "field_shape": [ny, nx],
                 "climatology": power[train].mean(axis=0).tolist()})


class PowerCNN(SkillModule):
    def __init__(self, n_fields: int = 4, field_shape: list[int] | tuple[int, int] = (32, 48), width: int = 16,
                 embedding: int = 32, climatology: list[float] | None = None, lr: float = 2e-3, seed: int = 0,
                 threads: int | None = None, **_: object):
        super().__init__()
        self.save_hyperparameters("n_fields", "field_shape", "width", "embedding", "climatology", "lr", "seed")
        seed_torch(seed, threads)
        ny, nx = field_shape
        self.backbone = nn.Sequential(
            nn.Conv2d(n_fields, width, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1), nn.GELU(),
            nn.Flatten(), nn.LazyLinear(embedding), nn.GELU())
        self.backbone(torch.zeros(1, n_fields, ny, nx))   # materialise the lazy layer before Lightning sees it
        self.head = nn.Linear(embedding, len(ap6_data.POWER))
        self.register_buffer("climatology", torch.tensor(climatology or [0.5] * len(ap6_data.POWER)))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """A day's embedding (batch, embedding): what a regime clustering would cluster."""
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Capacity factors (batch, 2) of wind and solar, in [0, 1]."""
        return torch.sigmoid(self.head(self.embed(x)))

    def loss(self, batch) -> torch.Tensor:
        x, y = batch
        return nn.functional.l1_loss(self(x), y)

    def scores(self, batch):
        x, y = batch
        model = (self(x) - y).abs().sum()
        base = (self.climatology.unsqueeze(0) - y).abs().sum()
        return model, base, y.numel()


"""What the six MAELSTROM applications share on the training side: the base LightningModule that
scores a model against its baseline on held-out data, seeded data loaders, and a small U-Net.

``skill_vs_baseline`` (see :mod:`maelflow.apps.common`) is logged at the end of every validation
run, so the run's latest value is the skill of the trained model; ``val_score`` and
``baseline_score`` beside it are the two scores it compares.
"""

from __future__ import annotations

import numpy as np
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from maelflow.apps.common import SKILL_METRIC, skill


def seed_torch(seed: int, threads: int | None = None) -> None:
    """Same seed, same initial weights: an application's skill must not depend on luck.

    ``threads`` caps torch's intra-op threads. At the test sizes one thread is fastest: measured on
    2 shared cores, a step of AP1's U-Net took 40 ms on one thread and 1 s on two while other
    processes ran (OpenMP threads spinning against each other), and the local site runs two
    trainings at once.
    """
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))
    if threads:
        torch.set_num_threads(int(threads))


def loader(tensors: tuple[torch.Tensor, ...], batch_size: int, *, shuffle: bool, seed: int = 0) -> DataLoader:
    """A DataLoader over in-memory tensors (the datasets are small), its shuffling seeded."""
    gen = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(TensorDataset(*tensors), batch_size=batch_size, shuffle=shuffle, generator=gen)


class InMemoryData(pl.LightningDataModule):
    """A DataModule whose ``prepare(path)`` returns (training tensors, held-out tensors, model
    keyword arguments); read once, even though the launcher and Lightning both call ``setup``.

    The model keyword arguments are what the data decide (sizes, scales, a vocabulary's size): the
    launcher calls ``Model(**config, **model_kwargs)``, so they must never repeat a config key.
    """

    def __init__(self, dataset_paths: list[str], batch_size: int = 16, val_fraction: float = 0.2, seed: int = 0,
                 **_: object):
        """Keyword arguments meant for the model (the training's ``config`` goes to both) are ignored."""
        super().__init__()
        if not dataset_paths:
            raise ValueError(f"{type(self).__name__} needs its dataset (the training's 'datasets')")
        self.path = dataset_paths[0]
        self.batch_size = int(batch_size)
        self.val_fraction = float(val_fraction)
        self.seed = int(seed)
        self.train_tensors: tuple[torch.Tensor, ...] | None = None
        self.val_tensors: tuple[torch.Tensor, ...] = ()
        self.model_kwargs: dict = {}

    def prepare(self, path: str) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...], dict]:
        raise NotImplementedError  # pragma: no cover - abstract

    def setup(self, stage: str | None = None) -> None:
        if self.train_tensors is None:
            self.train_tensors, self.val_tensors, self.model_kwargs = self.prepare(self.path)

    def train_dataloader(self) -> DataLoader:
        return loader(self.train_tensors, self.batch_size, shuffle=True, seed=self.seed)

    def val_dataloader(self) -> DataLoader:
        return loader(self.val_tensors, max(self.batch_size, 64), shuffle=False)


class SkillModule(pl.LightningModule):
    """A LightningModule scored against a simple baseline on its held-out data.

    Subclasses implement ``loss(batch)`` (what is minimised) and ``scores(batch)``: the sums over
    the batch of the model's and the baseline's score and the number of values summed. Each
    validation run logs ``val_loss``, ``val_score``, ``baseline_score`` and ``skill_vs_baseline``.
    """

    def __init__(self) -> None:
        super().__init__()
        self._sums = [0.0, 0.0, 0]

    def loss(self, batch) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def scores(self, batch) -> tuple[torch.Tensor, torch.Tensor, int]:  # pragma: no cover - abstract
        raise NotImplementedError

    def training_step(self, batch, batch_idx):
        loss = self.loss(batch)
        self.log("train_loss", loss, prog_bar=True, on_step=True, on_epoch=True)
        return loss

    def on_validation_epoch_start(self) -> None:
        self._sums = [0.0, 0.0, 0]

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.loss(batch), on_epoch=True, prog_bar=True)
        model, base, n = self.scores(batch)
        self._sums[0] += float(model)
        self._sums[1] += float(base)
        self._sums[2] += int(n)

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        # summed over every process's share of the held-out data (one process: as it is)
        sums = self.trainer.strategy.reduce(torch.tensor(self._sums, dtype=torch.float64, device=self.device),
                                            reduce_op="sum")
        model, base, n = (float(v) for v in sums)
        if not n:
            return
        model, base = model / n, base / n
        self.log("val_score", model)
        self.log("baseline_score", base)
        self.log(SKILL_METRIC, skill(model, base))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.GELU(),
                         nn.Conv2d(c_out, c_out, 3, padding=1), nn.GELU())


class UNet(nn.Module):
    """A U-Net of ``levels`` levels (2x2 pooling down, bilinear up to each skip connection's size, so
    any grid size works): the model of AP1, AP4 and AP5."""

    def __init__(self, c_in: int, c_out: int, width: int = 16, levels: int = 3):
        super().__init__()
        widths = [width * 2**i for i in range(levels)]
        self.down = nn.ModuleList()
        c = c_in
        for w in widths:
            self.down.append(_block(c, w))
            c = w
        self.up = nn.ModuleList(_block(widths[i + 1] + widths[i], widths[i]) for i in reversed(range(levels - 1)))
        self.head = nn.Conv2d(widths[0], c_out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, block in enumerate(self.down):
            if i:
                x = nn.functional.max_pool2d(x, 2)
            x = block(x)
            skips.append(x)
        for block, skip in zip(self.up, reversed(skips[:-1])):
            x = nn.functional.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = block(torch.cat([x, skip], dim=1))
        return self.head(x)

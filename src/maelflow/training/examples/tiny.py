"""A tiny Lightning application that trains on CPU in seconds, for the demo and the tests.

It predicts the next 6-hourly state from the current one on any anemoi-layout zarr: a per-variable
linear correction of persistence, shared over grid points. Small enough to be quick, real enough to
show a falling loss, checkpoints and resumption.
"""

from __future__ import annotations

import time

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset


class _Pairs(Dataset):
    def __init__(self, data: np.ndarray, mean: np.ndarray, std: np.ndarray):
        self.x = torch.from_numpy(((data - mean[None, :, None]) / std[None, :, None]).astype("float32"))

    def __len__(self) -> int:
        return self.x.shape[0] - 1

    def __getitem__(self, i: int):
        return self.x[i], self.x[i + 1]


class ZarrPairs(pl.LightningDataModule):
    def __init__(self, dataset_paths: list[str], batch_size: int = 8, val_fraction: float = 0.2, **_: object):
        super().__init__()
        self.path = dataset_paths[0]
        self.batch_size = batch_size
        self.val_fraction = val_fraction

    def setup(self, stage: str | None = None) -> None:
        import zarr

        root = zarr.open_group(self.path, mode="r")
        data = np.asarray(root["data"][:, :, 0, :])
        mean, std = np.asarray(root["mean"]), np.asarray(root["stdev"])
        n_val = max(2, int(len(data) * self.val_fraction))
        self.train_set = _Pairs(data[:-n_val], mean, std)
        self.val_set = _Pairs(data[-n_val:], mean, std)
        self.model_kwargs = {"n_variables": data.shape[1]}

    def train_dataloader(self):
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self):
        return DataLoader(self.val_set, batch_size=self.batch_size)


class TinyForecaster(pl.LightningModule):
    def __init__(self, n_variables: int = 4, lr: float = 0.01, step_seconds: float = 0.0, **_: object):
        """``step_seconds`` paces each training step, to stand in for a heavier model (time limits)."""
        super().__init__()
        self.save_hyperparameters("n_variables", "lr")
        self.step_seconds = step_seconds
        self.mix = torch.nn.Linear(n_variables, n_variables)
        torch.nn.init.zeros_(self.mix.weight)
        torch.nn.init.zeros_(self.mix.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (batch, variables, grid)
        return x + self.mix(x.transpose(1, 2)).transpose(1, 2)

    def _loss(self, batch):
        x, y = batch
        return torch.nn.functional.mse_loss(self(x), y)

    def training_step(self, batch, batch_idx):
        if self.step_seconds:
            time.sleep(self.step_seconds)
        loss = self._loss(batch)
        self.log("train_loss", loss, prog_bar=True, on_step=True, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self._loss(batch), prog_bar=True, on_epoch=True)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)

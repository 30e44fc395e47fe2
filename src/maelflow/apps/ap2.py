"""AP2 (4cast): does it rain where a message was written? A small Transformer classifier.

MAELSTROM's AP2 fine-tunes DeBERTa-v3-small (learning rate 3e-5, one epoch) on tweets labelled by
ERA5 precipitation. Pretrained weights cannot be downloaded here, so the model is a 2-layer
Transformer encoder (d=64, 4 heads) trained from scratch on :mod:`maelflow.apps.ap2_data`, with a
word vocabulary built from the training messages; the same launch, config and metrics would carry a
hub model on a site that has its weights.

Baseline: climatology, the training messages' rain rate as the probability of every held-out
message. Score: the log loss (binary cross-entropy).
"""

from __future__ import annotations

import re

import numpy as np
import torch
from torch import nn

from maelflow.apps.common import held_out, read_arrays
from maelflow.apps.nn import InMemoryData, SkillModule, seed_torch

PAD, UNK = 0, 1
WORD = re.compile(r"[a-z#!]+")


def tokens(text: str) -> list[str]:
    return WORD.findall(text.lower())


def vocabulary(texts) -> dict[str, int]:
    """Word ids of the training texts (0 pads, 1 is an unknown word), in first-seen order."""
    vocab: dict[str, int] = {}
    for text in texts:
        for w in tokens(text):
            vocab.setdefault(w, len(vocab) + 2)
    return vocab


def encode(texts, vocab: dict[str, int], max_len: int) -> np.ndarray:
    out = np.zeros((len(texts), max_len), dtype="int64")
    for i, text in enumerate(texts):
        ids = [vocab.get(w, UNK) for w in tokens(text)][:max_len]
        out[i, :len(ids)] = ids
    return out


class LabelledMessages(InMemoryData):
    """Token ids (batch, max_len) and labels (batch,); the vocabulary is the training split's."""

    def __init__(self, dataset_paths: list[str], max_len: int = 20, **kwargs):
        super().__init__(dataset_paths, **kwargs)
        self.max_len = int(max_len)

    def prepare(self, path: str):
        arrays, _ = read_arrays(path)
        texts = [str(t) for t in arrays["text"]]
        labels = arrays["label"].astype("float32")
        train, val = held_out(len(texts), self.val_fraction)
        vocab = vocabulary(texts[i] for i in train)
        ids = torch.from_numpy(encode(texts, vocab, self.max_len))
        y = torch.from_numpy(labels)
        return ((ids[train], y[train]), (ids[val], y[val]),
                {"vocab_size": len(vocab) + 2, "rain_rate": float(labels[train].mean())})


class RainClassifier(SkillModule):
    def __init__(self, vocab_size: int = 256, max_len: int = 20, rain_rate: float = 0.5, d_model: int = 64,
                 heads: int = 4, layers: int = 2, lr: float = 2e-3, seed: int = 0, threads: int | None = None,
                 **_: object):
        super().__init__()
        self.save_hyperparameters("vocab_size", "max_len", "rain_rate", "d_model", "heads", "layers", "lr", "seed")
        seed_torch(seed, threads)
        self.embed = nn.Embedding(vocab_size, d_model, padding_idx=PAD)
        self.position = nn.Parameter(torch.zeros(1, max_len, d_model))
        layer = nn.TransformerEncoderLayer(d_model, heads, dim_feedforward=2 * d_model, dropout=0.1,
                                           batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, 1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """The logit of rain for each message (batch,)."""
        pad = ids == PAD
        h = self.encoder(self.embed(ids) + self.position[:, :ids.shape[1]], src_key_padding_mask=pad)
        keep = (~pad).unsqueeze(-1).float()
        pooled = (h * keep).sum(1) / keep.sum(1).clamp(min=1)
        return self.head(pooled).squeeze(-1)

    def loss(self, batch) -> torch.Tensor:
        ids, y = batch
        return nn.functional.binary_cross_entropy_with_logits(self(ids), y)

    def scores(self, batch):
        ids, y = batch
        model = nn.functional.binary_cross_entropy_with_logits(self(ids), y, reduction="sum")
        p = torch.full_like(y, min(max(self.hparams.rain_rate, 1e-6), 1 - 1e-6))
        base = nn.functional.binary_cross_entropy(p, y, reduction="sum")
        return model, base, y.numel()

"""A fine-tuning cycle's warm start, on the launcher's side: what ``warm_start.json`` (written into
the run folder by the cycle's ``warmstart`` task, maelflow.operations.finetune) sets in the anemoi
configuration: the cycle's date splits, and the champion's weights to start from."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

WARM_START_FILE = "warm_start.json"


def read_warm_start(out: Path) -> dict | None:
    path = Path(out) / WARM_START_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def apply_warm_start(cfg, out: Path, *, resuming: bool) -> dict[str, Any] | None:
    """What a fine-tuning cycle's ``warm_start.json`` sets in the anemoi config ``cfg`` (none without one).

    The dates of the three splits always; the warm start (weights only) unless the job resumes its
    own checkpoint (a resubmission after a time limit). Returns the record, with ``metadata`` to add
    to the checkpoint's metadata (``parent_uuid``, ``maelflow_warm_start``)."""
    from omegaconf import OmegaConf

    record = read_warm_start(out)
    if record is None:
        return None
    for split, (start, end) in record["dates"].items():
        node = OmegaConf.select(cfg, f"dataloader.{split}.datasets", default=None)
        for name in (node or {"data": None}):
            OmegaConf.update(cfg, f"dataloader.{split}.datasets.{name}.start", start, force_add=True)
            OmegaConf.update(cfg, f"dataloader.{split}.datasets.{name}.end", end, force_add=True)
    if not resuming:
        OmegaConf.update(cfg, "system.input.warm_start", record["warm_start"], force_add=True)
        OmegaConf.update(cfg, "training.load_weights_only", True, force_add=True)
    parent = None
    try:
        from anemoi.utils.checkpoints import load_metadata

        parent = load_metadata(record["checkpoint"]).get("uuid")
    except Exception:  # noqa: BLE001 - provenance only: the warm start itself is what matters
        parent = None
    record["metadata"] = {"parent_uuid": parent,
                          "maelflow_warm_start": {k: record.get(k) for k in
                                                  ("model", "alias", "version", "weights", "sha256", "checkpoint",
                                                   "warm_start", "warm_start_sha256", "cycle", "dates")}}
    return record

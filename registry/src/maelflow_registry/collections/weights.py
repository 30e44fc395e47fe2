"""Checkpoints ("weights" in anemoi-registry's protocol), by uuid, with their copies and anemoi metadata.

A checkpoint's metadata names its run (``run_id``), its parent checkpoint (``parent_uuid``), the run
it was forked from (``fork_run_id``) and the datasets it was trained on: nobody declares lineage
separately. Edges: training -produced-> checkpoint (through the run when the training is not named),
dataset -trained-on-> that training, parent checkpoint -parent-of-> checkpoint. Like datasets, a new
checkpoint gets an empty ``locations`` object for the client's ``add /locations/<platform>``.
"""

from __future__ import annotations

from typing import Any

from maelflow_registry.collections.base import Cell, Collection, human_size
from maelflow_registry.refs import Edges, datasets_used, dig, first_key, metadata, ref, run_ref

COLLECTION = "weights"


class Weights(Collection):
    name = COLLECTION
    main_key = "uuid"
    title, singular = "Checkpoints", "Checkpoint"
    aliases = ("checkpoints",)
    defaults = {"locations": dict}
    has_locations = True
    column, colour = 2, "#dcfce7"
    list_headers = ("Uuid", "Run id", "Training", "Datasets", "Size", "Locations", "Registered")

    def edges(self, key: str, record: dict) -> list[tuple[str, str, str]]:
        me, md, out = ref(self.name, key), metadata(record), Edges()
        training = first_key(record.get("training"), md.get("training"))
        run = first_key(record.get("run_id"), md.get("run_id"), dig(md, "config", "training", "run_id"))
        producer = ref("trainings", training) if training else (run_ref(run) if run else None)
        if producer:
            out.add(producer, "produced", me)
        for name in datasets_used(record):
            # the run consumed the dataset; without a known run the checkpoint itself is the consumer
            out.add(ref("datasets", name), "trained-on", producer or me)
        parent = first_key(record.get("parent_uuid"), md.get("parent_uuid"))
        if parent:
            out.add(ref(self.name, parent), "parent-of", me)
        fork = first_key(record.get("fork_run_id"), md.get("fork_run_id"), record.get("fork"),
                         dig(md, "config", "training", "fork_run_id"))
        if fork and producer:
            out.add(run_ref(fork), "forked-into", producer)
        return list(out)

    def list_row(self, row: dict, index: Any) -> list[Cell]:
        rec, key, md = row["record"], row["key"], metadata(row["record"])
        return [(key, self.link(key)), (md.get("run_id") or rec.get("run_id") or "", None),
                (rec.get("training") or md.get("training") or "", None), (", ".join(datasets_used(rec)), None),
                (human_size(md.get("size")), None), (", ".join(sorted(rec.get("locations") or {})), None),
                (row["created"][:19], None)]


collection = Weights()

"""Experiments: anemoi-registry's evaluation experiments, by ``expver``, with their plots and checkpoints.

The client appends to ``plots`` and ``checkpoints`` with JSON-patch ``add /plots/-``, so a new
experiment gets both as empty lists. Edge: checkpoint -evaluated-in-> experiment.
"""

from __future__ import annotations

from typing import Any

from maelflow_registry.collections.base import Cell, Collection
from maelflow_registry.refs import Edges, metadata, ref, uuids

COLLECTION = "experiments"


class Experiments(Collection):
    name = COLLECTION
    main_key = "expver"
    title, singular = "Experiments", "Experiment"
    defaults = {"plots": list, "checkpoints": list}
    column, colour = 3, "#fee2e2"
    list_headers = ("Expver", "Owner", "Checkpoints", "Plots", "Runs", "Updated")

    def edges(self, key: str, record: dict) -> list[tuple[str, str, str]]:
        out = Edges()
        for uuid in uuids(record.get("checkpoints")):
            out.add(ref("weights", uuid), "evaluated-in", ref(self.name, key))
        return list(out)

    def list_row(self, row: dict, index: Any) -> list[Cell]:
        rec, key, md = row["record"], row["key"], metadata(row["record"])
        return [(key, self.link(key)), (rec.get("owner") or md.get("owner") or md.get("user") or "", None),
                (len(rec.get("checkpoints") or []), None), (len(rec.get("plots") or []), None),
                (len(rec.get("runs") or {}), None), (row["updated"][:19], None)]


collection = Experiments()

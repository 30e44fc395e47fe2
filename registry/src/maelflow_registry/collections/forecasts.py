"""Forecasts: one output of an operational forecast cycle, by key, with the model version that made it.

A forecast names the model, the version and the alias it was resolved through at run time
(``model``, ``version``, ``alias``), the checkpoint that version is (``weights``), the dataset its
initial conditions came from (``initial_conditions.dataset``), its cycle (``cycle``: the initial
date) and where its output was published (``locations``, as for datasets). Its lineage is therefore
forecast <- model version <- checkpoint <- training <- dataset, without anyone declaring it.
Edges: model -made-vN-> forecast, checkpoint -ran-> forecast, dataset -initial-conditions-> forecast.
A forecast is a record of what happened: it is written once and never changed, except to add
locations (a copy published elsewhere).
"""

from __future__ import annotations

from typing import Any

from maelflow_registry.collections.base import Cell, Collection
from maelflow_registry.config import Settings
from maelflow_registry.errors import Conflict, Unprocessable
from maelflow_registry.refs import Edges, dataset_name, dig, first_key, ref

COLLECTION = "forecasts"
FIXED = ("model", "version", "alias", "weights", "cycle", "initial_conditions", "lead_time", "produced")


class Forecasts(Collection):
    name = COLLECTION
    main_key = "name"
    title, singular = "Forecasts", "Forecast"
    defaults = {"locations": dict}
    has_locations = True
    column, colour = 4, "#e0f2fe"
    page = "forecast.html"
    list_headers = ("Name", "Cycle", "Model", "Version", "Alias", "Output", "Produced")

    def check(self, key: str, record: dict, old: dict | None, *, settings: Settings, creating: bool) -> None:
        if not isinstance(record.get("model"), str) or not first_key(record.get("model")):
            raise Unprocessable("a forecast needs 'model': the name of the model that made it")
        version = record.get("version")
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise Unprocessable("a forecast needs 'version': the model version (a positive whole number) that made it")
        if not isinstance(record.get("cycle"), str):
            raise Unprocessable("a forecast needs 'cycle': its initial date and time (ISO 8601)")
        for field in ("weights", "alias"):
            if record.get(field) is not None and not isinstance(record.get(field), str):
                raise Unprocessable(f"a forecast's '{field}' must be a string")
        if old is not None:
            changed = [f for f in FIXED if old.get(f) != record.get(f)]
            if changed:
                raise Conflict(f"a forecast records what made it: {', '.join(changed)} cannot be changed "
                               "(register a new forecast instead)")

    def edges(self, key: str, record: dict) -> list[tuple[str, str, str]]:
        me, out = ref(self.name, key), Edges()
        model, version = first_key(record.get("model")), record.get("version")
        if model and isinstance(version, int):
            out.add(ref("models", model), f"made-v{version}", me)
        weights = first_key(record.get("weights"))
        if weights:
            out.add(ref("weights", weights), "ran", me)
        ds = dataset_name(dig(record, "initial_conditions", "dataset"))
        if ds:
            out.add(ref("datasets", ds), "initial-conditions", me)
        return list(out)

    def label(self, key: str, record: dict) -> str:
        return f"{key} ({record.get('model')} v{record.get('version')})"

    def list_row(self, row: dict, index: Any) -> list[Cell]:
        rec, key = row["record"], row["key"]
        model = rec.get("model") if isinstance(rec.get("model"), str) else ""
        where = ", ".join(sorted(rec.get("locations") or {}))
        return [(key, self.link(key)), (rec.get("cycle") or "", None),
                (model, f"/models/{model}" if first_key(model) else None), (f"v{rec.get('version')}", None),
                (rec.get("alias") or "", None), (where, None), ((rec.get("produced") or row["created"])[:19], None)]


collection = Forecasts()

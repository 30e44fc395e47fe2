"""Trainings: one anemoi-training run (or chain of runs) by name, with its run_id, datasets and checkpoints.

The anemoi-registry client PUTs trainings by name; maelflow's suite registers each training it ran,
with its MLflow link. A training is also known by its ``run_id``: checkpoints name their run, not
the training, so the lineage reference ``trainings@run_id:RUN`` finds it (registered before or after
them). Edges: dataset -trained-on-> training -produced-> checkpoint, and fork/parent links.
"""

from __future__ import annotations

import urllib.parse
from typing import Any

from maelflow_registry.collections.base import Cell, Collection
from maelflow_registry.refs import Edges, datasets_used, dig, first_key, metadata, ref, run_ref, uuids

COLLECTION = "trainings"


def safe_url(url: Any) -> str | None:
    """Only http(s) links are rendered: a record is user data, and 'javascript:' must not become a link."""
    if isinstance(url, str) and urllib.parse.urlsplit(url).scheme in ("http", "https"):
        return url
    return None


def mlflow_link(record: dict) -> str | None:
    """The run's MLflow page: given as a URL, or made from tracking URI, experiment and run ids."""
    for source in (record, metadata(record)):
        for candidate in (source.get("mlflow_url"), dig(source, "mlflow", "url")):
            if safe_url(candidate):
                return candidate
        uri, exp, run = (dig(source, "mlflow", "tracking_uri"), dig(source, "mlflow", "experiment_id"),
                         dig(source, "mlflow", "run_id"))
        if safe_url(uri) and exp is not None and run:
            return f"{uri.rstrip('/')}/#/experiments/{urllib.parse.quote(str(exp))}/runs/{urllib.parse.quote(str(run))}"
    return None


class Trainings(Collection):
    name = COLLECTION
    main_key = "name"
    title, singular = "Trainings", "Training"
    column, colour = 1, "#fef3c7"
    list_headers = ("Name", "Status", "Owner", "Run id", "Datasets", "Weights", "MLflow", "Updated")

    def run_ids(self, record: dict) -> list[str]:
        md = metadata(record)
        rid = first_key(record.get("run_id"), md.get("run_id"), dig(md, "config", "training", "run_id"))
        return [rid] if rid else []

    def edges(self, key: str, record: dict) -> list[tuple[str, str, str]]:
        me, md, out = ref(self.name, key), metadata(record), Edges()
        for name in datasets_used(record):
            out.add(ref("datasets", name), "trained-on", me)
        for src in (record, md):
            for fieldname in ("checkpoints", "weights"):
                for uuid in uuids(src.get(fieldname)):
                    out.add(me, "produced", ref("weights", uuid))
        fork = first_key(record.get("fork_run_id"), md.get("fork_run_id"), record.get("fork"), md.get("fork"),
                         dig(md, "config", "training", "fork_run_id"))
        if fork:
            out.add(run_ref(fork), "forked-into", me)
        parent = first_key(record.get("parent_uuid"), md.get("parent_uuid"))
        if parent:
            out.add(ref("weights", parent), "started-from", me)
        return list(out)

    def label(self, key: str, record: dict) -> str:
        return f"{key} ({record['status']})" if isinstance(record.get("status"), str) else key

    def produced(self, key: str, record: dict, index: Any) -> list[str]:
        """Checkpoint uuids it produced (declared by it, or by checkpoints naming its run)."""
        return index.targets(self.refs(key, record), "produced", "weights")

    def list_row(self, row: dict, index: Any) -> list[Cell]:
        rec, key, md = row["record"], row["key"], metadata(row["record"])
        mlflow = mlflow_link(rec)
        return [(key, self.link(key)), (rec.get("status") or md.get("status") or "", None),
                (rec.get("owner") or md.get("owner") or rec.get("user") or "", None),
                (rec.get("run_id") or md.get("run_id") or "", None), (", ".join(datasets_used(rec)), None),
                (len(self.produced(key, rec, index)), None), ("MLflow" if mlflow else "", mlflow),
                (row["updated"][:19], None)]

    def page_context(self, key: str, record: dict, index: Any) -> dict:
        return {"mlflow": mlflow_link(record), "produced": self.produced(key, record, index),
                "benchmarks": index.targets(self.refs(key, record), "benchmarked-in", "benchmarks")}


collection = Trainings()

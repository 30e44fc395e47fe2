"""Benchmarks: one comparison of training runs across sites (a benchmark family's report), by name.

maelflow's benchmark report task writes the report (tables, plots) as a self-contained HTML page
among the artefacts and registers this entry, naming every run it compared and the training
entries they belong to. Edges: training -benchmarked-in-> benchmark (by the training's key and by
each run id), so a training's page lists the comparisons it appears in, and the benchmark's page
links the report.
"""

from __future__ import annotations

import urllib.parse
from typing import Any

from maelflow_registry.collections.base import Cell, Collection
from maelflow_registry.config import Settings
from maelflow_registry.errors import Unprocessable
from maelflow_registry.keys import check_artefact_path, check_key
from maelflow_registry.refs import Edges, ref, run_ref

COLLECTION = "benchmarks"


def report_link(record: dict) -> str | None:
    """The web path of the report page (artefacts are served under /artefacts/)."""
    path = record.get("report")
    return "/artefacts/" + urllib.parse.quote(path) if isinstance(path, str) and path else None


class Benchmarks(Collection):
    name = COLLECTION
    main_key = "name"
    title, singular = "Benchmarks", "Benchmark"
    defaults = {"runs": list, "trainings": list, "sites": list}
    column, colour = 2, "#dcfce7"
    page = "benchmark.html"
    list_headers = ("Name", "Experiment", "Sites", "Runs", "Headline", "Updated")

    def check(self, key: str, record: dict, old: dict | None, *, settings: Settings, creating: bool) -> None:
        runs, trainings = record.get("runs"), record.get("trainings")
        if not isinstance(runs, list) or not all(isinstance(r, dict) and isinstance(r.get("run_id"), str)
                                                 for r in runs):
            raise Unprocessable("a benchmark needs 'runs': a list of objects with a 'run_id'")
        if not isinstance(trainings, list) or not all(isinstance(t, str) for t in trainings):
            raise Unprocessable("a benchmark's 'trainings' must be a list of training entry keys")
        for t in trainings:
            check_key(t)
        if record.get("report") is not None:
            if not isinstance(record["report"], str):
                raise Unprocessable("a benchmark's 'report' must be an artefact path")
            check_artefact_path(record["report"])

    def edges(self, key: str, record: dict) -> list[tuple[str, str, str]]:
        me, out = ref(self.name, key), Edges()
        for training in record.get("trainings") or []:
            if isinstance(training, str):
                out.add(ref("trainings", training), "benchmarked-in", me)
        for run in record.get("runs") or []:
            if isinstance(run, dict) and isinstance(run.get("run_id"), str):
                out.add(run_ref(run["run_id"]), "benchmarked-in", me)
        return list(out)

    def page_context(self, key: str, record: dict, index: Any) -> dict:
        return {"report_url": report_link(record)}

    def list_row(self, row: dict, index: Any) -> list[Cell]:
        rec, key = row["record"], row["key"]
        return [(key, self.link(key)), (rec.get("experiment") or "", None), (", ".join(rec.get("sites") or []), None),
                (len(rec.get("runs") or []), None), (rec.get("headline") or "", report_link(rec)),
                (row["updated"][:19], None)]


collection = Benchmarks()

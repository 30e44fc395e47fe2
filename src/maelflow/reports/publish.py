"""A benchmark report into the catalogue, so that the trainings' pages link the comparison.

Why: the report task writes the report under the workspace of the host that ran the suite, where
colleagues cannot browse. The catalogue is where people look things up: the report goes there as
artefacts (one self-contained HTML page with its plots embedded, the Markdown and CSV beside it)
and a ``benchmarks`` entry names every run compared and the training entries they belong to; the
catalogue's lineage then puts a link to the comparison on each of those training pages.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

from maelflow.reports.benchmark import Report, html_page

SIDE_FILES = (("report.md", "text/markdown; charset=utf-8"), ("timing.csv", "text/csv; charset=utf-8"),
              ("runs.csv", "text/csv; charset=utf-8"))


def benchmark_record(report: Report, name: str, experiment: str, trainings: Iterable[str], headline: str,
                     prefix: str) -> dict[str, Any]:
    """The ``benchmarks`` entry for ``report`` (its artefacts under ``prefix``)."""
    return {
        "name": name, "experiment": experiment, "generated": report.generated, "headline": headline,
        "sites": sorted({r.site for r in report.runs}), "trainings": sorted(set(trainings)),
        "runs": [{"run_id": r.run_id, "training": r.training, "site": r.site,
                  "repeat": r.tags.get("maelflow.benchmark.repeat")} for r in report.runs],
        "tracking_uri": report.tracking_uri, "regressions": len(report.regressions),
        "report": f"{prefix}/index.html", "files": [f"{prefix}/{f}" for f, _ in SIDE_FILES],
    }


def publish_report(client: Any, report: Report, folder: Path, name: str, *, experiment: str,
                   trainings: dict[str, dict[str, Any]], headline: str) -> str:
    """Upload the report written in ``folder`` and register (or replace) its entry; the page's path.

    ``client`` is a catalogue client (:func:`maelflow.catalogue.client`); ``trainings`` maps the key
    of each training entry the compared runs belong to onto what to register when the catalogue
    has no such entry yet (``datasets``, ``owner``, other fields): a training run only as a
    benchmark gets an entry of status ``benchmarked``, so its page exists to link the comparison.
    """
    prefix = f"benchmarks/{name}"
    images = sorted(p.name for p in folder.glob("*.png"))
    client.put_artefact(f"{prefix}/index.html", html_page(report, images, inline_from=folder).encode(),
                        "text/html; charset=utf-8")
    for fname, ctype in SIDE_FILES:
        client.put_artefact(f"{prefix}/{fname}", (folder / fname).read_bytes(), ctype)
    for key, fields in trainings.items():
        if not client.exists("trainings", key):
            fields = dict(fields)
            client.register_training(key, status="benchmarked", datasets=fields.pop("datasets", ()),
                                     owner=fields.pop("owner", None), **fields)
    record = benchmark_record(report, name, experiment, trainings, headline, prefix)
    if client.exists("benchmarks", name):
        client.replace("benchmarks", name, record)
    else:
        client.create("benchmarks", record)
    return record["report"]

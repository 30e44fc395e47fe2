"""The benchmark family's report task on runs in a file-based MLflow store: it finds this deploy's
repeats by their tags, writes the report under the workspace and labels it; a missing repeat and a
regression against the configured baseline fail it with a reason that says which."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from maelflow.config.loader import load_experiment
from maelflow.services.base import ServiceError
from maelflow.suite import tasks
from maelflow.training.runs import benchmark_tags, run_dir
from maelflow.workspace import Workspace
from tests.unit.test_benchmark_report import make_run, store  # noqa: F401 - the fixture

pytestmark = pytest.mark.unit


class Labels:
    def __init__(self):
        self.labels: dict[str, str] = {}

    def label(self, name, text):
        self.labels[name] = text


def _ctx(config_root, tmp_path, uri, monkeypatch, *overrides):
    ws = Workspace(tmp_path / "ws")
    rx = load_experiment("demo", ["sites=[local,lumi]", "trainings=[tiny]", "+benchmark.repeats=2",
                                  "+benchmark.name=q4", *overrides],
                         config_root=config_root, placeholders={"workspace": str(ws.root)})
    def discover(ws, name):
        if name == "mlflow":
            return SimpleNamespace(url=uri)
        raise ServiceError(f"{name} is not running in {ws.root}")        # no catalogue here

    monkeypatch.setattr("maelflow.services.stack.discover", discover)
    monkeypatch.setenv("MAELFLOW_DEPLOY_ID", "7")
    return tasks.TaskContext(rx, ws, Labels(), tmp_path / "experiment.json")


def _runs(client, fwd=None, skip=(), deploy="7"):
    ids = {}
    for site in ("local", "lumi"):
        for r in (1, 2):
            if (site, r) in skip:
                continue
            step = (fwd or {}).get((site, r), 10.0 if site == "lumi" else 20.0)
            ids[(site, r)] = make_run(client, "demo", "tiny", site, fwd=step,
                                      tags={"maelflow.benchmark": "q4", "maelflow.benchmark.repeat": str(r),
                                            "maelflow.deploy": deploy, "maelflow.benchmark.round": "20261203"})
    return ids


def test_report_compares_the_sites_and_labels_path_and_headline(config_root, tmp_path, store, monkeypatch):
    uri, client = store
    ids = _runs(client)
    _runs(client, deploy="6")                                    # an earlier deploy: not this report's
    make_run(client, "demo", "tiny", "local", fwd=1.0)           # not a benchmark run
    ctx = _ctx(config_root, tmp_path, uri, monkeypatch)
    out = tasks.benchmark_report(ctx)
    assert out == ctx.ws.path("benchmarks", "demo", "7-20261203")
    assert ctx.reporter.labels["catalogue"] == "not registered (see the job output)"   # the report stands
    rows = (out / "runs.csv").read_text()
    assert sorted(r for r in ids.values() if r in rows) == sorted(ids.values()) and rows.count("\n") == 5
    assert ctx.reporter.labels["report"] == str(out / "index.html")
    local, lumi = (float(part.split()[1]) for part in ctx.reporter.labels["headline"].split(", "))
    assert ctx.reporter.labels["headline"].startswith("local ") and lumi > local > 0   # lumi's steps are faster
    assert "4 runs of tiny on local, lumi compared" in ctx.reporter.labels["info"]


def test_a_missing_repeat_is_named(config_root, tmp_path, store, monkeypatch):
    uri, client = store
    _runs(client, skip=[("lumi", 2)])
    with pytest.raises(tasks.TaskFailed, match=r"benchmark q4: no MLflow run of tiny@lumi#2 .*deploy 7"):
        tasks.benchmark_report(_ctx(config_root, tmp_path, uri, monkeypatch))


def test_a_regression_against_the_baseline_fails_with_a_label(config_root, tmp_path, store, monkeypatch):
    uri, client = store
    make_run(client, "demo", "tiny", "lumi", fwd=10.0, tags={"maelflow.baseline": "q3"})
    make_run(client, "demo", "tiny", "local", fwd=20.0, tags={"maelflow.baseline": "q3"})
    _runs(client, fwd={("lumi", 2): 30.0})                       # one repeat much slower
    ctx = _ctx(config_root, tmp_path, uri, monkeypatch, "+benchmark.baseline=q3")
    with pytest.raises(tasks.TaskFailed, match=r"1 regression\(s\) against baseline q3: tiny @ lumi .*throughput"):
        tasks.benchmark_report(ctx)
    assert ctx.reporter.labels["info"].startswith("REGRESSION against baseline q3")
    assert (ctx.ws.path("benchmarks", "demo", "7-20261203") / "report.md").exists()   # written all the same


def test_repeats_have_their_own_run_folder_and_tags(config_root, tmp_path, monkeypatch):
    rx = load_experiment("demo", [], config_root=config_root, placeholders={"workspace": str(tmp_path)})
    monkeypatch.setenv("MAELFLOW_DEPLOY_ID", "7")
    monkeypatch.delenv("MAELFLOW_REPEAT", raising=False)
    plain = run_dir(rx, "local", "tiny")
    assert plain.name == "7" and benchmark_tags() == {}
    monkeypatch.setenv("MAELFLOW_REPEAT", "2")
    monkeypatch.setenv("MAELFLOW_ROUND", "20261203")
    monkeypatch.setenv("MAELFLOW_BENCHMARK", "q4")
    assert run_dir(rx, "local", "tiny") == plain / "bench-20261203-r2"
    assert benchmark_tags() == {"maelflow.benchmark": "q4", "maelflow.benchmark.repeat": "2",
                                "maelflow.benchmark.round": "20261203", "maelflow.deploy": "7"}

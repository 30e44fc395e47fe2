"""Benchmark mode end to end: the tiny Lightning training, 2 repeats on this machine and on the
loopback SLURM site (SSH, sbatch, relay, offline MLflow synced by the server), then the suite's
report task compares the two sites in one report under the workspace."""

from __future__ import annotations

import csv

import pytest
from mlflow import MlflowClient

from maelflow.config.loader import load_experiment
from maelflow.demo import prepare_datasets
from maelflow.ecf import client_for
from maelflow.placeholders import placeholders_for
from maelflow import catalogue
from maelflow.services import stack as stack_mod
from maelflow.services.stack import discover
from maelflow.suite.server import deploy, find, tree
from tests.conftest import FAST_DATASET, PREBUILT, write_yaml
from tests.integration.suite_helpers import wait_for

pytestmark = pytest.mark.integration


def test_two_repeats_on_two_sites_give_one_report(hpc_stack, config_root):
    ws = hpc_stack
    stack_mod.up(ws, extra=["hpc", "catalogue"])        # the report is registered there too
    exp = write_yaml(config_root / "experiments" / "bmode.yaml",
                     {"name": "bmode", "sites": ["local", "localhpc"], "datasets": [FAST_DATASET],
                      "trainings": ["tiny"], "benchmark": {"repeats": 2, "name": "q4"}})
    rx = load_experiment(str(exp), [PREBUILT, "training.tiny.config.max_epochs=1"], placeholders=placeholders_for(ws))
    prepare_datasets(rx)
    client = client_for(ws)
    deploy(rx, ws, client)
    wait_for(client, "/bmode", {"complete", "aborted"}, timeout=600)
    data = tree(client, "bmode")
    report = find(data, "/bmode/benchmark/report")
    assert find(data, "/bmode")["state"] == "complete", report
    assert find(data, "/bmode/local/train") is None   # the benchmarked training runs only as the benchmark

    # each repeat its own job and MLflow run, tagged so the report finds it
    mlflow = MlflowClient(discover(ws, "mlflow").url)
    run_ids = {}
    for site in ("local", "localhpc"):
        for r in (1, 2):
            sync = find(data, f"/bmode/benchmark/{site}/tiny/r{r}/sync")
            train = find(data, f"/bmode/benchmark/{site}/tiny/r{r}/train")
            assert train["state"] == "complete" and train["meters"]["epoch"]["value"] == 1
            label = sync["labels"]["mlflow"] or train["labels"]["mlflow"]   # offline runs: the synced copy
            run = mlflow.get_run(label.split()[1])
            tags = run.data.tags
            assert (tags["maelflow.benchmark"], tags["maelflow.site"], tags["maelflow.benchmark.repeat"]) == (
                "q4", site, str(r))
            run_ids[(site, r)] = run.info.run_id
    assert len(set(run_ids.values())) == 4
    assert mlflow.get_run(run_ids[("localhpc", 1)]).data.tags["maelflow.mode"] == "offline"
    # after the jobs, the report task asked the site's sacct for each SLURM job's energy
    for r in (1, 2):
        sacct = mlflow.get_run(run_ids[("localhpc", r)]).data.tags["energy.sacct"]
        assert "still running" not in sacct and sacct.split(":")[0] in ("measured", "unavailable"), sacct

    # one report, both sites, 2 runs each, its path and the headline in the labels
    index = report["labels"]["report"]
    assert index.startswith(str(ws.root / "benchmarks" / "bmode")) and index.endswith("index.html")
    folder = ws.root.joinpath(index[len(str(ws.root)) + 1:]).parent
    assert {"report.md", "timing.csv", "runs.csv", "index.html", "step_times.png", "breakdown.png"} <= {
        p.name for p in folder.iterdir()}
    rows = list(csv.DictReader((folder / "runs.csv").open()))
    assert sorted(r["run_id"] for r in rows) == sorted(run_ids.values()), rows
    assert sorted(r["site"] for r in rows) == ["local", "local", "localhpc", "localhpc"]
    headline = report["labels"]["headline"]
    assert headline.startswith("local ") and ", localhpc " in headline and headline.count("samples/s") == 2
    assert "localhpc" in (folder / "report.md").read_text()

    # the report in the catalogue: a benchmarks entry, linked from the (benchmarked) training's page
    cat = catalogue.client(ws)
    key = report["labels"]["catalogue"].split()[0].split("/", 1)[1]
    entry = cat.get("benchmarks", key)
    assert sorted(r["run_id"] for r in entry["runs"]) == sorted(run_ids.values())
    assert entry["sites"] == ["local", "localhpc"] and entry["headline"] == headline
    (training,) = entry["trainings"]
    assert training.startswith("bmode-tiny-") and cat.get("trainings", training)["status"] == "benchmarked"
    page = cat.session.get(f"{cat.url}/trainings/{training}", timeout=30)
    assert page.status_code == 200 and f'href="/benchmarks/{key}"' in page.text
    shown = cat.session.get(f"{cat.url}/artefacts/{entry['report']}", timeout=30)
    assert shown.status_code == 200 and shown.headers["content-type"].startswith("text/html")
    assert shown.headers["content-security-policy"].startswith("sandbox")
    assert shown.text.count("data:image/png;base64,") >= 2 and "localhpc" in shown.text

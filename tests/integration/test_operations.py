"""Operational model production end to end on CPU with the tiny anemoi model, through real services.

The shipped ``ops-demo`` experiment runs on a real ecflow_server with the workspace's S3 store, MLflow
server and catalogue: its training is evaluated, passes the gate and becomes v1 of ``ops-demo-model``
in ``production``; two forecast cycles (a ``repeat date``) run anemoi-inference, publish NetCDF to the
EWC store and register forecasts whose lineage reaches the dataset. A second experiment then trains
a worse model (refused by the gate: the label says why, production stays) and a better one (v2);
``maelflow model rollback`` returns production to v1 and the next cycle records v1; a production
alias naming a checkpoint that is gone aborts its cycle with a reason and registers nothing; MLflow's
registry shows the same versions and aliases throughout.

One module-scoped sequence: each step needs the model state the previous one left.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
import uuid as uuidlib
from pathlib import Path

import pytest
from click.testing import CliRunner

from maelflow.cli.main import cli
from maelflow.config.loader import load_experiment
from maelflow.ecf import client_for
from maelflow.suite.server import control, deploy, find, tree
from tests.conftest import REPO, write_yaml
from tests.integration.suite_helpers import wait_for

# the two suites train three tiny models and run four forecast cycles: on a busy 2-core machine a
# suite took up to 7 minutes, beyond the default 600 s per test (setup included)
pytestmark = [pytest.mark.integration, pytest.mark.timeout(1500)]

MODEL = "ops-demo-model"
DATASET = "synth-demo-local-5p0-2020-2020-6h-v1"
NEXT = "ops-next"
APP_MODEL = "ops-next-app"
MAELFLOW = str(Path(sys.executable).with_name("maelflow"))


class Ops:
    def __init__(self, ws, infos, root: Path):
        self.ws, self.infos, self.root = ws, infos, root
        self.client = client_for(ws)

    def rx(self, name: str, *overrides: str):
        return load_experiment(name, list(overrides), config_root=self.root,
                               placeholders={"workspace": str(self.ws.root), "maelflow": MAELFLOW})

    def cat(self):
        from maelflow import catalogue

        return catalogue.client(self.ws)

    def cli(self, *args: str) -> str:
        result = CliRunner().invoke(cli, [*args, "--workspace", str(self.ws.root)], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return result.stdout

    def cli_json(self, *args: str):
        return json.loads(self.cli(*args, "--json"))

    def forecasts(self, experiment: str) -> list[dict]:
        return sorted(self.cat().list("forecasts", experiment=experiment), key=lambda f: f["produced"])

    def mlflow_view(self, model: str = MODEL) -> dict:
        from maelflow.operations.mlflow_registry import registry_view

        return registry_view(self.infos["mlflow"].url, model)

    def node(self, suite: str, path: str) -> dict:
        return find(tree(self.client, suite), path)


@pytest.fixture(scope="module")
def ops(stack, tmp_path_factory) -> Ops:
    ws, infos = stack
    root = tmp_path_factory.mktemp("ops") / "configs"
    shutil.copytree(REPO / "configs", root)
    # a second experiment on the same dataset and model: a worse and a better candidate, one cycle
    # v1 (ops-demo's tiny-anemoi, shortened to 10 steps here) scores nrmse ~0.43; 1 step ~0.45; 20 steps ~0.41
    for name, steps in (("ops-worse", 1), ("ops-better", 20)):
        write_yaml(root / "trainings" / f"{name}.yaml",
                   {"name": name, "application": "anemoi", "datasets": [DATASET], "time_limit": "00:20:00",
                    "config": {"training": {"max_steps": steps}}})
    demo = (root / "experiments" / "ops-demo.yaml").read_text()
    import yaml

    spec = yaml.safe_load(demo.replace("${oc.env:USER,maelflow}", "maelflow"))
    # ... with the shipped fine-tuning cycle (ops-finetune.yaml) and the shipped Lightning-app model
    # (ops-app.yaml): one cycle warm-starts from production (v2 by then) and moves candidate
    shipped = {n: yaml.safe_load((root / "experiments" / f"{n}.yaml").read_text().replace(
        "${oc.env:USER,maelflow}", "maelflow")) for n in ("ops-finetune", "ops-app")}
    finetune = shipped["ops-finetune"]["models"][0]["finetune"]
    spec.update(name=NEXT, trainings=["ops-worse", "ops-better", finetune["training"], "tiny"])
    spec["models"][0]["trainings"] = ["ops-worse", "ops-better"]
    # a second cycle three days on (2020-01-29), after the dataset's last date: skipped, not failed
    spec["models"][0]["finetune"] = {**finetune, "end": "2020-01-29", "every": 3}
    spec["models"].append({**shipped["ops-app"]["models"][0], "name": APP_MODEL})
    spec["operations"].update(start="2020-01-27", end="2020-01-27")
    write_yaml(root / "experiments" / f"{NEXT}.yaml", spec)
    return Ops(ws, infos, root)


@pytest.fixture(scope="module")
def demo(ops) -> dict:
    """The shipped ops-demo, deployed and run to completion."""
    t0 = time.monotonic()
    deploy(ops.rx("ops-demo", "training.tiny-anemoi.config.training.max_steps=10"), ops.ws, ops.client)
    wait_for(ops.client, "/ops_demo", {"complete", "aborted"}, timeout=900)
    data = tree(ops.client, "ops_demo")
    assert data["suites"][0]["state"] == "complete", json.dumps(data, indent=1)[-4000:]
    return {"seconds": time.monotonic() - t0}


def test_ops_demo_promotes_v1_and_forecasts_two_cycles_with_lineage(ops, demo):
    gate = ops.node("ops_demo", "/ops_demo/local/evaluate/tiny_anemoi/gate")
    assert gate["labels"]["decision"].startswith("passed: skill_climatology"), gate["labels"]
    assert gate["events"]["promoted"] is True and "v1" in gate["labels"]["info"]
    model = ops.cli_json("model", "show", MODEL)
    assert model["aliases"] == {"production": 1} and set(model["versions"]) == {"1"}
    v1 = model["versions"]["1"]
    assert v1["training"].startswith("ops-demo-tiny-anemoi-") and len(v1["sha256"]) == 64
    assert v1["checkpoint"]["path"].endswith("inference-last.ckpt") and Path(v1["checkpoint"]["path"]).is_file()
    summary = v1["evaluation"]["summary"]
    assert summary["skill_climatology"] > 0 and 0 < summary["nrmse"] < 1 and "rmse.2t" in summary
    assert v1["gate"]["decision"] == "passed"
    # the evaluation is recorded with the checkpoint too, and on the training's MLflow run
    weights = ops.cat().get("weights", v1["weights"])
    assert weights["evaluations"][-1]["decision"] == "passed"
    from mlflow import MlflowClient

    run = MlflowClient(ops.infos["mlflow"].url).get_run(v1["run_id"])
    assert run.data.metrics["eval_nrmse"] == pytest.approx(summary["nrmse"])

    # two cycles of the repeat, each resolved to v1, published and registered
    forecasts = ops.forecasts("ops-demo")
    assert [f["cycle"] for f in forecasts] == ["2020-01-25T00:00:00", "2020-01-26T00:00:00"]
    assert all(f["version"] == 1 and f["alias"] == "production" and f["weights"] == v1["weights"] for f in forecasts)
    resolve = ops.node("ops_demo", "/ops_demo/local/operations/resolve")
    assert resolve["labels"]["model"].startswith(f"{MODEL}@production = v1")
    import netCDF4
    import obstore

    from maelflow.ewc import workspace_store

    for f in forecasts:
        uri = f["locations"]["ewc"]["path"]
        assert uri.startswith(f"s3://ewc/forecasts/ops-demo/{MODEL}/")
        body = bytes(obstore.get(workspace_store(ops.ws, "ewc"), uri.split("/", 3)[3]).bytes())
        assert len(body) == f["output"]["size"]
        local = Path(f["locations"]["local"]["path"])
        with netCDF4.Dataset(str(local)) as nc:  # the output says where it came from
            assert nc.getncattr("maelflow_model_version") == "1"
            assert nc.getncattr("maelflow_checkpoint_sha256") == v1["sha256"]
            assert nc.getncattr("maelflow_initial_date") == f["cycle"]
            assert nc.getncattr("maelflow_dataset") == DATASET
            assert {"2t", "msl", "10u", "10v"} <= set(nc.variables) and nc.dimensions["time"].size == 3
        config = (local.parent / "inference.yaml").read_text()
        assert "input:\n  dataset:" in config and "anemoi-inference validate" in (local.parent / "anemoi-inference.log").read_text()
    # lineage: forecast -> model version -> checkpoint -> training -> dataset
    graph = ops.cat().lineage(forecasts[0]["name"], collection="forecasts", depth=4)
    edges = {(e["source"], e["relation"], e["target"]) for e in graph["edges"]}
    me = f"forecasts:{forecasts[0]['name']}"
    assert (f"models:{MODEL}", "made-v1", me) in edges
    assert (f"weights:{v1['weights']}", "promoted-v1", f"models:{MODEL}") in edges
    assert (f"trainings:{v1['training']}", "produced", f"weights:{v1['weights']}") in edges
    assert (f"datasets:{DATASET}", "trained-on", f"trainings:{v1['training']}") in edges
    # the pages: the model's versions, scores and timeline; the forecast's cycle and version
    import requests

    url = ops.infos["catalogue"].url
    page = requests.get(f"{url}/models/{MODEL}", timeout=30).text
    assert 'id="version-table"' in page and "skill_climatology" in page and "production" in page
    page = requests.get(f"{url}/forecasts/{forecasts[0]['name']}", timeout=30).text
    assert "2020-01-25T00:00:00" in page and f"{MODEL} v1" in page and "<svg" in page
    # MLflow's registry shows the same
    view = ops.mlflow_view()
    assert set(view["versions"]) == {"1"} and view["aliases"] == {"production": "1"}
    assert view["versions"]["1"]["source"] == f"runs:/{v1['run_id']}/checkpoint"
    print(f"\nops-demo suite: {demo['seconds']:.0f} s")


@pytest.fixture(scope="module")
def next_suite(ops, demo) -> dict:
    t0 = time.monotonic()
    deploy(ops.rx(NEXT), ops.ws, ops.client)
    wait_for(ops.client, "/ops_next", {"complete", "aborted"}, timeout=900)
    data = tree(ops.client, "ops_next")
    assert data["suites"][0]["state"] == "complete", json.dumps(data, indent=1)[-4000:]
    return {"seconds": time.monotonic() - t0}


def test_finetune_cycle_warm_starts_from_the_champion_and_is_gated(ops, next_suite):
    from anemoi.utils.checkpoints import load_metadata
    from mlflow import MlflowClient

    base = "/ops_next/local/finetune/ops_demo_model"
    # the nodes show the last cycle, 2020-01-29: no date of the dataset to hold out, so skipped (its
    # warm start said why and set 'skip'; the rest was completed unrun, nothing promoted); the
    # suite completed (next_suite), so the first cycle's gate let the repeat go on
    warm = ops.node("ops_next", f"{base}/ft_warmstart")
    assert warm["labels"]["model"].startswith(f"{MODEL}@production = v2"), warm["labels"]
    assert warm["labels"]["info"].startswith("skipped: only 0 dates of the dataset from 2020-01-29"), warm["labels"]
    assert warm["events"]["skip"] is True
    gate = ops.node("ops_next", f"{base}/ft_gate")
    assert gate["state"] == "complete" and gate["events"]["promoted"] is False, gate
    # the first cycle, 2020-01-26: passed against v2 and moved candidate (the catalogue's record)
    history = [h for h in ops.cli_json("model", "history", MODEL)["history"] if h["alias"] == "candidate"]
    assert [(h["from"], h["to"]) for h in history] == [(None, 3)], history
    assert history[0]["why"].startswith("fine-tuned from v2, gate passed") and "champion v2" in history[0]["why"]
    model = ops.cli_json("model", "show", MODEL)
    assert model["aliases"] == {"production": 2, "candidate": 3}   # production did not move
    v2, v3 = model["versions"]["2"], model["versions"]["3"]
    assert v3["training"].startswith("ops-next-tiny-anemoi-finetune-") and v3["training"].endswith("-20200126")
    ws_rec = v3["evaluation"]["warm_start"]
    champion_ckpt = str(Path(v2["checkpoint"]["path"]).with_name("last.ckpt"))
    assert (ws_rec["version"], ws_rec["weights"], ws_rec["warm_start"]) == (2, v2["weights"], champion_ckpt)
    # the new checkpoint says it started from v2's weights: anemoi's own record of the start
    md = load_metadata(v3["checkpoint"]["path"])
    assert md["config"]["system"]["input"]["warm_start"] == champion_ckpt
    assert md["config"]["training"]["load_weights_only"] is True
    assert md["parent_uuid"] == load_metadata(v2["checkpoint"]["path"])["uuid"] != md["uuid"]
    assert md["maelflow_warm_start"]["version"] == 2
    # new data only: after the champion's training period (to 2020-01-23 00 UTC), up to the cycle; evaluated
    # from the cycle on
    train_dates = md["config"]["dataloader"]["training"]["datasets"]["data"]
    assert str(train_dates["start"]).startswith("2020-01-23T06") and str(train_dates["end"]).startswith("2020-01-25T18")
    assert v3["evaluation"]["champion"]["version"] == 2
    assert all(d >= "2020-01-26" for d in v3["evaluation"]["dates"])
    params = MlflowClient(ops.infos["mlflow"].url).get_run(v3["run_id"]).data.params
    assert params.get("config.system.input.warm_start") == champion_ckpt, sorted(params)[:40]
    assert ops.mlflow_view()["aliases"] == {"production": "2", "candidate": "3"}


def test_lightning_application_is_evaluated_gated_and_promoted(ops, next_suite):
    gate = ops.node("ops_next", "/ops_next/local/evaluate/tiny/gate")
    assert gate["labels"]["decision"].startswith("passed: val_loss"), gate["labels"]
    assert gate["events"]["promoted"] is True
    model = ops.cli_json("model", "show", APP_MODEL)
    assert model["aliases"] == {"production": 1}
    v1 = model["versions"]["1"]
    assert v1["checkpoint"]["path"].endswith("/checkpoints/last.ckpt") and v1["gate"]["decision"] == "passed"
    assert 0 < v1["evaluation"]["summary"]["val_loss"] <= 1.0 and "validation" in v1["evaluation"]["how"]
    from mlflow import MlflowClient

    run = MlflowClient(ops.infos["mlflow"].url).get_run(v1["run_id"])
    assert run.data.metrics["eval_val_loss"] == pytest.approx(v1["evaluation"]["summary"]["val_loss"])
    assert ops.mlflow_view(APP_MODEL)["aliases"] == {"production": "1"}


def test_worse_refused_better_promoted_rollback_and_the_next_cycle(ops, next_suite):
    worse = ops.node("ops_next", "/ops_next/local/evaluate/ops_worse/gate")
    assert worse["labels"]["decision"].startswith("refused: nrmse") and "champion v1" in worse["labels"]["decision"]
    assert worse["events"]["promoted"] is False and "production unchanged" in worse["labels"]["info"]
    better = ops.node("ops_next", "/ops_next/local/evaluate/ops_better/gate")
    assert better["labels"]["decision"].startswith("passed") and better["events"]["promoted"] is True
    model = ops.cli_json("model", "show", MODEL)
    # v3: the fine-tuning cycle's, in candidate (test_finetune_cycle_...)
    assert set(model["versions"]) == {"1", "2", "3"} and model["aliases"]["production"] == 2
    assert model["versions"]["2"]["training"].startswith("ops-next-ops-better-")
    assert model["versions"]["2"]["evaluation"]["champion"]["version"] == 1
    assert ops.forecasts(NEXT)[-1]["version"] == 2  # the cycle after the promotion used v2
    assert ops.mlflow_view()["aliases"]["production"] == "2"

    out = ops.cli_json("model", "rollback", MODEL, "production", "--reason", "v2 output metadata wrong")
    assert out["aliases"]["production"] == 1 and out["moved"]["from"] == 2 and out["moved"]["to"] == 1
    assert ops.mlflow_view()["aliases"] == {"production": "1", "candidate": "3"}
    control(ops.client, "requeue", "/ops_next/local/operations")  # the next cycle
    wait_for(ops.client, "/ops_next/local/operations", {"complete", "aborted"}, timeout=400)
    latest = ops.forecasts(NEXT)[-1]
    assert latest["version"] == 1 and len(ops.forecasts(NEXT)) == 2
    history = ops.cli_json("model", "history", MODEL)["history"]
    assert [(h["alias"], h["from"], h["to"], h["action"]) for h in history] == [
        ("production", None, 1, "promote"), ("production", 1, 2, "promote"), ("candidate", None, 3, "promote"),
        ("production", 2, 1, "rollback")]
    assert history[2]["why"].startswith("fine-tuned from v2, gate passed")
    history = [h for h in history if h["alias"] == "production"]
    assert history[-1]["why"] == "v2 output metadata wrong" and all(h["at"] and h["by"] for h in history)
    text = ops.cli("model", "history", MODEL, "--alias", "production", "--at", history[1]["at"])
    assert "named v2" in text
    print(f"\nops-next suite: {next_suite['seconds']:.0f} s")


def test_alias_on_a_missing_checkpoint_aborts_the_cycle_and_registers_nothing(ops, next_suite):
    # a manual promotion needs a reason (or evaluation), and reads the file it names
    v1 = ops.cli_json("model", "show", MODEL)["versions"]["1"]
    copy = Path(v1["checkpoint"]["path"]).with_name("inference-hotfix.ckpt")
    copy.write_bytes(Path(v1["checkpoint"]["path"]).read_bytes() + b"\0")  # another file, another hash
    import hashlib

    sha = hashlib.sha256(copy.read_bytes()).hexdigest()
    uuid = str(uuidlib.UUID(sha[:32]))
    ops.cat().register_checkpoint(uuid, {"sha256": sha, "run_id": v1["run_id"]}, location=("local", str(copy)))
    refused = CliRunner().invoke(cli, ["model", "promote", MODEL, "--weights", uuid, "--alias", "production",
                                       "--workspace", str(ops.ws.root)])
    assert refused.exit_code == 2 and "needs evidence" in refused.output
    out = ops.cli_json("model", "promote", MODEL, "--weights", uuid, "--alias", "production",
                       "--reason", "hotfix of the output metadata")
    assert out["version"] == 4 and out["aliases"]["production"] == 4 and out["record"]["sha256"] == sha
    assert ops.mlflow_view()["aliases"] == {"production": "4", "candidate": "3"}
    copy.unlink()  # the file goes away behind the catalogue's back
    before = len(ops.forecasts(NEXT))
    control(ops.client, "requeue", "/ops_next/local/operations")
    node = wait_for(ops.client, "/ops_next/local/operations/resolve", {"aborted"}, timeout=300)
    reason = node["aborted_reason"]
    assert "production is v4" in reason and "missing" in reason and str(copy) in reason, reason
    assert ops.node("ops_next", "/ops_next/local/operations/forecast")["state"] == "queued"
    assert len(ops.forecasts(NEXT)) == before
    # the operator rolls back: the history has every move
    ops.cli_json("model", "rollback", MODEL, "production", "--reason", "hotfix checkpoint lost")
    moves = [(h["from"], h["to"], h["action"]) for h in ops.cli_json("model", "history", MODEL, "--alias",
                                                                       "production")["history"]]
    assert moves[-2:] == [(1, 4, "promote"), (4, 1, "rollback")]
    view = ops.mlflow_view()
    assert view["aliases"] == {"production": "1", "candidate": "3"} and set(view["versions"]) == {"1", "2", "3", "4"}

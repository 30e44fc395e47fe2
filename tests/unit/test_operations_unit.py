"""Model production without services: the gate's decision, the models collection's history rules
(append-only, rollback as a stack, the version at a time), version fields, the forecast
collection's lineage, the suite's evaluate/operations families, config checks, late flags."""

from __future__ import annotations

import json

import pytest

from maelflow_registry import collections
from maelflow_registry.catalogue import Catalogue
from maelflow_registry.collections import models as models_mod
from maelflow_registry.config import Settings
from maelflow_registry.errors import BadRequest, Conflict, NotFound, Unprocessable
from maelflow_registry.index import Index

pytestmark = pytest.mark.unit


class MemoryStore:
    bucket = "catalogue"

    def __init__(self):
        self.docs: dict = {}

    def ensure_bucket(self) -> None:
        pass

    def put_document(self, doc: dict) -> None:
        self.docs[(doc["collection"], doc["key"])] = json.loads(json.dumps(doc))

    def delete_document(self, collection: str, key: str) -> None:
        self.docs.pop((collection, key), None)

    def iter_documents(self):
        return iter(list(self.docs.values()))


@pytest.fixture
def cat(tmp_path) -> Catalogue:
    c = Catalogue(MemoryStore(), Index(tmp_path / "index.sqlite"), lambda: Settings(dataset_naming="relaxed"))
    for u, sha in (("ck-1", "a" * 64), ("ck-2", "b" * 64), ("ck-3", None)):
        c.create("weights", {"uuid": u, "metadata": {"run_id": "r", **({"sha256": sha} if sha else {})}},
                 user="t", role="write")
    return c


# ------------------------------------------------------------------------------------------ gate
def test_gate_passes_only_when_every_rule_and_the_champion_margin_hold():
    from maelflow.config.models import Gate, GateRule
    from maelflow.operations.gate import decide

    gate = Gate(rules=[GateRule(metric="skill_climatology", min=0.0), GateRule(metric="nrmse", max=0.5)],
                champion_margin=0.05)
    good = {"nrmse": 0.40, "skill_climatology": 0.3}
    assert decide(gate, good).passed and decide(gate, good).text.startswith("passed: ")
    bad = decide(gate, {"nrmse": 0.61, "skill_climatology": -0.2})
    assert not bad.passed
    assert bad.reasons == ["skill_climatology -0.2 < min 0", "nrmse 0.61 > max 0.5"]
    assert bad.text == "refused: skill_climatology -0.2 < min 0; nrmse 0.61 > max 0.5"
    # a score nobody measured fails its rule
    assert "was not measured" in decide(gate, {"nrmse": 0.4}).reasons[0]
    # the champion: 5% better needed
    assert decide(gate, good, {"version": 1, "summary": {"nrmse": 0.43}}).passed
    worse = decide(gate, good, {"version": 1, "summary": {"nrmse": 0.41}})
    assert not worse.passed and "champion v1" in worse.text and "not better" in worse.text
    broken = decide(gate, good, {"version": 1, "error": "checkpoint missing"})
    assert not broken.passed and "could not be scored: checkpoint missing" in broken.text
    # no champion comparison configured: the champion does not count
    assert decide(Gate(rules=[], champion_margin=None), {}, {"version": 1, "error": "x"}).passed


# ------------------------------------------------------------------------------ models collection
def test_promote_records_version_fields_checks_the_hash_and_dedupes(cat):
    rec, _ = models_mod.promote(cat, "m", "ck-1", user="alice", role="write", alias="production", why="gate passed",
                                fields={"evaluation": {"summary": {"nrmse": 0.4}}, "training": "t-1"})
    assert rec["_promoted"] == 1
    v1 = rec["versions"]["1"]
    assert v1["sha256"] == "a" * 64 and v1["training"] == "t-1" and v1["promoted_by"] == "alice"
    assert rec["history"] == [{"alias": "production", "from": None, "to": 1, "action": "promote",
                               "at": rec["history"][0]["at"], "by": "alice", "why": "gate passed"}]
    again, _ = models_mod.promote(cat, "m", "ck-1", user="bob", role="write", alias="production")
    assert again["_promoted"] == 1 and set(again["versions"]) == {"1"} and len(again["history"]) == 1
    with pytest.raises(Unprocessable) as err:
        models_mod.promote(cat, "m", "ck-2", user="x", role="write", fields={"sha256": "c" * 64})
    assert "file changed" in err.value.message
    with pytest.raises(BadRequest):
        models_mod.promote(cat, "m", "ck-2", user="x", role="write", fields={"nonsense": 1})
    for reserved in ("latest", "v2", "V10", "a b"):
        with pytest.raises(BadRequest):
            models_mod.promote(cat, "m", "ck-2", user="x", role="write", alias=reserved)
    assert set(cat.record("models", "m")["versions"]) == {"1"}  # nothing of the refused promotions stayed


def test_rollback_is_a_stack_and_every_move_is_history(cat):
    models_mod.promote(cat, "m", "ck-1", user="a", role="write", alias="production")
    models_mod.promote(cat, "m", "ck-2", user="a", role="write", alias="production")
    rec, _ = models_mod.rollback(cat, "m", "production", user="op", role="write", why="GRIB2 metadata")
    assert rec["aliases"]["production"] == 1
    assert rec["history"][-1] == {"alias": "production", "from": 2, "to": 1, "action": "rollback",
                                  "at": rec["history"][-1]["at"], "by": "op", "why": "GRIB2 metadata"}
    with pytest.raises(Conflict):  # v1 was the first: nothing earlier
        models_mod.rollback(cat, "m", "production", user="op", role="write")
    models_mod.promote(cat, "m", "ck-3", user="a", role="write", alias="production")
    assert models_mod.rollback(cat, "m", "production", user="op", role="write")[0]["aliases"]["production"] == 1
    rec, _ = models_mod.rollback(cat, "m", "production", 3, user="op", role="write")  # to a named version
    assert rec["aliases"]["production"] == 3
    with pytest.raises(Unprocessable):
        models_mod.rollback(cat, "m", "production", 9, user="op", role="write")
    with pytest.raises(NotFound):
        models_mod.rollback(cat, "m", "candidate", user="op", role="write")
    moves = [(h["from"], h["to"], h["action"]) for h in cat.record("models", "m")["history"]]
    assert moves == [(None, 1, "promote"), (1, 2, "promote"), (2, 1, "rollback"), (1, 3, "promote"),
                     (3, 1, "rollback"), (1, 3, "rollback")]


def test_history_is_append_only_and_direct_writes_are_recorded(cat):
    models_mod.promote(cat, "m", "ck-1", user="a", role="write", alias="production")
    models_mod.promote(cat, "m", "ck-2", user="a", role="write")
    with pytest.raises(Conflict):
        cat.patch("models", "m", [{"op": "replace", "path": "/history/0/to", "value": 2}], user="x", role="write")
    with pytest.raises(Conflict):
        cat.patch("models", "m", [{"op": "remove", "path": "/history/0"}], user="x", role="write")
    # a PATCH that moves the alias itself gets its history line from the server
    rec, _ = cat.patch("models", "m", [{"op": "replace", "path": "/aliases/production", "value": 2}],
                       user="x", role="write")
    assert rec["history"][-1]["from"] == 1 and rec["history"][-1]["to"] == 2 and rec["history"][-1]["action"] == "move"
    # and a PUT of the whole entry without its history keeps the history
    body = {k: v for k, v in rec.items() if k != "history"}
    rec, _, _ = cat.replace("models", "m", body, user="x", role="write")
    assert len(rec["history"]) == 2


def test_which_version_an_alias_named_at_a_time():
    record = {"name": "m", "aliases": {"production": 1}, "history": [
        {"alias": "production", "from": None, "to": 1, "action": "promote", "at": "2025-02-25T00:00:00"},
        {"alias": "candidate", "from": None, "to": 2, "action": "promote", "at": "2025-07-01T00:00:00"},
        {"alias": "production", "from": 1, "to": 2, "action": "move", "at": "2025-07-31T00:00:00"},
        {"alias": "production", "from": 2, "to": 1, "action": "rollback", "at": "2025-08-01T00:00:00"}]}
    assert models_mod.alias_at(record, "production", "2025-01-01T00:00:00Z") is None
    assert models_mod.alias_at(record, "production", "2025-07-31T12:00:00+00:00") == 2
    assert models_mod.alias_at(record, "production", "2025-08-02") == 1
    assert models_mod.alias_at(record, "candidate", "2025-08-02") == 2
    with pytest.raises(BadRequest):
        models_mod.alias_at(record, "production", "yesterday")
    assert models_mod.rollback_target({**record, "aliases": {"production": 2},
                                       "history": record["history"][:3]}, "production") == 1


def test_model_page_context_orders_versions_and_reverses_the_timeline(cat):
    models_mod.promote(cat, "m", "ck-1", user="a", role="write", alias="production",
                       fields={"evaluation": {"summary": {"nrmse": 0.4, "skill_climatology": 0.3}}})
    models_mod.promote(cat, "m", "ck-2", user="a", role="write", alias="production", fields={"reason": "hotfix"})
    ctx = collections.get("models").page_context("m", cat.record("models", "m"), cat.index)
    assert [r["number"] for r in ctx["version_rows"]] == ["2", "1"]
    assert ctx["score_names"] == ["nrmse", "skill_climatology"] and ctx["version_rows"][0]["aliases"] == ["production"]
    assert [h["to"] for h in ctx["timeline"]] == [2, 1]


# ---------------------------------------------------------------------------------------- forecasts
def test_forecast_lineage_and_immutability(cat):
    coll = collections.get("forecasts")
    rec = {"name": "f1", "model": "m", "version": 2, "alias": "production", "weights": "ck-2",
           "cycle": "2020-01-25T00:00:00", "initial_conditions": {"dataset": "/data/ds-x.zarr"}}
    assert coll.edges("f1", rec) == [("models:m", "made-v2", "forecasts:f1"), ("weights:ck-2", "ran", "forecasts:f1"),
                                     ("datasets:ds-x", "initial-conditions", "forecasts:f1")]
    cat.create("forecasts", rec, user="t", role="write")
    with pytest.raises(Conflict):
        cat.patch("forecasts", "f1", [{"op": "replace", "path": "/version", "value": 1}], user="t", role="write")
    cat.patch("forecasts", "f1", [{"op": "add", "path": "/locations/ewc", "value": {"path": "s3://ewc/x.nc"}}],
              user="t", role="write")
    with pytest.raises(Unprocessable):
        cat.create("forecasts", {"name": "f2", "model": "m", "cycle": "x"}, user="t", role="write")


# ---------------------------------------------------------------------------------- config, suite
def _experiment(**extra):
    from maelflow.config.models import Experiment

    return Experiment(name="e", sites=["local"], datasets=["ds"], trainings=["t1", "t2"], **extra)


def test_config_checks_models_and_operations():
    from pydantic import ValidationError

    ok = _experiment(models=[{"name": "m", "trainings": ["t1", "t2"], "gate": {"alias": "production"}}],
                     operations={"model": "m", "dataset": "ds", "start": "20200125", "end": "2020-01-26",
                                 "late": "-s +00:15 -c +02:00"})
    assert ok.operations.start == "2020-01-25" and ok.operations.ymd_end == 20200126 and ok.operations_site == "local"
    for bad, words in (({"models": [{"name": "m", "trainings": ["nope"]}]}, "lacks"),
                       ({"models": [{"name": "m", "trainings": ["t1"], "gate": {"alias": "latest"}}]}, "reserved"),
                       ({"operations": {"model": "m", "dataset": "other", "start": "2020-01-01", "end": "2020-01-02"}},
                        "not among"),
                       ({"operations": {"model": "m", "dataset": "ds", "start": "2020-01-03", "end": "2020-01-02"}},
                        "before start"),
                       ({"operations": {"model": "m", "dataset": "ds", "start": "2020-02-30", "end": "2020-03-02"}},
                        "day is out of range"),
                       ({"operations": {"model": "m", "dataset": "ds", "start": "2020-01-01", "end": "2020-01-02",
                                        "late": "-s 00:15"}}, "relative")):
        with pytest.raises(ValidationError) as err:
            _experiment(**bad)
        assert words in str(err.value), (bad, str(err.value))


def test_the_shipped_ops_demo_builds_a_repeat_date_suite(tmp_path):
    from maelflow.config.loader import load_experiment
    from maelflow.suite.builder import build_suite
    from maelflow.workspace import Workspace

    rx = load_experiment("ops-demo", placeholders={"workspace": str(tmp_path / "ws"), "maelflow": "maelflow"})
    built = build_suite(rx, tmp_path / "suite", Workspace(tmp_path / "ws"))
    text = built.def_file.read_text()
    assert "repeat date YMD 20200125 20200126 1" in text and "late -s +00:05 -c +00:30" in text
    fam = built.defs.find_abs_node("/ops_demo/local/evaluate/tiny_anemoi")
    assert [t.name() for t in fam.nodes] == ["champion", "evaluate", "gate"]
    ops = built.defs.find_abs_node("/ops_demo/local/operations")
    assert [t.name() for t in ops.nodes] == ["resolve", "forecast", "deliver"]
    assert ops.get_trigger().get_expression() == "evaluate == complete"
    for name in ("champion", "evaluate", "gate", "resolve", "forecast", "deliver"):
        assert (built.out_dir / "tasks" / f"{name}.ecf").is_file()


def test_inference_config_and_output_name():
    from maelflow.operations.forecast import cycle_date, inference_config, output_name

    cycle = {"model": "m", "version": 3, "date": cycle_date("20200125", 6).isoformat(), "lead_time": 12,
             "output": "netcdf", "checkpoint": "/c/inference-last.ckpt", "dataset_path": "/d/ds.zarr", "device": "cpu"}
    assert output_name(cycle) == "m-v3-2020012506-12h.nc"
    cfg = inference_config(cycle, __import__("pathlib").Path("/o/x.nc"))
    assert cfg == {"checkpoint": "/c/inference-last.ckpt", "device": "cpu", "date": "2020-01-25T06:00:00",
                   "lead_time": 12, "input": {"dataset": "/d/ds.zarr"}, "output": {"netcdf": {"path": "/o/x.nc"}}}


# --------------------------------------------------------- a Lightning application's predict entry point
class PersistenceApp:
    """An application given by import path, with maelflow's ``predict`` entry point: it repeats the
    initial state, scaled by a factor kept in its checkpoint (enough to show where the numbers come from)."""

    @staticmethod
    def predict(checkpoint, dataset, date, lead_time):
        import numpy as np
        import xarray as xr
        import zarr

        factor = json.loads(open(checkpoint).read())["factor"]
        root = zarr.open_group(dataset, mode="r")
        start = np.datetime64(root.attrs["start_date"])
        i = int((np.datetime64(date) - start) / np.timedelta64(6, "h"))
        state = np.asarray(root["data"][i, :, 0, :]) * factor
        steps = lead_time // 6
        times = [np.datetime64(date) + np.timedelta64(6 * (k + 1), "h") for k in range(steps)]
        return xr.Dataset({name: (("time", "values"), np.repeat(state[j][None], steps, axis=0))
                           for j, name in enumerate(root.attrs["variables"])}, coords={"time": times})


class NoEntryPoint:
    pass


def test_lightning_application_forecasts_through_its_predict_entry_point(tmp_path):
    import netCDF4

    from maelflow.operations.forecast import ForecastError, run_cycle
    from maelflow.training.synthetic import make_synthetic

    ds = make_synthetic(tmp_path / "ds.zarr", dates=16, lat=6, lon=12)
    ckpt = tmp_path / "app.ckpt"
    ckpt.write_text(json.dumps({"factor": 2.0}))
    folder = tmp_path / "cycle"
    folder.mkdir()
    cycle = {"model": "lm", "version": 4, "alias": "production", "weights": "w-4", "sha256": "f" * 64,
             "checkpoint": str(ckpt), "dataset": "ds", "dataset_path": str(ds), "date": "2020-01-02T00:00:00",
             "lead_time": 12, "output": "netcdf", "application": f"{__name__}:PersistenceApp"}
    (folder / "cycle.json").write_text(json.dumps(cycle))
    result = run_cycle(folder)
    assert result["output"].endswith("lm-v4-2020010200-12h.nc")
    with netCDF4.Dataset(result["output"]) as nc:
        assert nc.getncattr("maelflow_model_version") == "4" and nc.getncattr("maelflow_checkpoint_uuid") == "w-4"
        import zarr

        first = float(zarr.open_group(str(ds), mode="r")["data"][4, 0, 0, 0])
        assert nc.variables["10u"][0, 0] == pytest.approx(2 * first) and nc.dimensions["time"].size == 2
    assert json.loads((folder / "forecast.json").read_text())["sha256"] == result["sha256"]
    cycle["application"] = f"{__name__}:NoEntryPoint"
    (folder / "cycle.json").write_text(json.dumps(cycle))
    with pytest.raises(ForecastError) as err:
        run_cycle(folder)
    assert "no 'predict' entry point" in str(err.value)
    (folder / "cycle.json").write_text(json.dumps({**cycle, "checkpoint": str(tmp_path / "gone.ckpt")}))
    with pytest.raises(ForecastError) as err:
        run_cycle(folder)
    assert "is v4, whose checkpoint" in str(err.value) and "missing" in str(err.value)


# --------------------------------------------------------------------------- cyclic fine-tuning
def test_finetune_cycle_trains_on_new_data_and_holds_out_the_rest():
    from datetime import datetime

    from maelflow.operations.finetune import TooLittleData, cycle_splits, dataset_dates

    dates = dataset_dates({"start_date": "2020-01-01T00:00:00", "end_date": "2020-01-28T18:00:00", "frequency": "6h"})
    assert len(dates) == 112 and dates[-1] == datetime(2020, 1, 28, 18)
    cycle = datetime(2020, 1, 26)
    # since the champion's training period (it ended 2020-01-23 06 UTC): its dates are never trained on again
    s = cycle_splits(cycle, dates, datetime(2020, 1, 23, 6), None, 2)
    assert s["training"] == ["2020-01-23T12:00:00", "2020-01-25T18:00:00"]
    assert s["validation"] == s["test"] == ["2020-01-26T00:00:00", "2020-01-27T18:00:00"]
    # or a window of days before the cycle, whatever the champion saw
    assert cycle_splits(cycle, dates, None, 1.5, 1)["training"] == ["2020-01-24T12:00:00", "2020-01-25T18:00:00"]
    # too little data (not arrived yet) skips the cycle; an unknown champion period is a config to fix
    with pytest.raises(TooLittleData, match="only 3 dates of new data since 2020-01-25T00:00:00"):
        cycle_splits(cycle, dates, datetime(2020, 1, 25), None, 2)
    with pytest.raises(TooLittleData, match="to hold out .* last date is 2020-01-28T18:00:00"):
        cycle_splits(datetime(2020, 1, 28, 12), dates, datetime(2020, 1, 20), None, 2)
    with pytest.raises(ValueError, match="set finetune.window") as err:
        cycle_splits(cycle, dates, None, None, 2)
    assert not isinstance(err.value, TooLittleData)


def test_finetune_config_checks():
    from pydantic import ValidationError

    ft = {"training": "t2", "start": "2020-01-26", "end": "20200127", "alias": "candidate"}
    ok = _experiment(models=[{"name": "m", "trainings": ["t1"], "finetune": ft}])
    assert ok.finetune_trainings == ["t2"] and ok.models[0].finetune.ymd_end == 20200127
    for finetune, words in (({**ft, "training": "nope"}, "not among the experiment's trainings"),
                            ({**ft, "training": "t1"}, "also gated"),
                            ({**ft, "alias": "v2"}, "reserved"),
                            ({**ft, "end": "2020-01-25"}, "before start"),
                            ({**ft, "every": 0}, "greater than or equal to 1")):
        with pytest.raises(ValidationError) as err:
            _experiment(models=[{"name": "m", "trainings": ["t1"], "finetune": finetune}])
        assert words in str(err.value), (finetune, str(err.value))


def test_the_shipped_ops_finetune_builds_a_cycle_per_date_after_the_gates(tmp_path):
    from maelflow.config.loader import load_experiment
    from maelflow.suite.operations_layout import gate_alias, model_of_training
    from maelflow.suite.builder import build_suite
    from maelflow.workspace import Workspace

    rx = load_experiment("ops-finetune", placeholders={"workspace": str(tmp_path / "ws"), "maelflow": "maelflow"})
    spec = model_of_training(rx, "tiny-anemoi-finetune")
    assert spec.name == "ops-finetune-model" and gate_alias(spec, "tiny-anemoi-finetune") == "candidate"
    assert gate_alias(spec, "tiny-anemoi") == "production"
    built = build_suite(rx, tmp_path / "suite", Workspace(tmp_path / "ws"))
    # the fine-tuning training runs only in its cycles, not in the train family
    assert [n.name() for n in built.defs.find_abs_node("/ops_finetune/local/train").nodes] == ["tiny_anemoi"]
    fam = built.defs.find_abs_node("/ops_finetune/local/finetune")
    assert fam.get_trigger().get_expression() == "evaluate == complete"
    cycle = built.defs.find_abs_node("/ops_finetune/local/finetune/ops_finetune_model")
    assert "repeat date YMD 20200126 20200126 1" in built.def_file.read_text()
    assert [t.name() for t in cycle.nodes] == ["ft_warmstart", "ft_train", "ft_sync", "ft_register", "ft_champion",
                                               "ft_evaluate", "ft_gate"]
    # a cycle with too little data: warmstart's event completes the rest unrun
    assert cycle.find_task("ft_warmstart").find_event("skip").name() == "skip"
    for task in list(cycle.nodes)[1:]:
        assert task.get_complete().get_expression() == "ft_warmstart:skip", task.name()
    assert cycle.find_task("ft_train").find_meter("epoch").name() == "epoch"
    job = (built.out_dir / "tasks" / "ft_train.ecf").read_text()
    job += (built.out_dir / "include" / "finetune.h").read_text()
    assert "task finetune --task %TASK% --training %TRAINING% --site %SITE% --cycle %YMD%" in job
    # the shipped Lightning-application model: gated on the application's own loss
    app = load_experiment("ops-app", placeholders={"workspace": str(tmp_path / "ws"), "maelflow": "maelflow"})
    assert app.experiment.models[0].gate.champion_metric == "val_loss"
    built = build_suite(app, tmp_path / "suite-app", Workspace(tmp_path / "ws"))
    assert [t.name() for t in built.defs.find_abs_node("/ops_app/local/evaluate/tiny").nodes] == [
        "champion", "evaluate", "gate"]


def test_a_cycle_gets_its_own_run_folder_and_the_launcher_its_warm_start(tmp_path, monkeypatch):
    from omegaconf import OmegaConf

    from maelflow.operations.finetune import cycle_deploy
    from maelflow.training.warm_start import WARM_START_FILE, apply_warm_start

    monkeypatch.setenv("MAELFLOW_DEPLOY_ID", "20261203T220000")
    assert cycle_deploy("20200126") == "20261203T220000-20200126"
    assert cycle_deploy("20200126") == "20261203T220000-20200126"   # a second call does not add it twice
    cfg = OmegaConf.create({"dataloader": {s: {"datasets": {"data": {"start": None, "end": None}}}
                                           for s in ("training", "validation", "test")},
                            "system": {"input": {"warm_start": None}}, "training": {"load_weights_only": False}})
    assert apply_warm_start(cfg, tmp_path, resuming=False) is None   # not a cycle: nothing set
    dates = {"training": ["2020-01-23T12:00:00", "2020-01-25T18:00:00"],
             "validation": ["2020-01-26T00:00:00", "2020-01-27T18:00:00"],
             "test": ["2020-01-26T00:00:00", "2020-01-27T18:00:00"]}
    (tmp_path / WARM_START_FILE).write_text(json.dumps(
        {"model": "m", "alias": "production", "version": 2, "weights": "w", "checkpoint": str(tmp_path / "none.ckpt"),
         "warm_start": "/site/run/checkpoint/abc/last.ckpt", "cycle": "20200126", "dates": dates}))
    record = apply_warm_start(cfg, tmp_path, resuming=False)
    assert cfg.system.input.warm_start == "/site/run/checkpoint/abc/last.ckpt" and cfg.training.load_weights_only
    assert cfg.dataloader.training.datasets.data.start == "2020-01-23T12:00:00"
    assert cfg.dataloader.test.datasets.data.end == "2020-01-27T18:00:00"
    assert record["metadata"]["maelflow_warm_start"]["version"] == 2
    # a resubmitted job resumes its own checkpoint: the dates stay, the warm start is not set again
    cfg2 = OmegaConf.create({"system": {"input": {"warm_start": None}}, "training": {"load_weights_only": False}})
    apply_warm_start(cfg2, tmp_path, resuming=True)
    assert cfg2.system.input.warm_start is None and cfg2.dataloader.training.datasets.data.end == "2020-01-25T18:00:00"


# ------------------------------------------------------------------- Lightning applications' gate
def test_gate_compares_an_application_with_its_champion_on_its_own_loss():
    from maelflow.config.models import Gate, GateRule
    from maelflow.operations.gate import decide

    gate = Gate(rules=[GateRule(metric="val_loss", max=1.0)], champion_metric="val_loss", champion_margin=0.0)
    passed = decide(gate, {"val_loss": 0.30}, {"version": 1, "summary": {"val_loss": 0.35}})
    assert passed.passed and passed.checks[-1] == "val_loss 0.3 vs champion v1 0.35: better"
    refused = decide(gate, {"val_loss": 0.40}, {"version": 1, "summary": {"val_loss": 0.35}})
    assert refused.text == "refused: val_loss 0.4 vs champion v1 0.35: not better"
    # the default champion metric (nrmse) is not what an application measures: refused, saying so
    nrmse = decide(Gate(rules=[]), {"val_loss": 0.3}, {"version": 1, "summary": {"val_loss": 0.35}})
    assert nrmse.reasons == ["the champion v1 (production) could not be scored: no nrmse"]


def test_an_application_is_scored_by_its_own_validation_on_its_held_out_split(tmp_path):
    import numpy as np
    import pytorch_lightning as pl

    from maelflow.apps.common import regular_grid, write_anemoi
    from maelflow.operations.app_scores import evaluate_application
    from maelflow.operations.scores import EvaluationError
    from maelflow.training.examples.tiny import TinyForecaster, ZarrPairs

    lats, lons = regular_grid(4, 5)
    rng = np.random.default_rng(0)
    data = np.cumsum(rng.standard_normal((24, 3, 1, 20)), axis=0)   # a random walk: persistence is good
    ds = write_anemoi(tmp_path / "ds.zarr", data=data, variables=["a", "b", "c"], latitudes=lats, longitudes=lons,
                      start="2020-01-01T00:00:00", frequency_hours=6, attrs={"uuid": "u"})
    cfg = {"max_epochs": 1, "lr": 0.01, "batch_size": 4}
    dm = ZarrPairs(dataset_paths=[str(ds)], batch_size=4)
    dm.setup("fit")
    trainer = pl.Trainer(max_epochs=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=str(tmp_path))
    trainer.fit(TinyForecaster(lr=0.01, **dm.model_kwargs), datamodule=dm)
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    app, module = "maelflow.training.examples.tiny:TinyForecaster", "maelflow.training.examples.tiny:ZarrPairs"
    ev = evaluate_application(app, module, tmp_path / "last.ckpt", [ds], cfg)
    assert set(ev.summary()) >= {"val_loss"} and 0 < ev.summary()["val_loss"] < 10
    assert ev.to_json()["how"].startswith(f"{app} validation (ZarrPairs")
    # the same weights score the same: what lets a champion be compared on the same data
    assert evaluate_application(app, module, tmp_path / "last.ckpt", [ds], cfg).metrics == ev.metrics
    (tmp_path / "other.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(EvaluationError, match="not a checkpoint .* can load"):
        evaluate_application(app, module, tmp_path / "other.ckpt", [ds], cfg)

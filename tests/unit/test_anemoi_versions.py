"""anemoi versions: which line a release belongs to, the keys of each line's schema, and
``maelflow validate`` refusing a training key the site's anemoi-training does not have."""

from __future__ import annotations

import json
import re
import tomllib
import zipfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from maelflow.cli.main import cli
from maelflow.config.errors import ConfigError
from maelflow.config.loader import load_experiment
from maelflow.config.models import Training
from maelflow.training import anemoi_versions as av
from tests.conftest import REPO, write_yaml

pytestmark = pytest.mark.unit

OLD, CURRENT = av.LINES


def _training(config=None, overrides=()):
    return Training(name="t", application="anemoi", datasets=["d"], config=config or {}, overrides=list(overrides))


# ------------------------------------------------------------------------------------- lines
@pytest.mark.parametrize("version, line", [("0.10.0", "0.10"), ("0.10.3", "0.10"), ("0.17.1", "0.17"),
                                           ("0.17", "0.17"), ("0.18.0", "0.17"), ("0.17.2rc1", "0.17"),
                                           ("1.2.0", "0.17")])
def test_a_release_belongs_to_its_line(version, line):
    assert av.line_for(version).name == line


@pytest.mark.parametrize("version", ["0.11.0", "0.13.0", "0.16.4", "0.9.0"])
def test_releases_between_the_lines_are_refused_with_what_is_supported(version):
    with pytest.raises(av.AnemoiVersionError) as err:
        av.line_for(version)
    assert version in str(err.value) and "0.10.x" in err.value.hint and "0.17 and later" in err.value.hint
    assert err.value.exit_code == 2


def test_not_a_version():
    with pytest.raises(av.AnemoiVersionError, match="not an anemoi-training version"):
        av.line_for("latest")


def test_the_main_environment_has_the_010_line_and_its_shipped_schema():
    version = av.installed_version()
    assert av.installed_line() is OLD and version == OLD.tested
    described = av.describe_installed()  # what schema.json was made from: refresh it when anemoi moves
    assert described["tree"] == OLD.schema().tree and described["groups"] == OLD.schema().groups


# ------------------------------------------------------------------------------------ schemas
@pytest.mark.parametrize("key, in_old, in_current", [
    ("training.lr.rate", True, False),
    ("training.optimization.lr", False, True),
    ("training.optimization.lr_scheduler.warmup_t", False, True),
    ("training.multistep_input", True, False),
    ("task.multistep_input", False, True),
    ("task.rollout.maximum", False, True),
    ("data.timestep", True, False),
    ("training.max_steps", True, True),
    ("model.num_channels", True, True),
    ("graph.nodes.hidden.node_builder.resolution", True, True),
    ("data.datasets.era5.forcing", True, True),         # a dataset name of the user's
    ("model.processor.any_kwarg", True, True),          # a _target_ class's keyword argument
    ("dataloader.limit_batches.training", True, True),
    ("system.input.dataset", True, True),
    ("training.no_such_key", False, False),
    ("no_such_group", False, False),
])
def test_each_lines_keys(key, in_old, in_current):
    assert (OLD.schema().has(key), CURRENT.schema().has(key)) == (in_old, in_current)


def test_both_base_configs_only_use_their_own_lines_keys():
    import yaml

    for line in av.LINES:
        base = yaml.safe_load((line.config_dir / "maelflow-base.yaml").read_text())
        body = {k: v for k, v in base.items() if k != "defaults"}
        assert av.training_problems(_training(body), line) == [], line.name
        groups = [next(iter(d)) for d in base["defaults"] if isinstance(d, dict)]
        for group in groups:
            option = next(d[group] for d in base["defaults"] if isinstance(d, dict) and group in d)
            assert option in line.schema().groups[group], (line.name, group, option)


# ---------------------------------------------------------------------------- training checks
def test_a_010_training_on_the_current_line_names_each_moved_key():
    t = _training({"training": {"lr": {"rate": 1e-3, "warmup": 2}, "max_steps": 20}, "data": {"timestep": "6h"}},
                  ["training.multistep_input=3", "model=graphtransformer", "~training.rollout",
                   "+diagnostics.log.mlflow.terminal=true", "+diagnostics.foo=1", "+training.lr.rate=1"])
    problems = {field: (value, why) for field, value, why in av.training_problems(t, CURRENT)}
    assert set(problems) == {"config.training.lr.rate", "config.training.lr.warmup", "config.data.timestep",
                             "overrides[0]", "overrides[5]"}  # not [4]: '+' adds a key to a known mapping
    assert problems["config.training.lr.rate"][0] == 1e-3
    assert "no key 'training.lr'" in problems["config.training.lr.rate"][1]
    assert "training.optimization.lr" in problems["config.training.lr.rate"][1]
    assert "task.timestep" in problems["config.data.timestep"][1]
    assert problems["overrides[0]"][0] == "training.multistep_input=3"
    assert "task.multistep_input" in problems["overrides[0]"][1]
    assert av.training_problems(t, OLD) == []


def test_a_current_training_on_the_010_line():
    t = _training({"task": {"multistep_input": 3}}, ["training.optimization.lr=0.01"])
    problems = {field: why for field, _, why in av.training_problems(t, OLD)}
    assert set(problems) == {"config.task.multistep_input", "overrides[0]"}
    assert "training.multistep_input" in problems["config.task.multistep_input"]
    assert "training.lr" in problems["overrides[0]"]
    assert av.training_problems(t, CURRENT) == []


def test_group_overrides_are_checked_against_the_lines_options():
    assert av.training_problems(_training(overrides=["model=transformer", "graph=multi_scale"]), CURRENT) == []
    ((field, value, why),) = av.training_problems(_training(overrides=["model=nosuch"]), CURRENT)
    assert field == "overrides[0]" and value == "model=nosuch" and "'model' option 'nosuch'" in why and "gnn" in why
    ((_, _, why),) = av.training_problems(_training(overrides=["task=forecaster"]), OLD)
    assert "no config group 'task'" in why and "training.multistep_input" in why
    assert av.training_problems(_training(overrides=["task=forecaster"]), CURRENT) == []


def test_the_projects_anemoi_trainings_fit_both_lines():
    import yaml

    for path in sorted((REPO / "configs" / "trainings").glob("*.yaml")):
        data = yaml.safe_load(path.read_text())
        if data.get("application") != "anemoi":
            continue
        t = Training(**data)
        for line in av.LINES:
            assert av.training_problems(t, line) == [], (path.name, line.name)


# --------------------------------------------------------------------------------- validate
def _experiment(root: Path, training: dict) -> str:
    write_yaml(root / "trainings" / "versioned.yaml",
               {"name": "versioned", "application": "anemoi", "datasets": ["synth-demo-local-5p0-2020-2020-6h-v1"],
                "time_limit": "00:10:00", **training})
    return str(write_yaml(root / "experiments" / "versioned.yaml",
                          {"name": "versioned", "sites": ["local"], "datasets": ["synth-demo-local-5p0-2020-2020-6h-v1"],
                           "trainings": ["versioned"]}))


def test_validate_refuses_a_key_the_local_sites_installed_anemoi_lacks(config_root):
    exp = _experiment(config_root, {"config": {"training": {"optimization": {"lr": 0.01}}}})
    with pytest.raises(ConfigError) as err:
        load_experiment(exp, placeholders={"workspace": "/ws"})
    (problem,) = [p for p in err.value.problems if "anemoi" in p.reason]
    assert problem.file.endswith("trainings/versioned.yaml") and problem.field == "config.training.optimization.lr"
    assert problem.value == 0.01
    assert "site 'local' runs anemoi-training 0.10.0 (installed here)" in problem.reason
    assert "training.lr" in problem.reason


def test_a_site_pinned_to_the_current_line_is_checked_against_it(config_root):
    exp = _experiment(config_root, {"config": {"training": {"lr": {"rate": 0.01}}}})
    with pytest.raises(ConfigError) as err:
        load_experiment(exp, ["site.local.anemoi_version=0.17.1"], placeholders={"workspace": "/ws"})
    (problem,) = err.value.problems
    assert problem.field == "config.training.lr.rate" and "0.17.1 (site profile)" in problem.reason
    assert "training.optimization" in problem.reason
    rx = load_experiment(exp, ["site.local.anemoi_version=0.10.0"], placeholders={"workspace": "/ws"})
    assert rx.sites["local"].anemoi_version == "0.10.0"


def test_a_site_pinned_to_an_unsupported_release(config_root):
    exp = _experiment(config_root, {})
    with pytest.raises(ConfigError) as err:
        load_experiment(exp, ["site.local.anemoi_version=0.13.0"], placeholders={"workspace": "/ws"})
    (problem,) = err.value.problems
    assert problem.field == "anemoi_version" and problem.value == "0.13.0" and "not supported" in problem.reason
    with pytest.raises(ConfigError) as err:
        load_experiment(exp, ["site.local.anemoi_version=latest"], placeholders={"workspace": "/ws"})
    assert any(p.field.endswith("anemoi_version") for p in err.value.problems)


def test_validate_reports_each_sites_anemoi(config_root):
    exp = _experiment(config_root, {})
    run = CliRunner().invoke(cli, ["validate", exp, "sites=[local,lumi]", "site.lumi.anemoi_version=0.17.1",
                                   "--json"])
    assert run.exit_code == 0, run.output
    report = json.loads(run.output)["anemoi"]
    assert report["local"] == {"version": "0.10.0", "line": "0.10", "source": "installed here"}
    assert report["lumi"] == {"version": "0.17.1", "line": "0.17", "source": "site profile"}
    run = CliRunner().invoke(cli, ["validate", exp, "sites=[local,lumi]"])
    assert run.exit_code == 0 and "lumi unknown (set anemoi_version in the site profile)" in " ".join(run.output.split())


def test_a_key_valid_on_one_site_and_not_the_other(config_root):
    """A training runs on every site of its experiment: each site's release is checked."""
    exp = _experiment(config_root, {"overrides": ["training.multistep_input=3"]})
    with pytest.raises(ConfigError) as err:
        load_experiment(exp, ["sites=[local,lumi]", "site.lumi.anemoi_version=0.17.1"],
                        placeholders={"workspace": "/ws"})
    (problem,) = err.value.problems
    assert problem.field == "overrides[0]" and "site 'lumi'" in problem.reason and "task.multistep_input" in problem.reason


# ------------------------------------------------------------------------------- checkpoints
def _checkpoint(path: Path, module_version) -> Path:
    meta = {"version": "2.0", "uuid": "u-1", "parent_uuid": "u-0", "run_id": "r1",
            "training": {"global_step": 20}, "tracker": {"mlflow": {"id": "r1"}},
            "metadata_inference": {"task": "forecaster"},
            "provenance_training": {"module_versions": {"anemoi.training": module_version}},
            "dataset": {"data": {"arguments": {"args": [{"dataset": "/data/a.zarr", "frequency": "6h"}],
                                               "kwargs": {"start": "2020-01-01"}}}}}
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("inference-last/data.pkl", b"\x80\x04N.")
        z.writestr("inference-last/anemoi-metadata/anemoi.json", json.dumps(meta))
    return path


@pytest.mark.parametrize("module_version, version, line", [({"version": "0.17.1"}, "0.17.1", "0.17"),
                                                            ({"version": "0.10.0"}, "0.10.0", "0.10"),
                                                            ("0.10.0", "0.10.0", "0.10"),
                                                            ("0.14.0", "0.14.0", None)])
def test_a_checkpoints_summary_is_the_same_for_either_line(tmp_path, module_version, version, line):
    summary = av.checkpoint_summary(_checkpoint(tmp_path / "c.ckpt", module_version))
    assert summary == {"uuid": "u-1", "parent_uuid": "u-0", "run_id": "r1", "anemoi_version": version,
                       "anemoi_line": line, "global_step": 20, "mlflow_run_id": "r1", "task": "forecaster",
                       "datasets": ["/data/a.zarr"]}


def test_a_file_without_anemoi_metadata(tmp_path):
    plain = tmp_path / "last.ckpt"
    plain.write_bytes(b"not a zip")
    assert av.checkpoint_summary(plain) is None and av.checkpoint_metadata(tmp_path / "missing.ckpt") is None


# ------------------------------------------------------------------------------ installation
def test_the_second_environment_installs_the_release_ci_tests():
    """pyproject's anemoi-current extra, the overrides file and the line's tested release agree."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    extra = project["project"]["optional-dependencies"]["anemoi-current"]
    assert f"anemoi-training[plotting]=={CURRENT.tested}" in extra
    overrides = [ln for ln in (REPO / "overrides-anemoi-current.txt").read_text().splitlines()
                 if ln and not ln.startswith("#")]
    constraints = (REPO / "constraints.txt").read_text()
    torch = re.search(r"^torch==(\S+)", constraints, re.M).group(1)
    assert f"torch=={torch}+cpu" in overrides  # only the local CPU wheel can meet it: no CUDA download
    assert "--anemoi-current" in (REPO / "scripts" / "install.sh").read_text()
    assert ".venv-anemoi17/bin/python -m pytest" in (REPO / ".ci" / "run").read_text()

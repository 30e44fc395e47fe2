"""Config composition and validation: every problem names file, field, value and reason."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from maelflow.cli.main import cli
from maelflow.config.errors import ConfigError
from maelflow.config.loader import ResolvedExperiment, load_experiment
from tests.conftest import write_yaml

pytestmark = pytest.mark.unit


def test_demo_resolves_its_parts(config_root):
    rx = load_experiment("demo", config_root=config_root, placeholders={"workspace": "/ws"})
    assert list(rx.sites) == ["local"]
    assert rx.sites["local"].paths.datasets == "/ws/sites/local/datasets"
    assert rx.datasets["synth-demo-local-5p0-2020-2020-6h-v1"].source == "/ws/data/synth-demo-local-5p0-2020-2020-6h-v1.zarr"
    assert rx.trainings["tiny"].application.endswith(":TinyForecaster")


def test_sites_switch_on_the_command_line(config_root):
    rx = load_experiment("demo", ["sites=[lumi,leonardo]"], config_root=config_root)
    assert list(rx.sites) == ["lumi", "leonardo"]
    assert rx.sites["leonardo"].connection.ssh.auth == "certificate"
    assert rx.sites["lumi"].gpus.per_node == 8


def test_part_override_reaches_one_site(config_root):
    rx = load_experiment("demo", ["sites=[lumi]", "site.lumi.slurm.account=project_465000123"],
                         config_root=config_root)
    assert rx.sites["lumi"].slurm.account == "project_465000123"


def test_every_real_site_validates(config_root):
    rx = load_experiment("demo", ["sites=[lumi,leonardo,marenostrum5,jupiter,local]"], config_root=config_root)
    assert {s.scheduler for s in rx.sites.values()} == {"slurm", "local"}
    assert rx.sites["marenostrum5"].internet.login is False


def test_all_problems_reported_together(config_root):
    with pytest.raises(ConfigError) as info:
        load_experiment("demo", ["sites=[lumi,nowhere]", "site.lumi.slurm.max_time=forever",
                                 "training.tiny.colour=red"], config_root=config_root)
    problems = {(p.field, str(p.value)): p for p in info.value.problems}
    assert ("sites[1]", "nowhere") in problems
    assert problems[("sites[1]", "nowhere")].file.endswith("experiments/demo.yaml")
    assert "no site file" in problems[("sites[1]", "nowhere")].reason
    assert ("slurm.max_time", "forever") in problems
    assert problems[("slurm.max_time", "forever")].file.endswith("sites/lumi.yaml")
    assert "SLURM time limit" in problems[("slurm.max_time", "forever")].reason
    assert ("colour", "red") in problems
    assert "unknown field" in problems[("colour", "red")].reason


def test_training_checked_against_sites(config_root):
    with pytest.raises(ConfigError) as info:
        load_experiment("demo", ["sites=[leonardo]", "training.tiny.gpus_per_node=8",
                                 "training.tiny.time_limit=2-00:00:00", "training.tiny.datasets=[other]"],
                        config_root=config_root)
    reasons = {p.field: p.reason for p in info.value.problems}
    assert "4 GPUs per node" in reasons["gpus_per_node"]
    assert "24:00:00" in reasons["time_limit"]
    assert "not listed in the experiment" in reasons["datasets[0]"]


def test_bad_application_path(config_root):
    with pytest.raises(ConfigError) as info:
        load_experiment("demo", ["training.tiny.application=not a path"], config_root=config_root)
    assert info.value.problems[0].field == "application"


def test_node_name_collision(config_root):
    write_yaml(config_root / "datasets" / "a-b.yaml", {"source": "/x"})
    write_yaml(config_root / "datasets" / "a_b.yaml", {"source": "/y"})
    with pytest.raises(ConfigError) as info:
        load_experiment("demo", ["datasets=[a-b,a_b]", "trainings=[]"], config_root=config_root)
    assert "same ecFlow node name" in info.value.problems[0].reason


def test_resolved_round_trips_through_json(config_root):
    rx = load_experiment("demo", config_root=config_root, placeholders={"workspace": "/ws"})
    again = ResolvedExperiment.from_json(json.loads(json.dumps(rx.to_json())))
    assert again.to_json() == rx.to_json()


def test_validate_cli_exit_code_and_message(config_root, tmp_path, monkeypatch):
    monkeypatch.setenv("MAELFLOW_CONFIG_DIR", str(config_root))
    runner = CliRunner()
    ok = runner.invoke(cli, ["validate", "demo", "--workspace", str(tmp_path / "ws")])
    assert ok.exit_code == 0, ok.output
    assert "valid" in ok.output
    bad = runner.invoke(cli, ["validate", "demo", "sites=[lumi]", "site.lumi.cpus_per_node=-3", "--json",
                              "--workspace", str(tmp_path / "ws")])
    assert bad.exit_code == 2
    data = json.loads(bad.output)
    assert data["valid"] is False
    (problem,) = data["problems"]
    assert problem["field"] == "cpus_per_node" and problem["value"] == -3
    assert problem["file"].endswith("sites/lumi.yaml")


def test_experiment_given_by_path(config_root):
    path = write_yaml(config_root / "experiments" / "mine.yaml",
                      {"name": "mine", "sites": ["local"], "datasets": [], "trainings": []})
    rx = load_experiment(str(path))
    assert rx.name == "mine" and rx.config_root == str(config_root)


def test_yaml_syntax_error_names_the_file(config_root):
    (config_root / "sites" / "local.yaml").write_text("name: local\nscheduler: [unclosed\n")
    with pytest.raises(ConfigError) as info:
        load_experiment("demo", config_root=config_root)
    assert info.value.problems[0].file.endswith("sites/local.yaml")


def test_defaults_list_composes_with_hydra(config_root):
    write_yaml(config_root / "experiments" / "child.yaml",
               {"defaults": ["demo", "_self_"], "name": "child", "description": "inherits the demo"})
    rx = load_experiment("child", ["sites=[lumi]"], config_root=config_root)
    assert rx.name == "child" and rx.experiment.description == "inherits the demo"
    assert list(rx.sites) == ["lumi"] and list(rx.trainings) == ["tiny-anemoi", "tiny"]


def test_unknown_application_fails_at_validate(config_root):
    with pytest.raises(ConfigError) as info:
        load_experiment("demo", ["training.tiny.application=maelflow.training.examples.tiny:NoSuchModel",
                                 "training.tiny.datamodule=not_a_package.data:Pairs"], config_root=config_root)
    reasons = {p.field: p.reason for p in info.value.problems}
    assert "defines no 'NoSuchModel'" in reasons["application"]
    assert "'not_a_package.data' cannot be found" in reasons["datamodule"]


def test_missing_dataset_fails_at_validate(config_root):
    with pytest.raises(ConfigError) as info:
        load_experiment("demo", ["datasets=[era5-missing]"], config_root=config_root)
    found = {(p.file.rsplit("/", 2)[-2], p.field, p.reason.split(" /")[0]) for p in info.value.problems}
    assert ("experiments", "datasets[0]", "no dataset file") in found
    assert any(f == "trainings" and "not listed in the experiment" in r for f, _, r in found)


def test_impossible_gpu_count_fails_at_validate(config_root):
    with pytest.raises(ConfigError) as info:
        load_experiment("demo", ["sites=[jupiter]", "training.tiny-anemoi.gpus_per_node=8"], config_root=config_root)
    (p,) = info.value.problems
    assert p.field == "gpus_per_node" and p.value == 8 and "4 GPUs per node" in p.reason
    assert "(value given on the command line)" not in p.reason  # a cross check names the site instead

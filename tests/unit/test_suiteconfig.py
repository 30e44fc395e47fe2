"""The job entry points' view of the built experiment.json: the same values the models give for what
they read (connection argv, #SBATCH lines, site folder), no config models imported, and a file that
lacks a setting validated the full way instead."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from maelflow.config.loader import ResolvedExperiment, load_experiment
from maelflow.sites.connections.ssh import SshConnection
from maelflow.sites.schedulers import TaskResources, scheduler_for
from maelflow.sites.suiteconfig import SuiteSites, View, load

pytestmark = pytest.mark.unit


@pytest.fixture
def built(tmp_path):
    rx = load_experiment("demo", ["sites=[lumi,leonardo]"])
    path = tmp_path / "experiment.json"
    path.write_text(json.dumps(rx.to_json(), indent=2, sort_keys=True))
    return rx, path


def test_views_give_what_the_models_give(built, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    rx, path = built
    light = load(path)
    assert isinstance(light, SuiteSites) and light.name == rx.name and set(light.sites) == set(rx.sites)
    task = TaskResources(nodes=2, tasks_per_node=4, gpus_per_node=4, time="48:00:00")
    for name, model in rx.sites.items():
        view = light.sites[name]
        assert isinstance(view, View) and view.paths.root == model.paths.root
        assert view.reporting == model.reporting and view.connection.type == model.connection.type
        assert (SshConnection(name, view.connection.ssh).ssh_command()
                == SshConnection(name, model.connection.ssh).ssh_command())
        slurm = scheduler_for(name, model)
        assert (slurm.directives(view, task, job_name="j", output="o", token="t")
                == slurm.directives(model, task, job_name="j", output="o", token="t"))
    with pytest.raises(AttributeError):
        light.sites["lumi"].paths.root = "/elsewhere"


def test_a_file_lacking_a_setting_is_validated_with_its_default(built):
    rx, path = built
    data = json.loads(path.read_text())
    del data["sites"]["lumi"]["connection"]["ssh"]["proxy_jump"]       # as an older maelflow wrote it
    path.write_text(json.dumps(data))
    full = load(path)
    assert isinstance(full, ResolvedExperiment)
    assert full.sites["lumi"].connection.ssh.proxy_jump == rx.sites["lumi"].connection.ssh.proxy_jump
    path.write_text(json.dumps({"sites": {}}))
    with pytest.raises(ValueError, match="not a suite configuration"):
        load(path)


def test_the_job_command_reads_it_without_the_config_models(built):
    _, path = built
    code = ("import sys; from maelflow.cli import job; rx = job._rx(sys.argv[1]); "
            "from maelflow.sites.runner import runner_for; runner_for(rx, 'lumi', dry_run=True); "
            "print(sorted(m for m in sys.modules if m.startswith(('pydantic', 'maelflow.config.models'))))")
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr

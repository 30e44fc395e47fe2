"""The suite on the loopback HPC site: SSH + SLURM jobs reporting through the relay.

A real sshd with its own user and key, a real single-node SLURM with munge; nothing is mocked.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from maelflow.config.loader import load_experiment
from maelflow.demo import prepare_datasets
from maelflow.ecf import client_for
from maelflow.placeholders import placeholders_for
from maelflow.suite.follow import follow
from maelflow.suite.server import control, deploy, find, tree
from maelflow_sandbox import hpc
from tests.conftest import PREBUILT, write_yaml
from tests.integration.suite_helpers import wait_for

pytestmark = pytest.mark.integration


def _deploy(ws, config_root, name, *overrides):
    exp = write_yaml(config_root / "experiments" / f"{name}.yaml",
                     {"name": name, "sites": ["localhpc"], "datasets": ["synth-small-numpy-10p0-2020-2020-6h-v1"], "trainings": ["tiny"]})
    rx = load_experiment(str(exp), [PREBUILT, *overrides], placeholders=placeholders_for(ws))
    prepare_datasets(rx)
    client = client_for(ws)
    deploy(rx, ws, client)
    return rx, client


def _squeue_state(ws, job_id: str) -> str:
    info = hpc.connection_info(ws)
    out = subprocess.run(["ssh", *info["ssh_options"], f"{info['user']}@127.0.0.1",
                          f"squeue -h -t all -j {job_id} -o %T"], capture_output=True, text=True, timeout=30)
    return out.stdout.strip()


def test_suite_completes_through_ssh_slurm_and_relay(hpc_stack, config_root):
    ws = hpc_stack
    rx, client = _deploy(ws, config_root, "h_run")
    wait_for(client, "/h_run", {"complete"}, timeout=300)
    data = tree(client, "h_run")
    train = find(data, "/h_run/localhpc/train/tiny/train")
    # set from inside the SLURM job, replayed by the relay
    assert train["meters"]["epoch"]["value"] == 3
    assert train["events"]["checkpoint"] is True
    assert "epoch" in train["labels"]["checkpoint"]
    record = json.loads(ws.path("suites", "h_run", "jobs", "h_run", "localhpc", "train", "tiny",
                                "train.job1.sub").read_text())
    assert record["kind"] == "slurm" and record["job_id"].isdigit()
    stage = find(data, "/h_run/localhpc/data/synth_small_numpy_10p0_2020_2020_6h_v1/stage")
    assert stage["meters"]["progress"]["value"] == 100 and stage["events"]["verified"] is True
    assert "/home/" in stage["labels"]["info"]
    # compute nodes have no network: the run was logged offline and synced by the server-side task
    sync = find(data, "/h_run/localhpc/train/tiny/sync")
    assert "1 new" in sync["labels"]["info"]
    # job output is mirrored beside the server for ecFlow UI
    out = ws.path("suites", "h_run", "jobs", "h_run", "localhpc", "train", "tiny", "train.1")
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and "max_epochs=3" not in (out.read_text() if out.exists() else ""):
        time.sleep(0.5)
    assert "max_epochs=3" in out.read_text()


def test_kill_cancels_the_slurm_job(hpc_stack, config_root):
    ws = hpc_stack
    rx, client = _deploy(ws, config_root, "h_kill", "training.tiny.config.max_epochs=100000")
    path = "/h_kill/localhpc/train/tiny/train"
    node = wait_for(client, path, {"active"}, timeout=300)
    job_id = node["rid"]
    assert _squeue_state(ws, job_id) == "RUNNING"
    t0 = time.monotonic()
    control(client, "kill", path)
    node = wait_for(client, path, {"aborted"}, timeout=60)
    assert "killed by a signal" in node["aborted_reason"] or "scancel" in node["aborted_reason"]
    assert _squeue_state(ws, job_id) in ("CANCELLED", "")
    assert time.monotonic() - t0 < 45


def test_unusable_credential_aborts_fast_with_renew_hint(hpc_stack, config_root):
    ws = hpc_stack
    rx, client = _deploy(ws, config_root, "h_cred")
    control(client, "suspend", "/h_cred/localhpc")
    key = Path(hpc.connection_info(ws)["identity_file"])
    hidden = key.with_name(key.name + ".away")
    key.rename(hidden)
    # the master that key opened is shared by every maelflow process and would outlive the key (as
    # OpenSSH's does an expired certificate): stop it, as ControlPersist would after 120 s idle
    from maelflow.sites.connections import connect

    connect("localhpc", rx.sites["localhpc"]).close(stop=True)
    try:
        wait_for(client, "/h_cred/publish/synth_small_numpy_10p0_2020_2020_6h_v1/publish", {"complete"}, timeout=120)
        t0 = time.monotonic()
        control(client, "resume", "/h_cred/localhpc")
        node = wait_for(client, "/h_cred/localhpc/data/synth_small_numpy_10p0_2020_2020_6h_v1/stage", {"aborted"}, timeout=30)
        assert time.monotonic() - t0 < 10
        assert "maelflow services up --with-hpc" in node["aborted_reason"]  # the site's renew hint
        assert str(key) in node["aborted_reason"]
    finally:
        hidden.rename(key)


def test_timeout_is_resubmitted_and_resumes_from_checkpoint(hpc_stack, config_root):
    """SLURM stops the job at a 1-minute limit; the suite resubmits it; training continues."""
    ws = hpc_stack
    # ~12 steps an epoch at 0.25 s a step: about 2 minutes of training, more than one 60-90 s job
    epochs = 40
    rx, client = _deploy(ws, config_root, "h_timeout", "training.tiny.time_limit=00:01:00",
                         f"training.tiny.config.max_epochs={epochs}", "training.tiny.config.step_seconds=0.25",
                         "training.tiny.max_resubmissions=5")
    path = "/h_timeout/localhpc/train/tiny/train"
    follow(client, "h_timeout", timeout=600, interval=0.5)   # each time-limit abort waits for its resubmission
    data = tree(client, "h_timeout")
    train = find(data, path)
    assert data["suites"][0]["state"] == "complete", train
    assert train["meters"]["epoch"]["value"] == epochs
    client.sync_local()
    resubmits = int(client.get_defs().find_abs_node(path).find_variable("MAELFLOW_RESUBMITS").value())
    assert resubmits >= 1
    # the first job's output says why it stopped
    first = ws.path("suites", "h_timeout", "jobs", "h_timeout", "localhpc", "train", "tiny", "train.1")
    assert "SLURM time limit approaching" in first.read_text()
    # one run, resumed: the run record kept its id and the epoch metric has each epoch exactly once
    import os

    from mlflow import MlflowClient

    run_dirs = list(Path(rx.sites["localhpc"].paths.outputs, "h_timeout", "tiny").glob("*/run.json"))
    assert len(run_dirs) == 1
    state = json.loads(run_dirs[0].read_text())
    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    history = MlflowClient(state["tracking_uri"]).get_metric_history(state["run_id"], "train_loss_epoch")
    steps = [m.step for m in history]
    assert len(set(steps)) == epochs and len(history) <= epochs + resubmits  # an epoch cut short may repeat
    assert train["labels"]["mlflow"].split()[1] == state["run_id"]


def test_the_demo_completes_on_the_loopback_site_with_the_installation_owned_by_another_user(hpc_stack):
    """``maelflow deploy demo sites=[localhpc] trainings=[tiny-anemoi] --wait``: the jobs run as the site
    user (maelhpc) from this installation (the profile's install.fallback_command: no site setup
    here), a git checkout owned by root. anemoi's provenance (git through GitPython: "dubious
    ownership") used to abort the anemoi training here. The whole demo on the loopback site, its
    Lightning training too, runs in tests/integration/test_site_setup.py with the site's own
    installation; the Lightning training from this installation in the tests above."""
    import os
    import sys

    ws = hpc_stack
    repo = Path(__file__).resolve().parents[2]
    site_user = hpc.connection_info(ws)["user"]
    assert repo.stat().st_uid == 0 and site_user != "root"
    maelflow = str(Path(sys.executable).with_name("maelflow"))
    env = dict(os.environ, MAELFLOW_WORKSPACE=str(ws.root))
    run = subprocess.run([maelflow, "deploy", "demo", "sites=[localhpc]", "trainings=[tiny-anemoi]", "--wait",
                          "--timeout", "600"], cwd=repo, env=env, capture_output=True, text=True, timeout=700)
    data = tree(client_for(ws), "demo")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert find(data, "/demo")["state"] == "complete"
    node = find(data, "/demo/localhpc/train/tiny_anemoi/train")
    assert node["state"] == "complete" and node["events"]["checkpoint"] is True, node
    assert node["labels"]["mlflow"].startswith("run "), node["labels"]
    # ... and it ran this installation: no site part here, the job's shell chose the fallback
    root = Path(placeholders_for(ws)["hpc_root"])
    assert not (root / "venv" / "maelflow-site.json").exists()
    job = root / "jobs" / "demo" / "localhpc" / "train" / "tiny_anemoi" / "train.job1"
    header = next(ln for ln in job.read_text().splitlines() if ln.startswith("MAELFLOW="))
    assert header.endswith(f" || echo {maelflow})\""), header

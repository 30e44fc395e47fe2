"""`maelflow site setup|check` on the loopback site: the site part installed from wheels pushed over SSH
(the login node has no registry: internet.login=false), checked item by item, then used by the demo's
jobs through a container prefix (bubblewrap standing in for Apptainer).

Real sshd, SLURM, S3, MLflow and ecFlow; the site part is a second virtual environment in the site
user's home, made by the site user's own interpreter, with every part the profile names (core, train,
anemoi). Nothing is pinned on the command line: before the setup the profile's fallback (this machine's
installation) runs, after it the site part, as a user would see it (docs/sites.md).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from maelflow.ecf import client_for
from maelflow.placeholders import placeholders_for
from maelflow.suite.server import find, tree

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
MAELFLOW = str(Path(sys.executable).with_name("maelflow"))


def maelflow(ws, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, MAELFLOW_WORKSPACE=str(ws.root), COLUMNS="200")
    return subprocess.run([MAELFLOW, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def check(ws, *args: str) -> tuple[int, dict]:
    run = maelflow(ws, "site", "check", "localhpc", "--json", *args)
    return run.returncode, json.loads(run.stdout)


def items(report: dict) -> dict[str, dict]:
    return {i["name"]: i for i in report["items"]}


@pytest.fixture(scope="module")
def site_part(hpc_stack):
    """The loopback site with its own site part: (workspace, its maelflow command, setup's outcome)."""
    ws = hpc_stack
    root = placeholders_for(ws)["hpc_root"]
    command = f"{root}/venv/bin/maelflow"
    # before setup: the profile's fallback, this machine's installation, is what jobs run, and the check says so
    rc, report = check(ws, "--no-job")
    part = items(report)["site part"]
    assert rc == 0 and part["status"] == "ok" and MAELFLOW in part["detail"], report
    assert "install.fallback_command: site setup has not run" in part["detail"]
    # a site part asked for by path but not installed: the check names the command that installs it
    rc, report = check(ws, "--no-job", "-o", f"maelflow_command={command}")
    assert rc == 1 and items(report)["site part"]["status"] == "failed", report
    assert "maelflow site setup localhpc" in items(report)["site part"]["fix"]
    run = maelflow(ws, "site", "setup", "localhpc", "-o", "internet.login=false", "--json")
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    return ws, command, json.loads(run.stdout)


def test_setup_installs_pushed_wheels_and_the_check_passes(site_part):
    ws, command, outcome = site_part
    record = outcome["record"]
    assert outcome["status"] == "installed" and record["source"] == "pushed wheels"
    installed = {k.lower(): v for k, v in record["installed"].items()}
    assert installed["torch"] == "2.13.0+cpu" and installed["maelflow"] == record["info"]["maelflow"]
    # every part of the profile, pinned to this installation's versions
    from importlib.metadata import version

    assert installed["anemoi-training"] == version("anemoi-training") and "pytorch-lightning" in installed
    # the profile's own package, built from this checkout, and its start-up module (the torchvision shim,
    # without which the demo's trainings below could not import torchvision beside the CPU torch)
    assert "maelflow-sandbox" in installed and record["wanted"]["startup"] == ["maelflow_sandbox.tvshim"]
    # no server pieces: MLflow's server (flask), the catalogue's index (psycopg), ecFlow
    assert not {"mlflow", "flask", "psycopg", "ecflow"} & set(installed), installed
    # idempotent: the same request again changes nothing
    again = maelflow(ws, "site", "setup", "localhpc", "-o", "internet.login=false", "--json")
    assert again.returncode == 0 and json.loads(again.stdout)["status"] == "unchanged", again.stderr[-2000:]
    # the check as a user types it after the setup: the site part, found by its record, no override
    rc, report = check(ws)
    assert rc == 0 and report["ok"], report
    found = items(report)
    assert {"login", "scheduler", "paths.root", "site part", "s3", "compute node"} <= set(found)
    assert f"{command} (the site part)" in found["site part"]["detail"] and found["compute node"]["status"] == "ok"


def test_check_names_an_unwritable_path_and_an_unreachable_s3_endpoint_with_their_fixes(site_part, tmp_path):
    ws, command, _ = site_part
    theirs = tmp_path / "not-yours"          # root's 0700 test folder: the site user cannot write there
    theirs.mkdir(mode=0o700)
    rc, report = check(ws, "--no-job", "-o", f"paths.outputs={theirs}")
    bad = items(report)["paths.outputs"]
    assert rc == 1 and bad["status"] == "failed" and str(theirs) in bad["detail"]
    assert "paths.outputs" in bad["fix"]
    # stage pulls on the login node with the site's EWC file: point it at a port nobody listens on
    from maelflow import ewc
    from maelflow.datasets.settings import load_site
    from maelflow.services.stack import s3_settings
    from maelflow.sites.connections import connect

    site = load_site("localhpc", ws)
    conn = connect("localhpc", site)
    path = ewc.site_credentials_path(site.paths.root)
    good = conn.read_bytes(path) if conn.exists(path) else None
    dead = {**s3_settings(ws, ewc.SITE_ROLE), "endpoint_url": "http://127.0.0.1:9"}
    conn.put_text(path, json.dumps(dead), mode=0o600)
    try:
        rc, report = check(ws, "--no-job")
    finally:
        if good is None:
            conn.run(f"rm -f {path}")
        else:
            conn.put_text(path, good.decode(), mode=0o600)
    s3 = items(report)["s3"]
    assert rc == 1 and s3["status"] == "failed" and "http://127.0.0.1:9" in s3["detail"], report
    assert "internet.login: false" in s3["fix"]


def test_deploy_refuses_a_site_without_this_maelflow_and_the_demo_runs_with_the_site_part_in_a_container(site_part):
    """One demo run for three things: ``maelflow deploy demo sites=[localhpc]`` as a user types it after
    the setup, both its trainings (anemoi and Lightning) run in the site part, and through a container
    prefix (bubblewrap, the node's root read-only and the site's paths read-write, standing in for
    Apptainer). It is also the test of the demo's anemoi training on the loopback site."""
    ws, command, _ = site_part
    refused = maelflow(ws, "deploy", "demo", "sites=[localhpc]", "site.localhpc.maelflow_command=/nowhere/bin/maelflow")
    assert refused.returncode != 0 and "maelflow site setup localhpc" in refused.stderr, refused.stderr[-1500:]
    run = maelflow(ws, "deploy", "demo", "sites=[localhpc]",
                   "site.localhpc.container.runtime=bwrap", "site.localhpc.container.image=/",
                   "--wait", "--timeout", "600", timeout=660)
    data = tree(client_for(ws), "demo")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert find(data, "/demo")["state"] == "complete"
    for path in ("/demo/localhpc/train/tiny_anemoi/train", "/demo/localhpc/train/tiny/train"):
        node = find(data, path)
        assert node["state"] == "complete" and node["events"]["checkpoint"] is True, node
        assert node["labels"]["mlflow"].startswith("run "), node["labels"]
    assert find(data, "/demo/localhpc/train/tiny/train")["meters"]["epoch"]["value"] == 3
    root = Path(command).parents[2]
    # the jobs ran maelflow through the container prefix, and chose the site part by its record ...
    for task in ("tiny", "tiny_anemoi"):
        job = root / "jobs" / "demo" / "localhpc" / "train" / task / "train.job1"
        header = next(ln for ln in job.read_text().splitlines() if ln.startswith("MAELFLOW="))
        assert header.startswith('MAELFLOW="bwrap --ro-bind / / '), header
        assert f" -- $(test -f {root}/venv/maelflow-site.json && echo {command} || echo {MAELFLOW})" in header
    # ... and ran in it: each training's recorded packages are the site's, not the server's
    records = {}
    for path in (root / "outputs" / "demo").rglob("artifacts/provenance.json"):
        prov = json.loads(path.read_text())
        records[prov["training"]] = prov
    assert set(records) == {"tiny", "tiny-anemoi"}, records.keys()
    for training, prov in records.items():
        packages = {k.lower() for k in prov["packages"]}
        assert {"torch", "anemoi-training"} <= packages and not {"flask", "psycopg"} & packages, (training, packages)

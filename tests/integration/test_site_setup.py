"""`maelflow site setup|check` on the loopback site: the site part installed from wheels pushed over SSH
(the login node has no registry: internet.login=false), checked item by item, then used by the demo's
jobs through a container prefix (bubblewrap standing in for Apptainer).

Real sshd, SLURM, S3, MLflow and ecFlow; the site part is a second virtual environment in the site
user's home, made by the site user's own interpreter. It holds the core and train parts (no anemoi):
installing anemoi-training's stack too would add about a minute (docs/sites.md, measured figures).
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
    # before setup: the check names the missing site part and the command that installs it
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
    # no server pieces: MLflow's server (flask, SQLAlchemy), the catalogue's index (psycopg), ecFlow, anemoi
    assert not {"mlflow", "flask", "sqlalchemy", "psycopg", "ecflow", "anemoi-training"} & set(installed), installed
    # idempotent: the same request again changes nothing
    again = maelflow(ws, "site", "setup", "localhpc", "-o", "internet.login=false", "--json")
    assert again.returncode == 0 and json.loads(again.stdout)["status"] == "unchanged", again.stderr[-2000:]
    rc, report = check(ws, "-o", f"maelflow_command={command}")
    assert rc == 0 and report["ok"], report
    found = items(report)
    assert {"login", "scheduler", "paths.root", "site part", "s3", "compute node"} <= set(found)
    assert command in found["site part"]["detail"] and found["compute node"]["status"] == "ok"


def test_check_names_an_unwritable_path_and_an_unreachable_s3_endpoint_with_their_fixes(site_part, tmp_path):
    ws, command, _ = site_part
    theirs = tmp_path / "not-yours"          # root's 0700 test folder: the site user cannot write there
    theirs.mkdir(mode=0o700)
    rc, report = check(ws, "--no-job", "-o", f"maelflow_command={command}", "-o", f"paths.outputs={theirs}")
    bad = items(report)["paths.outputs"]
    assert rc == 1 and bad["status"] == "failed" and str(theirs) in bad["detail"]
    assert "paths.outputs" in bad["fix"]
    # stage pulls on the login node with the site's EWC file: point it at a port nobody listens on
    from maelflow import ewc
    from maelflow.datasets.settings import load_site
    from maelflow.sites.connections import connect

    site = load_site("localhpc", ws)
    conn = connect("localhpc", site)
    path = ewc.site_credentials_path(site.paths.root)
    good = conn.read_bytes(path) if conn.exists(path) else None
    dead = {**ewc.workspace_settings(ws, ewc.SITE_ROLE), "endpoint_url": "http://127.0.0.1:9"}
    conn.put_text(path, json.dumps(dead), mode=0o600)
    try:
        rc, report = check(ws, "--no-job", "-o", f"maelflow_command={command}")
    finally:
        if good is None:
            conn.run(f"rm -f {path}")
        else:
            conn.put_text(path, good.decode(), mode=0o600)
    s3 = items(report)["s3"]
    assert rc == 1 and s3["status"] == "failed" and "http://127.0.0.1:9" in s3["detail"], report
    assert "internet.login: false" in s3["fix"]


def test_deploy_refuses_a_site_without_this_maelflow_and_the_demo_runs_with_the_site_part_in_a_container(site_part):
    """One demo run for two things: its jobs use the site part, and they run through a container prefix
    (bubblewrap, the node's root read-only and the site's paths read-write, standing in for Apptainer)."""
    ws, command, _ = site_part
    refused = maelflow(ws, "deploy", "demo", "sites=[localhpc]", "site.localhpc.maelflow_command=/nowhere/bin/maelflow")
    assert refused.returncode != 0 and "maelflow site setup localhpc" in refused.stderr, refused.stderr[-1500:]
    # the demo with its Lightning training (the site part here has no anemoi)
    run = maelflow(ws, "deploy", "demo", "sites=[localhpc]", "trainings=[tiny]", f"site.localhpc.maelflow_command={command}",
                   "site.localhpc.container.runtime=bwrap", "site.localhpc.container.image=/",
                   "--wait", "--timeout", "500", timeout=560)
    data = tree(client_for(ws), "demo")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    node = find(data, "/demo/localhpc/train/tiny/train")
    assert node["state"] == "complete" and node["events"]["checkpoint"] is True, node
    assert node["meters"]["epoch"]["value"] == 3
    root = Path(command).parents[2]
    # the job ran maelflow through the container prefix ...
    job = root / "jobs" / "demo" / "localhpc" / "train" / "tiny" / "train.job1"
    header = next(ln for ln in job.read_text().splitlines() if ln.startswith("MAELFLOW="))
    assert header.startswith('MAELFLOW="bwrap --ro-bind / / ') and header.endswith(f' -- {command}"'), header
    # ... and in the site part: the training's recorded packages are the site's, not the server's
    prov = list((root / "outputs" / "demo" / "tiny").glob("*/mlruns/*/*/artifacts/provenance.json"))
    assert len(prov) == 1
    packages = {k.lower() for k in json.loads(prov[0].read_text())["packages"]}
    assert "torch" in packages and not {"flask", "psycopg", "anemoi-training"} & packages, packages

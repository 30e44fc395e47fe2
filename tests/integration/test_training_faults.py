"""Faults that ended the loopback-site demo without saying why: provenance gathered by a site user
in an installation (a git checkout) owned by root, and a task whose BrokenPipeError click swallowed,
so that the job output had no traceback."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
import yaml

from maelflow.config.loader import load_experiment
from maelflow.demo import prepare_datasets
from maelflow.ecf import client_for
from maelflow.suite.server import deploy
from tests.conftest import FAST_DATASET, write_yaml
from tests.integration.suite_helpers import wait_for

pytestmark = pytest.mark.integration
SITE_USER = "maelhpc"

GATHER = textwrap.dedent("""
    import json, sys
    root = sys.argv[1]
    sys.path[:0] = [root + "/site", root + "/repo"]
    import provdemo                                         # code imported from the root-owned checkout
    from git import Repo
    from anemoi.utils import provenance as prov
    from maelflow import provenance

    out = {}
    try:                                                    # what anemoi's gatherer meets, unaided
        Repo(root + "/repo").head.commit.hexsha
        out["plain"] = "ok"
    except Exception as exc:
        out["plain"] = type(exc).__name__ + ": " + str(exc)
    out["ours_untrusted"] = provenance.git_info(provenance.Path(root + "/repo"))
    # the guard alone: whatever git does, no exception leaves the gatherer
    guarded = provenance.guarded(prov.gather_provenance_info)
    out["guarded_runs"] = sum(1 for _ in range(20) if isinstance(guarded(), dict))
    provenance.guard_anemoi()                               # trust the installation, wrap the gatherer
    info = prov.gather_provenance_info()
    out["git_versions"] = info["git_versions"]
    out["unavailable"] = info.get("unavailable")
    out["ours_trusted"] = provenance.git_info(provenance.Path(root + "/repo"), trust=True)
    print("RESULT " + json.dumps(out))
""")


def _site_user_can_run_python() -> bool:
    if os.geteuid() != 0 or shutil.which("runuser") is None:
        return False
    try:
        pwd.getpwnam(SITE_USER)
    except KeyError:
        return False
    return subprocess.run(["runuser", "-u", SITE_USER, "--", sys.executable, "-c", "import maelflow, git"],
                          capture_output=True, cwd="/").returncode == 0


@pytest.fixture
def root_owned_install():
    """A git checkout owned by root, installed "editable" (PEP 610), readable by the site user."""
    root = Path(tempfile.mkdtemp(prefix="maelflow-install-"))
    try:
        os.chmod(root, 0o755)
        repo, dist = root / "repo", root / "site" / "provdemo-0.1.dist-info"
        (repo / "provdemo").mkdir(parents=True)
        (repo / "provdemo" / "__init__.py").write_text("X = 1\n")
        dist.mkdir(parents=True)
        (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: provdemo\nVersion: 0.1\n")
        (dist / "direct_url.json").write_text('{"dir_info": {"editable": true}, "url": "file://%s"}' % repo)
        git = ["git", "-C", str(repo), "-c", "user.email=t@t", "-c", "user.name=t"]
        subprocess.run([*git, "init", "-q"], check=True)
        subprocess.run([*git, "add", "."], check=True)
        subprocess.run([*git, "commit", "-qm", "install"], check=True)
        (root / "gather.py").write_text(GATHER)
        subprocess.run(["chmod", "-R", "a+rX", str(root)], check=True)
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_provenance_by_a_site_user_in_a_root_owned_checkout(root_owned_install):
    if not _site_user_can_run_python():
        pytest.skip(f"needs root, runuser and a user {SITE_USER} who can run this interpreter")
    root = root_owned_install
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(root), "LANG": "C.UTF-8"}
    res = subprocess.run(["runuser", "-u", SITE_USER, "--", sys.executable, str(root / "gather.py"), str(root)],
                         env=env, cwd=str(root), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    import json

    out = json.loads(next(ln for ln in res.stdout.splitlines() if ln.startswith("RESULT "))[len("RESULT "):])
    # reproduced: git refuses the checkout ("dubious ownership"); GitPython reports it as an empty SHA
    # (ValueError) or, when git has already exited, as BrokenPipeError, which anemoi does not catch
    assert out["plain"].startswith(("ValueError", "BrokenPipeError")), out
    assert out["ours_untrusted"] == {}
    assert out["guarded_runs"] == 20
    # fixed: with the installation trusted, anemoi and maelflow both read its commit
    commit = subprocess.run(["git", "-C", str(root / "repo"), "rev-parse", "HEAD"], capture_output=True, text=True,
                            check=True).stdout.strip()
    assert out["git_versions"]["provdemo"]["git"]["sha1"] == commit, out
    assert out["unavailable"] is None
    assert out["ours_trusted"]["commit"] == commit and out["ours_trusted"]["dirty"] is False


BROKEN_APP = textwrap.dedent('''
    """A data module that fails as GitPython does when git has exited under it."""


    class Data:
        def __init__(self, **kwargs):
            # "port: " holds "rt:", which ecflow 5.9 reads as its own field when parsing a task's line
            raise BrokenPipeError(32, "Broken pipe (peer port: 50171, try: 2)")


    class App:
        pass
''')


def test_a_failed_train_task_leaves_its_traceback_in_the_job_output(stack, config_root, tmp_path, monkeypatch):
    ws, _ = stack
    helpers = tmp_path / "helpers"
    helpers.mkdir()
    (helpers / "brokenpipe_app.py").write_text(BROKEN_APP)
    monkeypatch.syspath_prepend(str(helpers))         # the config checks the application imports here
    site_file = config_root / "sites" / "local.yaml"
    site = yaml.safe_load(site_file.read_text())
    site["environment"] = [f"export PYTHONPATH={helpers}"]
    write_yaml(site_file, site)
    write_yaml(config_root / "trainings" / "brokenpipe.yaml", {
        "name": "brokenpipe", "description": "fails with a BrokenPipeError",
        "application": "brokenpipe_app:App", "datamodule": "brokenpipe_app:Data",
        "datasets": [FAST_DATASET], "time_limit": "00:05:00", "max_resubmissions": 0, "config": {}})
    name = "t_trace"
    exp = write_yaml(config_root / "experiments" / f"{name}.yaml",
                     {"name": name, "sites": ["local"], "datasets": [FAST_DATASET], "trainings": ["brokenpipe"]})
    rx = load_experiment(str(exp), [], placeholders={"workspace": str(ws.root)})
    prepare_datasets(rx)
    client = client_for(ws)
    deploy(rx, ws, client)
    node = wait_for(client, f"/{name}/local/train/brokenpipe/train", {"aborted"}, timeout=240)
    reason = node["aborted_reason"]
    assert reason.startswith("BrokenPipeError") and "traceback in the job output" in reason, reason
    assert "port\u2236 50171" in reason, reason        # ':' shown as its look-alike, and ...
    client.sync_local()                                 # ... every client still reads the server's tree
    assert client.get_defs().find_abs_node(f"/{name}/local/train/brokenpipe/train") is not None
    out = ws.path("suites", name, "jobs", name, "local", "train", "brokenpipe", "train.1").read_text()
    assert "Traceback (most recent call last)" in out, out[-3000:]
    assert "brokenpipe_app.py" in out and "BrokenPipeError: [Errno 32] Broken pipe" in out

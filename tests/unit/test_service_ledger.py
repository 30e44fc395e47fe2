"""A killed test session's services are stopped by the next one: exactly the processes its ledger
names that are still the ones it started, and nothing else."""

from __future__ import annotations

import os
import subprocess

import pytest

from maelflow.services.base import LEDGER_ENV, ManagedService, pid_alive, process_start, reap_ledger

pytestmark = pytest.mark.unit


def test_reap_stops_the_listed_process_and_leaves_a_reused_pid_alone(tmp_path):
    mine = subprocess.Popen(["sleep", "60"], start_new_session=True)
    other = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        ledger = tmp_path / "s.ledger"
        ledger.write_text(f"{mine.pid} {process_start(mine.pid)} /x/s3\n"
                          f"{other.pid} {process_start(other.pid) + 1} /x/ecflow\n"   # same PID, another process
                          "garbage line\n")
        assert reap_ledger(ledger, grace=2) == [mine.pid]
        mine.wait(timeout=5)
        assert not pid_alive(mine.pid) and other.poll() is None
    finally:
        for p in (mine, other):
            p.kill()
            p.wait()


def test_a_service_start_is_written_to_the_ledger_of_its_session(tmp_path, monkeypatch):
    from maelflow.workspace import Workspace

    class Svc(ManagedService):
        name = "svc"

    ledger = tmp_path / "session.ledger"
    monkeypatch.setenv(LEDGER_ENV, str(ledger))
    svc = Svc(Workspace(tmp_path / "ws"))
    svc.dir.mkdir(parents=True)
    svc._write_pid(os.getpid())
    assert ledger.read_text() == f"{os.getpid()} {process_start(os.getpid())} {svc.dir}\n"
    assert svc.ours()


def test_a_server_does_not_inherit_a_torch_rendezvous(monkeypatch):
    """ecflow_server passes its environment to every job: an inherited MASTER_PORT (an in-process
    training of the starting process) would give every training the same port."""
    from maelflow.services.base import service_environment

    monkeypatch.setenv("MASTER_PORT", "55207")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MAELFLOW_KEEP_ME", "1")
    env = service_environment({"ECF_PORT": "3141"})
    assert "MASTER_PORT" not in env and "MASTER_ADDR" not in env
    assert env["MAELFLOW_KEEP_ME"] == "1" and env["ECF_PORT"] == "3141"

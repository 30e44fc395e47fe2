"""The loopback site's nodes as configuration: two by default (MAELFLOW_HPC_NODES), each a slurmd with
its own port, spool and pid file, and the TaskProlog that keeps every task's listeners on loopback."""

from __future__ import annotations

import socket

import pytest

from maelflow.services.base import ServiceError
from maelflow.services.loopback import preload_env
from maelflow.workspace import Workspace
from maelflow_sandbox import hpc

pytestmark = pytest.mark.unit


def test_two_nodes_each_with_its_own_slurmd_port_spool_and_pid_file(tmp_path, monkeypatch):
    monkeypatch.delenv(hpc.NODES_ENV, raising=False)
    site = hpc.LoopbackHpc(Workspace(tmp_path / "ws"))
    host = socket.gethostname().split(".")[0]
    assert site.nodes == [host, f"{host}-2"] and site.node == host
    assert [s.name for s in site.services] == ["hpc-munge", "hpc-slurmctld", "hpc-slurmd", "hpc-slurmd-2", "hpc-sshd"]
    assert len({s.dir for s in site.slurmds}) == 2
    conf = site.slurm_conf_text(7000, [7001, 7002]).splitlines()
    nodes = [ln for ln in conf if ln.startswith("NodeName=")]
    assert [ln.split()[0] for ln in nodes] == [f"NodeName={host}", f"NodeName={host}-2"]
    assert [w for ln in nodes for w in ln.split() if w.startswith("Port=")] == ["Port=7001", "Port=7002"]
    assert all("NodeAddr=127.0.0.1" in ln and f"NodeHostname={host}" in ln for ln in nodes)
    assert f"SlurmdSpoolDir={site.spool_dir}/%n" in conf and f"SlurmdPidFile={site.spool_dir}/%n.pid" in conf
    assert f"PartitionName=debug Nodes={host},{host}-2 Default=YES MaxTime=INFINITE State=UP" in conf
    assert f"TaskProlog={site.task_prolog}" in conf
    with pytest.raises(ValueError, match="2 nodes need as many slurmd ports"):
        site.slurm_conf_text(7000, 7001)


def test_the_node_count_comes_from_the_environment_and_is_checked(tmp_path, monkeypatch):
    monkeypatch.setenv(hpc.NODES_ENV, "3")
    assert len(hpc.LoopbackHpc(Workspace(tmp_path / "a")).nodes) == 3
    monkeypatch.setenv(hpc.NODES_ENV, "0")
    with pytest.raises(ServiceError, match="must be 1 to 16"):
        hpc.LoopbackHpc(Workspace(tmp_path / "b"))


def test_every_task_gets_the_bind_helper_and_a_loopback_rendezvous(tmp_path):
    site = hpc.LoopbackHpc(Workspace(tmp_path / "ws"))
    env = site.launch_environment()
    assert env["LD_PRELOAD"] == preload_env()["LD_PRELOAD"] and env["GLOO_SOCKET_IFNAME"] == "lo"
    assert env["MASTER_ADDR"] in ("::1", "127.0.0.1")
    text = site.task_prolog_text()
    assert text.startswith("#!/bin/sh\n")
    assert [ln for ln in text.splitlines() if ln.startswith("echo")] == [f"echo 'export {k}={v}'" for k, v in env.items()]

"""A training on two nodes of the loopback site: srun starts one process per node, DDP with gloo on CPU.

The site is two slurmd on this machine (maelflow_sandbox.hpc, MAELFLOW_HPC_NODES), everything on
127.0.0.1. What a multi-node training must get right, checked on the real suite (ecflow_server, SSH,
SLURM, the relay, MLflow): one MLflow run, one set of checkpoints and one run record for both
ranks, only rank 0 reporting to ecFlow, and the resubmission after a time limit continuing that run
from the last checkpoint on both nodes.

The time limit is played by sending what SLURM sends at one (its warning, USR1, to the batch shell,
then SIGTERM to every step of the job): SLURM's own limits are whole minutes, checked every 30 s, and
test_hpc_suite.py waits for a real one on one node.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from maelflow.config.loader import load_experiment
from maelflow.demo import prepare_datasets
from maelflow.ecf import client_for
from maelflow.placeholders import placeholders_for
from maelflow.suite.follow import follow
from maelflow.suite.server import deploy, find, tree
from maelflow_sandbox import hpc
from tests.conftest import PREBUILT, write_yaml
from tests.integration.suite_helpers import wait_for

pytestmark = pytest.mark.integration

SUITE = "h_ddp"
TRAIN = f"/{SUITE}/localhpc/train/tiny/train"
EPOCHS = 8


def site_shell(ws, command: str) -> str:
    """A command on the site's login node, as the site user (the way maelflow reaches it)."""
    proc = subprocess.run(hpc.LoopbackHpc(ws).ssh_argv(command), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def job_processes(job_id: str) -> list[int]:
    """This machine's processes that belong to SLURM job ``job_id`` (its tasks and their srun)."""
    mark = f"SLURM_JOB_ID={job_id}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if mark in Path(f"/proc/{entry}/environ").read_bytes().split(b"\0"):
                    found.append(int(entry))
            except OSError:
                continue
    return found


def listening_addresses(pids: list[int]) -> set[str]:
    """The local addresses of the TCP sockets in LISTEN state held by ``pids``."""
    inodes = set()
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            continue
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            cols = line.split()
            if cols[3] == "0A" and cols[9] in inodes:
                found.add(cols[1].split(":")[0])
    return found


LOOPBACK_HEX = {"0100007F", "00000000000000000000000001000000"}   # 127.0.0.1, ::1 as /proc shows them


def test_two_node_training_one_run_one_set_of_checkpoints_resubmitted_after_a_time_limit(hpc_stack, config_root):
    ws = hpc_stack
    info = hpc.connection_info(ws)
    assert len(info["nodes"]) >= 2, info["nodes"]
    exp = write_yaml(config_root / "experiments" / f"{SUITE}.yaml",
                     {"name": SUITE, "sites": ["localhpc"], "datasets": ["synth-small-numpy-10p0-2020-2020-6h-v1"],
                      "trainings": ["tiny"]})
    rx = load_experiment(str(exp), [PREBUILT, "training.tiny.nodes=2", f"training.tiny.config.max_epochs={EPOCHS}",
                                    "training.tiny.config.step_seconds=0.15", "training.tiny.max_resubmissions=2"],
                         placeholders=placeholders_for(ws))
    prepare_datasets(rx)
    client = client_for(ws)
    deploy(rx, ws, client)

    # the first job: wait until it has a checkpoint, look at it, then stop it as a time limit would
    deadline = time.monotonic() + 240
    node = wait_for(client, TRAIN, {"active"}, timeout=240)
    while time.monotonic() < deadline:
        node = find(tree(client, SUITE), TRAIN)
        if node["state"] != "active" or node["meters"]["epoch"]["value"] >= 2:
            break
        time.sleep(0.3)
    assert node["state"] == "active" and node["meters"]["epoch"]["value"] >= 2, node
    job_id = node["rid"]
    nodes_of_job = site_shell(ws, f"squeue -h -t all -j {job_id} -o %N").strip()
    assert nodes_of_job == ",".join(info["nodes"][:2]), nodes_of_job        # one process on each of two nodes
    pids = job_processes(job_id)
    assert len(pids) >= 3, pids                  # the batch shell, srun and a training process per node
    addresses = listening_addresses(pids)
    assert addresses and addresses <= LOOPBACK_HEX, addresses    # srun, TCPStore, gloo: 127.0.0.1 only
    site_shell(ws, f"scancel --batch --signal=USR1 {job_id} && sleep 1 && scancel --full --signal=TERM {job_id}")

    # until it settles: the time-limit abort is not an end (the relay's resubmission pass requeues it)
    state, _ = follow(client, SUITE, timeout=300, interval=0.5)
    data = tree(client, SUITE)
    train = find(data, TRAIN)
    assert state == "complete", train
    assert train["meters"]["epoch"]["value"] == EPOCHS and train["events"]["checkpoint"] is True
    client.sync_local()
    assert int(client.get_defs().find_abs_node(TRAIN).find_variable("MAELFLOW_RESUBMITS").value()) == 1
    out = ws.path("suites", SUITE, "jobs", SUITE, "localhpc", "train", "tiny", "train.1").read_text()
    assert "SLURM time limit approaching" in out
    # Lightning's own line, once from each process: two processes, one per node, over gloo
    assert "MEMBER: 1/2" in out and "MEMBER: 2/2" in out, out[-3000:]
    # two jobs of the task in SLURM's job-completion log, the first and its resubmission, each on both nodes
    ended = [ln.split("|") for ln in site_shell(ws, "sacct --completion -n -P -o JobID,JobName,NodeList").splitlines()]
    jobs = [(jid, nodes) for jid, name, nodes in ended if name == TRAIN.lstrip("/").replace("/", ".")]
    assert len(jobs) == 2 and jobs[0][0] == job_id and {nodes for _, nodes in jobs} == {nodes_of_job}, jobs

    # one run record, one MLflow run (resumed by the second job), one set of checkpoints
    run_dirs = list(Path(rx.sites["localhpc"].paths.outputs, SUITE, "tiny").glob("*/run.json"))
    assert len(run_dirs) == 1, run_dirs
    state = json.loads(run_dirs[0].read_text())
    assert state["run_id"] and train["labels"]["mlflow"].split()[1] == state["run_id"]
    # one writer: a second rank saving too would leave Lightning's "-v1" copies of the same names
    ckpts = sorted(p.name for p in (run_dirs[0].parent / "checkpoints").glob("*.ckpt"))
    assert "last.ckpt" in ckpts and any(c.startswith(f"epoch={EPOCHS - 1}-") for c in ckpts), ckpts
    assert not [c for c in ckpts if "-v" in c], ckpts
    epochs_saved = [c.split("-")[0] for c in ckpts if c != "last.ckpt"]
    assert len(epochs_saved) == len(set(epochs_saved)), ckpts
    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    from mlflow import MlflowClient

    offline = MlflowClient(state["tracking_uri"])
    runs = offline.search_runs([state["experiment_id"]])
    assert [r.info.run_id for r in runs] == [state["run_id"]]
    epochs_logged = {m.step for m in offline.get_metric_history(state["run_id"], "train_loss_epoch")}
    assert len(epochs_logged) == EPOCHS
    synced = find(data, f"/{SUITE}/localhpc/train/tiny/sync")
    assert synced["state"] == "complete", synced

    # only rank 0 reported: in each job's spool file the epoch meter counts up once per epoch
    spool = Path(rx.sites["localhpc"].paths.root, "spool", SUITE)
    files = sorted(spool.glob(f"{SUITE}.localhpc.train.tiny.train.*.jsonl"))
    assert len(files) == 2, files
    for f in files:
        lines = [json.loads(ln) for ln in f.read_text().splitlines()]
        assert [ln["cmd"] for ln in lines].count("init") == 1 and [ln["cmd"] for ln in lines].count("complete") <= 1
        values = [int(ln["args"][1]) for ln in lines if ln["cmd"] == "meter" and ln["args"][0] == "epoch"]
        assert values == sorted(set(values)), (f.name, values)

"""The loopback site's sshd down for 60 s while a suite runs on it (issue 17, item 7).

One outage covers both sides of the site's SSH traffic: a job already running on the site keeps
reporting (meters, labels, its complete) into its spool, which the relay reads over SSH (status),
and another task is submitted (ECF_JOB_CMD over SSH) while the site cannot be reached. sshd is
stopped as a login node goes down: the daemon and every connection it had (the shared
ControlMaster with them); its port then answers and drops each connection, which counts how often
maelflow came knocking. Afterwards the suite completes: every report arrives, each task was
submitted to SLURM exactly once (its job-completion log: ``sacct --completion``), and the
attempts during the outage stay far below one a second (the submission's and the relay's
back-off; a EuroHPC login node locks an account out when hammered).
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest

from maelflow.config.loader import load_experiment
from maelflow.config.names import node_name
from maelflow.ecf import client_for
from maelflow.placeholders import placeholders_for
from maelflow.services import stack as stack_mod
from maelflow.services.base import port_is_free
from maelflow.suite.builder import CONFIG_FILE, build_suite
from maelflow.suite.server import find, tree
from maelflow.workspace import Workspace
from tests.conftest import write_yaml

pytestmark = pytest.mark.integration

SUITE = "h_sshd"
OUTAGE_S = 60
TICKS = 12
TICKER = """%include <head.h>
# reports while the site's sshd is down: every one of these must reach the server, once
for i in $(seq 1 {ticks}); do
  ecf --meter=tick $i
  ecf --label=info "tick $i"
  sleep 1
done
%include <tail.h>
"""
LATE = """%include <head.h>
echo "late %ECF_NAME% try %ECF_TRYNO% job ${{SLURM_JOB_ID:-none}}"
%include <tail.h>
"""


@pytest.fixture(scope="module")
def hpc_stack(tmp_path_factory) -> Iterator[Workspace]:
    """The default stack plus the loopback HPC site, for this module (as tests/integration's)."""
    from maelflow_sandbox import hpc

    ws = Workspace(tmp_path_factory.mktemp("sshd-outage") / "ws")
    try:
        stack_mod.up(ws, extra=["hpc"])
        yield ws
    finally:
        stack_mod.down(ws)
        hpc.forget(ws)


def _deploy(ws: Workspace, config_root: Path):
    """The experiment's ordinary suite on localhpc plus a family ``outage``: ``ticker`` (runs
    through the outage) and ``late`` (suspended until the outage begins)."""
    from maelflow.suite.prepare import prepare_site
    from maelflow.suite.server import DEPLOY_ID_VAR, deploy_id

    exp = write_yaml(config_root / "experiments" / f"{SUITE}.yaml", {"name": SUITE, "sites": ["localhpc"]})
    rx = load_experiment(str(exp), [], placeholders=placeholders_for(ws))
    built = build_suite(rx, ws.suites_dir / rx.name, ws)
    (built.out_dir / "tasks" / "ticker.ecf").write_text(TICKER.format(ticks=TICKS))
    (built.out_dir / "tasks" / "late.ecf").write_text(LATE.format())
    family = built.defs.find_abs_node(f"/{built.name}/{node_name('localhpc')}").add_family("outage")
    ticker = family.add_task("ticker")
    ticker.add_meter("tick", 0, TICKS)
    ticker.add_label("info", "")
    late = family.add_task("late")
    import ecflow

    late.add_defstatus(ecflow.DState.suspended)
    assert not built.defs.check(), built.defs.check()
    built.defs.save_as_defs(str(built.def_file))
    (built.out_dir / "jobs").mkdir(exist_ok=True)
    prepare_site(rx, "localhpc", built.out_dir / CONFIG_FILE, ws)
    client = client_for(ws)
    client.load(str(built.def_file))
    client.alter(f"/{built.name}", "add", "variable", DEPLOY_ID_VAR, deploy_id())
    client.begin_suite(built.name)
    return client


def _wait(client, path: str, states: set[str], timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    node = None
    while time.monotonic() < deadline:
        node = find(tree(client, SUITE), path)
        if node and node["state"] in states:
            return node
        if node and node["state"] == "aborted":
            raise AssertionError(f"{path} aborted: {node.get('aborted_reason')}")
        time.sleep(0.5)
    raise AssertionError(f"{path} did not reach {states} in {timeout:.0f} s; last: {node}")


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (sshd's per-connection processes and theirs)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                parents[int(entry)] = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        kids = [p for p, pp in parents.items() if pp == parent]
        found += kids
        todo += kids
    return found


class Knocks:
    """A listener on the down sshd's port that takes each connection and drops it, as a login
    node whose sshd is gone does (ssh: 'Connection closed'), counting them."""

    def __init__(self, port: int):
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        self.sock.listen(64)
        self.times: list[float] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.times.append(time.monotonic())
            # reset, not a polite close: no TIME_WAIT left on the port, which sshd takes back after
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)       # wakes the accept(): the port is free at once
        except OSError:
            pass
        self.sock.close()
        self.thread.join(timeout=5)


def _slurm_jobs(ws: Workspace, prefix: str) -> list[str]:
    from maelflow_sandbox import hpc

    proc = subprocess.run(hpc.LoopbackHpc(ws).ssh_argv("sacct --completion -n -P -o JobID,JobName,State"),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return [ln.split("|")[1] for ln in proc.stdout.splitlines() if ln.split("|")[1:2] and
            ln.split("|")[1].startswith(prefix)]


def test_sshd_down_for_a_minute_during_submit_and_status(hpc_stack, config_root):
    from maelflow_sandbox import hpc

    ws = hpc_stack
    client = _deploy(ws, config_root)
    base = f"/{SUITE}/{node_name('localhpc')}/outage"
    _wait(client, f"{base}/ticker", {"active"}, timeout=120)   # its init came through the relay: it runs

    sshd = hpc.LoopbackHpc(ws).sshd
    port, pid = int(sshd.current_port()), sshd.pid()
    sessions = _descendants(pid)                     # the connections it serves (forked by it: ours)
    sshd.down()                                      # the daemon (ours: verified by its start time)
    for child in sessions:
        try:
            os.kill(child, signal.SIGKILL)
        except ProcessLookupError:
            pass
    knocks = Knocks(port)
    t0 = time.monotonic()
    try:
        client.resume(f"{base}/late")                # submitted while the site cannot be reached
        time.sleep(max(0.0, OUTAGE_S - (time.monotonic() - t0)))
        mid = find(tree(client, SUITE), f"{base}/late")
        assert mid["state"] == "submitted", mid      # waiting for the site, not aborted
    finally:
        knocks.close()
        deadline = time.monotonic() + 30            # the killed sessions' sockets are gone from the port
        while not port_is_free(port) and time.monotonic() < deadline:
            time.sleep(0.5)
        sshd.up()
    outage = time.monotonic() - t0
    assert int(sshd.current_port()) == port         # the site is back where its config says

    _wait(client, f"/{SUITE}", {"complete"}, timeout=240)
    data = tree(client, SUITE)
    ticker = find(data, f"{base}/ticker")
    assert ticker["meters"]["tick"]["value"] == TICKS and ticker["labels"]["info"] == f"tick {TICKS}", ticker
    # each task went to SLURM exactly once, the late one included
    names = sorted(_slurm_jobs(ws, f"{SUITE}.localhpc.outage."))
    assert names == [f"{SUITE}.localhpc.outage.late", f"{SUITE}.localhpc.outage.ticker"], names
    # back-off: a few knocks in a minute, not one a second (each try is up to three connections)
    print(f"sshd down {outage:.0f} s: {len(knocks.times)} connection attempts")
    assert len(knocks.times) <= 36, [round(t - t0, 1) for t in knocks.times]

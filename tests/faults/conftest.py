"""Fault tests: a real ecflow_server in a throw-away workspace, a job that reports through a relay
spool, and the relay as its own process, so faults (a halt, kill -9) hit real processes."""

from __future__ import annotations

import collections
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest

from maelflow.ecf import client_for
from maelflow.relay import RelayState, state_path
from maelflow.services import stack as stack_mod
from maelflow.spool import ChildCommand, MalformedLine
from maelflow.workspace import Workspace

REPO = Path(__file__).resolve().parents[2]

JOB = """#!/bin/bash
set -eu
export ECF_NAME=%ECF_NAME% ECF_PASS=%ECF_PASS% ECF_TRYNO=%ECF_TRYNO% ECF_RID=$$ MAELFLOW_SPOOL=%SPOOL%
R() { PYTHONPATH=%REPO% %PY% -c 'import sys; from maelflow.cli.report import command; command(sys.argv[1:])' "$@"; }
R --init=$$
R --label=info started
while [ ! -e %GATE%.go ]; do sleep 0.1; done
for i in $(seq 1 %STEPS%); do
  R --meter=m $i
  R --label=info "step $i"
  [ %PAUSE% = 0 ] || sleep %PAUSE%
done
R --event=e
R --label=done yes
R --complete
touch %GATE%.done
"""


class Relay:
    """The relay driver as a process of ours, killed only by its PID."""

    def __init__(self, ws: Workspace, suite: str, spool: Path):
        self.ws, self.suite, self.spool = ws, suite, spool
        self.log = ws.path(f"relay-{suite}.log")
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log, "ab") as fh:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tests.faults.relay_driver", str(self.ws.root), self.suite, str(self.spool)],
                cwd=REPO, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True,
                env={**os.environ, "PYTHONPATH": str(REPO)})

    def kill9(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill9()

    def state(self) -> RelayState:
        return RelayState.load(state_path(self.ws, self.suite, "local"))

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


class Rig:
    """One suite ``/NAME`` with one task ``t`` whose job reports through a spool, plus its relay."""

    def __init__(self, ws: Workspace, name: str, steps: int = 5, pause: float = 0.0):
        self.ws, self.name = ws, name
        self.home = ws.ensure("fault-suites", name)
        self.spool = self.home / "spool"
        self.gate = self.home / "gate"
        (self.home / "files").mkdir(exist_ok=True)
        script = (JOB.replace("%SPOOL%", str(self.spool)).replace("%REPO%", str(REPO))
                  .replace("%PY%", sys.executable).replace("%GATE%", str(self.gate))
                  .replace("%STEPS%", str(steps)).replace("%PAUSE%", str(pause)))
        (self.home / "files" / "t.ecf").write_text(script)
        self.relay = Relay(ws, name, self.spool)
        self.client = client_for(ws)

    def load(self) -> None:
        import ecflow

        defs = ecflow.Defs()
        s = defs.add_suite(self.name)
        s.add_variable("ECF_HOME", str(self.home))
        s.add_variable("ECF_FILES", str(self.home / "files"))
        s.add_variable("ECF_JOB_CMD", "bash %ECF_JOB% > %ECF_JOBOUT% 2>&1 &")
        s.add_variable("ECF_TRIES", "1")
        t = s.add_task("t")
        t.add_label("info", "")
        t.add_label("done", "")
        t.add_meter("m", 0, 100)
        t.add_event("e")
        self.client.load(defs)
        self.client.begin_suite(self.name)

    def task(self):
        self.client.sync_local()
        return self.client.get_defs().find_abs_node(f"/{self.name}/t")

    def wait(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if predicate():
                    return
            except RuntimeError:  # the server is restarting
                pass
            time.sleep(0.2)
        raise AssertionError(f"{what} within {timeout:.0f} s; relay log:\n{self.relay.text()[-3000:]}")

    def label(self, name: str) -> str:
        return next(lab.new_value() for lab in self.task().labels if lab.name() == name)

    def go(self) -> None:
        self.gate.with_suffix(".go").touch()

    def job_done(self) -> bool:
        return self.gate.with_suffix(".done").exists()

    def spooled(self) -> collections.Counter:
        counts: collections.Counter = collections.Counter()
        lines = 0
        for f in self.spool.glob("*.jsonl"):
            for line in f.read_bytes().splitlines():
                lines += 1
                try:
                    c = ChildCommand.from_line(line)
                    counts[(c.cmd, c.args)] += 1
                except MalformedLine:
                    counts["malformed"] += 1
        counts["lines"] = lines
        return counts

    def server_log(self) -> collections.Counter:
        """Child commands the server took for this suite, from its log (MSG lines only)."""
        counts: collections.Counter = collections.Counter()
        for log in self.ws.path("ecflow").glob("*.ecf.log"):
            for line in log.read_text(errors="replace").splitlines():
                if line.startswith("MSG:") and re.search(rf" chd:\w+ .*/{self.name}/t\s*$", line):
                    counts[re.search(r" chd:(\w+)", line).group(1)] += 1
        return counts

    def assert_final(self, steps: int) -> None:
        t = self.task()
        assert str(t.get_state()) == "complete"
        assert {m.name(): m.value() for m in t.meters} == {"m": steps}
        assert {e.name(): e.value() for e in t.events} == {"e": True}
        assert self.label("info") == f"step {steps}" and self.label("done") == "yes"


@pytest.fixture
def services() -> Iterator[Callable[..., dict]]:
    started: list[Workspace] = []

    def start(ws: Workspace, *names: str) -> dict:
        started.append(ws)
        return stack_mod.up(ws, names=names or None)

    yield start
    for ws in started:
        stack_mod.down(ws)


@pytest.fixture
def rig(services, tmp_path) -> Iterator[Callable[..., Rig]]:
    made: list[Rig] = []

    def make(name: str, **kw) -> Rig:
        ws = Workspace(tmp_path / "ws")
        services(ws, "ecflow")
        r = Rig(ws, name, **kw)
        made.append(r)
        return r

    yield make
    for r in made:
        r.relay.stop()

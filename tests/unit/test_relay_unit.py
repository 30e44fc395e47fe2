"""The relay's rules without a server: malformed lines, refusals, a halted server, back-off, durable files."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest

from maelflow.relay import LocalSpool, Probe, RelayState, ServerUnavailable, replay, resend_lost
from maelflow.relay_loop import Backoff
from maelflow.spool import ChildCommand, MalformedLine, append
from maelflow.workspace import Workspace, write_atomic, write_secret

pytestmark = pytest.mark.unit


# -- a server stand-in: definitions with one task, and a switch for its state ----------------------
class Var:
    def __init__(self, value):
        self._v = value

    def value(self):
        return self._v

    def empty(self):
        return not self._v


class Attr:
    def __init__(self, name, value):
        self._n, self._v = name, value

    def name(self):
        return self._n

    def value(self):
        return self._v

    def new_value(self):
        return self._v


class Task:
    def __init__(self, password="pw", try_no=1):
        self.password, self.try_no, self.state, self.rid = password, try_no, "submitted", ""
        self.meters, self.labels, self.events = [Attr("m", 0)], [Attr("info", "")], [Attr("e", False)]

    def get_state(self):
        return self.state

    def get_try_no(self):
        return self.try_no

    def get_process_or_remote_id(self):
        return self.rid

    def find_gen_variable(self, name):
        return Var(self.password if name == "ECF_PASS" else "")


class Defs:
    def __init__(self, tasks, state="RUNNING"):
        self.tasks, self.state = tasks, state

    def find_abs_node(self, path):
        return self.tasks.get(path)

    def get_server_state(self):
        return self.state


class FakeSender:
    def __init__(self, defs):
        self.defs, self.sent, self.server_id, self.fail_next = defs, [], None, 0

    def probe(self):
        if self.defs.state == "UNREACHABLE":
            return Probe("UNREACHABLE", None, "connection refused")
        return Probe(self.defs.state, self.defs)

    def send(self, c):
        if self.fail_next or self.defs.state != "RUNNING":
            self.fail_next = max(0, self.fail_next - 1)
            raise RuntimeError("ClientInvoker: Timed out after ECF_TIMOUT(10) seconds")
        node = self.defs.find_abs_node(c.task)
        if c.password != node.password:
            raise RuntimeError("Timed out (zombie)")
        self.sent.append((c.cmd, c.args))
        if c.cmd == "init":
            node.state, node.rid = "active", c.rid
        elif c.cmd == "complete":
            node.state = "complete"
        elif c.cmd == "abort":
            node.state = "aborted"
        else:
            attrs = {"meter": node.meters, "label": node.labels, "event": node.events}[c.cmd]
            value = int(c.args[1]) if c.cmd == "meter" else (c.args[1] if c.cmd == "label" else True)
            for i, a in enumerate(attrs):
                if a.name() == c.args[0]:
                    attrs[i] = Attr(a.name(), value)


def cmd(cmd, *args, task="/s/t", password="pw", try_no=1):
    return ChildCommand(task, password, "42", try_no, cmd, tuple(args), time.time())


@pytest.fixture
def spool(tmp_path):
    d = tmp_path / "spool"
    d.mkdir()
    return d


def job(spool_dir: Path, *commands: ChildCommand) -> None:
    for c in commands:
        append(str(spool_dir), c)


def test_from_line_rejects_malformed_lines():
    good = cmd("meter", "m", "3").to_line()
    assert ChildCommand.from_line(good).args == ("m", "3")
    bad = [b"not json\n", b"[1, 2]\n", b'{"task": "/s/t"}\n',
           json.dumps({**json.loads(good), "try": "one"}).encode(),
           json.dumps({**json.loads(good), "args": "m 3"}).encode(),
           json.dumps({**json.loads(good), "cmd": "rm"}).encode(),
           json.dumps({**json.loads(good), "args": ["m", "x"]}).encode(),
           json.dumps({**json.loads(good), "task": "s/t"}).encode(),
           json.dumps({**json.loads(good), "time": None}).encode(),
           b"\xff\xfe\n"]
    for line in bad:
        with pytest.raises(MalformedLine):
            ChildCommand.from_line(line)


def test_malformed_lines_are_skipped_in_order(spool, tmp_path):
    task = Task()
    sender = FakeSender(Defs({"/s/t": task}))
    job(spool, cmd("init", "42"))
    path = next(spool.glob("*.jsonl"))
    with open(path, "ab") as fh:
        fh.write(b'{"task": "/s/t", "cmd": "label"}\n')   # valid JSON, keys missing
        fh.write(b"garbage\n")
    job(spool, cmd("label", "info", "hello"), cmd("complete"))
    state = RelayState(tmp_path / "state.json")
    assert replay(LocalSpool(), str(spool), sender, state) == 3
    assert [c for c, _ in sender.sent] == ["init", "label", "complete"]
    assert state.skipped == 2 and state.replayed == 5 and state.pending is None
    assert state.files[path.name] == path.stat().st_size
    assert replay(LocalSpool(), str(spool), sender, state) == 0  # nothing twice


@pytest.mark.parametrize("server_state", ["HALTED", "SHUTDOWN", "UNREACHABLE"])
def test_unavailable_server_keeps_lines_until_it_takes_them(spool, tmp_path, server_state):
    task = Task()
    defs = Defs({"/s/t": task}, state=server_state)
    sender = FakeSender(defs)
    job(spool, cmd("init", "42"), cmd("meter", "m", "5"), cmd("event", "e"), cmd("complete"))
    state = RelayState(tmp_path / "state.json")
    for _ in range(3):
        with pytest.raises(ServerUnavailable):
            replay(LocalSpool(), str(spool), sender, state)
    assert sender.sent == [] and state.files == {}
    defs.state = "RUNNING"
    assert replay(LocalSpool(), str(spool), sender, state) == 4
    assert [c for c, _ in sender.sent] == ["init", "meter", "event", "complete"]
    assert task.state == "complete"


def test_halt_during_a_send_keeps_the_line_pending(spool, tmp_path):
    task = Task()
    defs = Defs({"/s/t": task})
    sender = FakeSender(defs)
    job(spool, cmd("init", "42"), cmd("label", "info", "x"), cmd("complete"))
    state = RelayState(tmp_path / "state.json")
    real_send = sender.send

    def halting_send(c):
        if c.cmd == "label" and defs.state == "RUNNING" and not getattr(sender, "halted_once", False):
            sender.halted_once = True
            defs.state = "HALTED"
        real_send(c)

    sender.send = halting_send
    with pytest.raises(ServerUnavailable):
        replay(LocalSpool(), str(spool), sender, state)
    assert state.pending and json.loads(state.pending["line"])["cmd"] == "label"
    # a relay restarted now reads the state file and goes on from the pending line
    state = RelayState.load(tmp_path / "state.json")
    defs.state = "RUNNING"
    replay(LocalSpool(), str(spool), sender, state)
    assert [c for c, _ in sender.sent] == ["init", "label", "complete"]
    assert state.replayed == 3 and state.sent == 3


def test_pending_line_already_applied_is_not_sent_again(spool, tmp_path):
    task = Task()
    sender = FakeSender(Defs({"/s/t": task}))
    job(spool, cmd("init", "42"), cmd("meter", "m", "7"))
    state = RelayState(tmp_path / "state.json")
    replay(LocalSpool(), str(spool), sender, state)
    # as if killed after sending the meter but before moving the offset
    name = next(iter(state.files))
    line = cmd("meter", "m", "7").to_line()
    state.files[name] -= len(line)
    state.pending = {"file": name, "offset": state.files[name], "line": line.decode()}
    replay(LocalSpool(), str(spool), sender, state)
    assert sender.sent.count(("meter", ("m", "7"))) == 1
    assert (state.sent, state.applied) == (2, 1)     # counted as found in effect, once
    assert RelayState.load(tmp_path / "state.json").applied == 1


def test_refusals_are_skipped_and_zombies_told_apart(spool, tmp_path):
    task = Task(password="new", try_no=2)
    sender = FakeSender(Defs({"/s/t": task}))
    job(spool, cmd("complete", password="old", try_no=1),          # an older try: zombie
        cmd("complete", password="old", try_no=2),                  # same try, other password: zombie
        cmd("label", "info", "x", task="/gone/t"),                  # deleted suite
        cmd("init", "42", password="new", try_no=2))
    state = RelayState(tmp_path / "state.json")
    assert replay(LocalSpool(), str(spool), sender, state) == 1
    assert sender.sent == [("init", ("42",))] and state.skipped == 3


def test_a_line_the_running_server_keeps_refusing_is_given_up(spool, tmp_path):
    task = Task()
    sender = FakeSender(Defs({"/s/t": task}))
    sender.fail_next = 10
    job(spool, cmd("init", "42"), cmd("label", "info", "y"))
    state = RelayState(tmp_path / "state.json")
    for _ in range(2):
        with pytest.raises(ServerUnavailable):
            replay(LocalSpool(), str(spool), sender, state)
    sender.fail_next = 1  # the third refusal gives the first line up; the second line goes through
    replay(LocalSpool(), str(spool), sender, state)
    assert sender.sent == [("label", ("info", "y"))] and state.skipped == 1


def test_restarted_server_gets_what_it_lost(spool, tmp_path):
    task = Task()
    sender = FakeSender(Defs({"/s/t": task}))
    sender.server_id = 100
    job(spool, cmd("init", "42"), cmd("meter", "m", "1"), cmd("meter", "m", "2"), cmd("complete"))
    state = RelayState(tmp_path / "state.json")
    replay(LocalSpool(), str(spool), sender, state)
    # the server restarts from a checkpoint taken after init and meter 1
    task.state, task.meters = "active", [Attr("m", 1)]
    sender.server_id, sender.sent = 101, []
    resend_lost(sender, state, sender.probe())
    assert sender.sent == [("meter", ("m", "2")), ("complete", ())]
    assert task.state == "complete" and state.resent == 2


def test_backoff_doubles_to_its_cap_and_reports_changes_once():
    b = Backoff(1.0, 8.0)
    assert b.ready(0.0)
    assert b.failure(0.0) is True
    assert not b.ready(0.5) and b.ready(1.0)
    assert b.failure(1.0) is False and b.delay == 2.0
    for _ in range(5):
        b.failure(10.0)
    assert b.delay == 8.0
    assert b.success() is True and b.success() is False and b.ready(0.0)


def test_write_atomic_is_private_while_written_and_durable(tmp_path, monkeypatch):
    seen = []
    real_fsync = os.fsync

    def spy(fd):
        seen.append(stat.S_IMODE(os.fstat(fd).st_mode))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    target = tmp_path / "secrets" / "key.json"
    write_secret(target, "s3cret")
    assert stat.S_IMODE(target.stat().st_mode) == 0o600 and target.read_text() == "s3cret"
    assert seen and seen[0] == 0o600            # the data was synced while the file was 0600
    assert len(seen) >= 2                        # and the folder after the rename
    write_atomic(tmp_path / "plain.txt", "x")
    assert stat.S_IMODE((tmp_path / "plain.txt").stat().st_mode) == 0o644
    assert not [p for p in target.parent.iterdir() if p.name.startswith(".")]


def test_workspace_root_is_private(tmp_path):
    old = os.umask(0o022)
    try:
        ws = Workspace(tmp_path / "a" / "ws")
        ws.ensure("ecflow")
        assert stat.S_IMODE(ws.root.stat().st_mode) == 0o700
        os.chmod(ws.root, 0o755)
        ws.write_json({"x": 1}, "state.json")
        assert stat.S_IMODE(ws.root.stat().st_mode) == 0o700
    finally:
        os.umask(old)


def test_down_kills_only_the_process_it_started(tmp_path, caplog):
    from maelflow.services.base import ManagedService, pid_alive

    class Sleeper(ManagedService):
        name = "sleeper"

        def command(self, port):
            return ["sleep", "60"], {}

        def healthy(self):
            return True

        def port(self):
            return 0

        def before_stop(self):
            raise RuntimeError("checkpoint failed")

    svc = Sleeper(Workspace(tmp_path / "ws"))
    svc.up()
    pid = svc.pid()
    assert svc.running()
    # a stranger got the PID: same number, other start time
    stranger = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        svc.pid_file.write_text(f"{stranger.pid} 1\n")
        assert not svc.running()
        with caplog.at_level("WARNING", logger="maelflow.services"):
            svc.down()
        assert pid_alive(stranger.pid) and "left alone" in caplog.text
        # our own process: stopped, and the failed before_stop is logged, not swallowed
        svc.pid_file.write_text(f"{pid} {__import__('maelflow.services.base', fromlist=['x']).process_start(pid)}\n")
        assert svc.running()
        caplog.clear()
        with caplog.at_level("WARNING", logger="maelflow.services"):
            svc.down()
        assert not pid_alive(pid) and "checkpoint failed" in caplog.text
    finally:
        os.kill(stranger.pid, signal.SIGKILL)
        stranger.wait()

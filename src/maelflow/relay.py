"""Replays the child commands that jobs left in relay spools, to the ecFlow server, exactly once.

Compute nodes on EuroHPC sites cannot reach the ecFlow server; their jobs write child commands to a
spool on the site's shared filesystem (spool.py). The relay runs where the server is reachable,
reads each spool file over the site's connection from where it stopped, and sends every command in
order. Progress is kept in the workspace per (suite, site): before a command is sent it is recorded
as pending, after it is sent the file offset moves past it. A relay killed in between finds the
pending command on restart and asks the server whether it already took effect (a task's state, a
meter's value, a label's text) before sending it, so nothing is lost and nothing is sent twice.

A command the server did not take is never dropped because the server was away. ecflow 5.9's
client gives the same answer ("Timed out after ECF_TIMEOUT") whether the server is halted, down,
restarting, or blocking a zombie, so the relay does not read the error: it asks the server. While
the server is unreachable, halted or shut down, the line stays pending and the pass stops (the
caller retries with back-off), which keeps every site's lines in order. Only a refusal is skipped:
the task no longer exists (suite deleted or replaced), or the line is a zombie's (its try number or
job password is not the task's current one: the task was requeued or resubmitted meanwhile), or a
running server kept refusing the same line ``MAX_REFUSALS`` times. A malformed line is skipped with
a warning. Each skip is logged with its file and offset.

A server killed outright restarts from its last checkpoint (written every few seconds), so it may
have lost commands it took after that. The relay keeps the lines it sent in the last ``RECENT_S``
seconds; when the server process has changed since (``Sender.server_id``), it checks them against
the restored definitions and sends again those whose effect is missing (for a label, meter or event
only its latest value), so a task whose ``complete`` was lost still completes.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from maelflow.reporting import abort_text
from maelflow.spool import ChildCommand, MalformedLine
from maelflow.workspace import Workspace, write_atomic

log = logging.getLogger("maelflow.relay")

# a line the running server did not take this many times (not applied, not a zombie, task there)
# is given up, so one odd line cannot stop a site's relay for ever
MAX_REFUSALS = 3
# server states in which it takes child commands; HALTED and SHUTDOWN block them
ACCEPTING = ("RUNNING",)
# sent lines kept for a check after a server restart: several of the server's checkpoint intervals
RECENT_S = 90.0


class ServerUnavailable(Exception):
    """The ecFlow server cannot take child commands now (unreachable, halted, shut down, or it did
    not take a line it should have): the line stays pending, the pass stops, the caller backs off."""


class SpoolSource(Protocol):
    def listing(self, spool_dir: str) -> dict[str, int]: ...
    def read(self, path: str, offset: int) -> bytes: ...


class LocalSpool:
    """A spool on a filesystem this process can read (the local site, tests, a mounted share)."""

    def listing(self, spool_dir: str) -> dict[str, int]:
        try:
            with os.scandir(spool_dir) as it:
                return {e.name: e.stat().st_size for e in it if e.name.endswith(".jsonl")}
        except FileNotFoundError:
            return {}

    def read(self, path: str, offset: int) -> bytes:
        with open(path, "rb") as fh:
            fh.seek(offset)
            return fh.read()


class SshSpool:
    """A spool on a remote site, read through the site's connection (``maelflow.sites.connections``)."""

    def __init__(self, session):
        self.session = session

    def listing(self, spool_dir: str) -> dict[str, int]:
        res = self.session.run(f"find {shlex.quote(spool_dir)} -maxdepth 1 -name '*.jsonl' -printf '%f %s\\n' "
                               "2>/dev/null || true", timeout=30)
        text = res.stdout.decode() if isinstance(res.stdout, bytes) else res.stdout
        out: dict[str, int] = {}
        for line in text.splitlines():
            name, _, size = line.rpartition(" ")
            if name and "/" not in name and size.isdigit():
                out[name] = int(size)
        return out

    def read(self, path: str, offset: int) -> bytes:
        return self.session.read_bytes(path, offset)


@dataclass
class RelayState:
    path: Path
    files: dict[str, int] = field(default_factory=dict)
    pending: dict[str, Any] | None = None
    replayed: int = 0   # lines done (sent, found applied, or skipped): each spool line counts once
    sent: int = 0       # of those, the ones the server took from this relay
    skipped: int = 0    # of those, malformed lines and refusals
    recent: list[dict[str, Any]] = field(default_factory=list)  # [{"t": time sent, "line": ...}]
    server_id: Any = None  # the server process the recent lines went to
    resent: int = 0     # lines sent again because a restarted server had lost them
    applied: int = 0    # of the replayed, lines found in effect when a restarted relay checked its pending
                        # line (a relay killed after sending it, before recording it): not sent again

    @classmethod
    def load(cls, path: Path) -> "RelayState":
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            return cls(path)
        return cls(path, d.get("files", {}), d.get("pending"), d.get("replayed", 0), d.get("sent", 0),
                   d.get("skipped", 0), d.get("recent", []), d.get("server_id"), d.get("resent", 0),
                   d.get("applied", 0))

    def save(self) -> None:
        horizon = time.time() - RECENT_S
        self.recent = [r for r in self.recent if r["t"] >= horizon]
        write_atomic(self.path, json.dumps({"files": self.files, "pending": self.pending, "replayed": self.replayed,
                                            "sent": self.sent, "skipped": self.skipped, "recent": self.recent,
                                            "server_id": self.server_id, "resent": self.resent,
                                            "applied": self.applied}, sort_keys=True))


@dataclass
class Probe:
    """What the server said when asked: its state and its definitions (None: not reachable)."""

    state: str
    defs: Any = None
    error: str = ""

    @property
    def accepting(self) -> bool:
        return self.state in ACCEPTING


class Sender:
    """Sends child commands on behalf of jobs, and tells whether one already took effect."""

    def __init__(self, host: str, port: int, timeout: int = 10, passwd_file: str | None = None,
                 server_id: Any = None):
        from maelflow.services.ecflow import make_client

        self.server_id = server_id  # changes when the server process does (its PID): see resend_lost

        self.client = make_client(host, int(port), attempts=2, retry_period=1, passwd_file=passwd_file)
        # a child command to a halted (or blocking) server waits this long, at least 10 s in ecflow 5.9
        self.client.set_child_timeout(timeout)
        self.client.set_zombie_child_timeout(timeout)

    def probe(self) -> Probe:
        """Ask the server for its state and definitions (user commands: a halted server answers)."""
        try:
            self.client.sync_local()
            defs = self.client.get_defs()
            return Probe(str(defs.get_server_state()) if defs is not None else "RUNNING", defs)
        except RuntimeError as exc:
            return Probe("UNREACHABLE", None, str(exc).strip()[:300])

    def send(self, c: ChildCommand) -> None:
        cl = self.client
        cl.set_child_path(c.task)
        cl.set_child_password(c.password)
        cl.set_child_pid(c.rid)
        cl.set_child_try_no(c.try_no)
        if c.cmd == "init":
            cl.child_init()
        elif c.cmd == "complete":
            cl.child_complete()
        elif c.cmd == "abort":
            cl.child_abort(abort_text(" ".join(c.args)) or "aborted (relayed)")
        elif c.cmd == "meter":
            cl.child_meter(c.args[0], int(c.args[1]))
        elif c.cmd == "label":
            cl.child_label(c.args[0], c.args[1] if len(c.args) > 1 else "")
        elif c.cmd == "event":
            cl.child_event(c.args[0], (c.args[1] if len(c.args) > 1 else "set") != "clear")
        else:
            raise ValueError(f"unknown child command {c.cmd!r}")


def applied(node: Any, c: ChildCommand) -> bool:
    """Whether ``c`` already took effect on ``node`` (a task from the server's definitions)."""
    state = str(node.get_state())
    same_try = str(node.get_try_no()) == str(c.try_no)
    if c.cmd == "init":
        return same_try and state in ("active", "complete", "aborted") and \
            str(node.get_process_or_remote_id()) == c.rid
    if c.cmd == "complete":
        return same_try and state == "complete"
    if c.cmd == "abort":
        return same_try and state == "aborted"
    if c.cmd == "meter":
        return any(m.name() == c.args[0] and m.value() == int(c.args[1]) for m in node.meters)
    if c.cmd == "label":
        return any(lab.name() == c.args[0] and lab.new_value() == (c.args[1] if len(c.args) > 1 else "")
                   for lab in node.labels)
    if c.cmd == "event":
        want = (c.args[1] if len(c.args) > 1 else "set") != "clear"
        return any(e.name() == c.args[0] and e.value() == want for e in node.events)
    return False


def refusal(defs: Any, c: ChildCommand) -> str | None:
    """Why the server would refuse ``c`` for good, or None: the task is gone, or ``c`` is a zombie's."""
    node = defs.find_abs_node(c.task) if defs is not None else None
    if node is None:
        return "no such task on the server (suite deleted or replaced)"
    try:
        try_no = int(node.get_try_no())
    except (TypeError, ValueError):
        try_no = None
    if try_no is not None and try_no != c.try_no:
        return f"zombie: the task is at try {try_no}, the line is from try {c.try_no}"
    var = node.find_gen_variable("ECF_PASS") if hasattr(node, "find_gen_variable") else None
    current = var.value() if var is not None and not var.empty() else ""
    if current and "FREE" not in (current, c.password) and current != c.password:
        return "zombie: the job password is not the task's current one (requeued or resubmitted)"
    return None


def state_path(ws: Workspace, suite: str, site: str) -> Path:
    return ws.path("relay", suite, f"{site}.json")


def replay(source: SpoolSource, spool_dir: str, sender: Sender, state: RelayState) -> int:
    """Replay what is new in one spool folder, in order; returns the number of commands sent.

    Raises ServerUnavailable (with the line kept pending) when the server cannot take commands now.
    """
    probe = sender.probe()
    if not probe.accepting:
        raise ServerUnavailable(_why(probe))
    sent = resend_lost(sender, state, probe)
    if state.pending:
        sent += _finish(state, _deliver(sender, state, probe, recovering=True))
    listing = source.listing(spool_dir)
    for name in sorted(listing, key=lambda n: (n.split(".")[-3:-1], n)):
        offset = state.files.get(name, 0)
        if listing[name] <= offset:
            continue
        data = source.read(f"{spool_dir.rstrip('/')}/{name}", offset)
        end = data.rfind(b"\n")
        if end < 0:
            continue  # a line still being written: wait for its newline
        for raw in data[: end + 1].splitlines(keepends=True):
            state.pending = {"file": name, "offset": offset, "size": len(raw),
                             "line": raw.decode("utf-8", errors="replace")}
            state.save()
            sent += _finish(state, _deliver(sender, state, probe, recovering=False, raw=raw))
            offset += len(raw)
    return sent


def _why(probe: Probe) -> str:
    if probe.state == "UNREACHABLE":
        return f"ecFlow server unreachable: {probe.error}"
    return f"ecFlow server is {probe.state}"


def _finish(state: RelayState, outcome: str) -> int:
    """Move the offset past the pending line and persist: the line is done, whatever ``outcome``."""
    p = state.pending
    assert p is not None
    size = p.get("size", len(p["line"].encode()))
    state.files[p["file"]] = p["offset"] + size
    state.pending = None
    state.replayed += 1
    if outcome == "sent":
        state.sent += 1
        state.recent.append({"t": time.time(), "line": p["line"]})
    elif outcome == "skipped":
        state.skipped += 1
    elif outcome == "applied":
        state.applied += 1
    state.save()
    return 1 if outcome == "sent" else 0


def _deliver(sender: Sender, state: RelayState, probe: Probe, recovering: bool, raw: bytes | None = None) -> str:
    """One pending line to the server: 'sent', 'applied' (it already was) or 'skipped'.

    Raises ServerUnavailable, leaving the line pending, when the server cannot take it now.
    """
    p = state.pending
    assert p is not None
    where = f"{p['file']} at offset {p['offset']}"
    try:
        c = ChildCommand.from_line(raw if raw is not None else p["line"])
    except MalformedLine as exc:
        log.warning("skipping a malformed spool line in %s: %s", where, exc)
        return "skipped"
    what = f"{c.cmd} {' '.join(c.args)} for {c.task} (try {c.try_no})"
    why = refusal(probe.defs, c)
    if why:
        log.warning("skipping %s from %s: %s", what, where, why)
        return "skipped"
    if recovering and applied(probe.defs.find_abs_node(c.task), c):
        return "applied"
    try:
        sender.send(c)
        return "sent"
    except RuntimeError as exc:
        error = str(exc).strip()[:300]
    # the error does not say why (a halt, a restart, a zombie all time out alike): ask the server
    after = sender.probe()
    if not after.accepting:
        raise ServerUnavailable(f"{_why(after)}; {what} stays pending") from None
    why = refusal(after.defs, c)
    if why:
        log.warning("skipping %s from %s: %s", what, where, why)
        return "skipped"
    if applied(after.defs.find_abs_node(c.task), c):
        return "sent"  # it took effect (the server took it as the halt ended, say)
    p["refusals"] = p.get("refusals", 0) + 1
    if p["refusals"] >= MAX_REFUSALS:
        log.error("giving up %s from %s: the running server refused it %d times (last: %s)",
                  what, where, p["refusals"], error)
        return "skipped"
    state.save()
    raise ServerUnavailable(f"the server did not take {what} ({error}); it stays pending")


def _key(c: ChildCommand) -> tuple[str, ...]:
    return (c.task, "state") if c.cmd in ("init", "complete", "abort") else (c.task, c.cmd, c.args[0])


def resend_lost(sender: Sender, state: RelayState, probe: Probe) -> int:
    """After a server restart, send again the recent lines whose effect the restored server lacks.

    Task state lines (init, complete, abort) are checked in order; for a label, meter or event only
    the latest line counts (an earlier value was meant to be overwritten). Returns the number sent.
    """
    if sender.server_id is None or state.server_id == sender.server_id:
        return 0
    if state.server_id is None or not state.recent:
        state.server_id = sender.server_id
        state.save()
        return 0
    commands = []
    for r in state.recent:
        try:
            commands.append(ChildCommand.from_line(r["line"]))
        except MalformedLine:
            continue
    last = {_key(c): i for i, c in enumerate(commands)}
    count = 0
    for i, c in enumerate(commands):
        if c.cmd not in ("init", "complete", "abort") and last[_key(c)] != i:
            continue
        if refusal(probe.defs, c) or applied(probe.defs.find_abs_node(c.task), c):
            continue
        log.warning("the ecFlow server restarted and lost %s %s for %s: sending it again",
                    c.cmd, " ".join(c.args), c.task)
        try:
            sender.send(c)
        except RuntimeError as exc:
            raise ServerUnavailable(f"resending what the restarted server lost: {str(exc).strip()[:200]}") from None
        count += 1
        probe = sender.probe()  # the next line's check sees this one's effect (init before complete)
        if not probe.accepting:
            raise ServerUnavailable(_why(probe))
    state.server_id = sender.server_id
    state.resent += count
    state.save()
    return count

"""Replays the child commands that jobs left in relay spools, to the ecFlow server, exactly once.

Compute nodes on EuroHPC sites cannot reach the ecFlow server; their jobs write child commands to a
spool on the site's shared filesystem (sites/spool.py). The relay runs where the server is reachable,
reads each spool file over the site's SSH session from where it stopped, and sends every command in
order. Progress is kept in the workspace per (suite, site): before a command is sent it is recorded
as pending, after it is sent the file offset moves past it. A relay killed in between finds the
pending command on restart and asks the server whether it already took effect (a task's state, a
meter's value, a label's text) before sending it, so nothing is lost and nothing is sent twice.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from maelflow.sites.spool import ChildCommand
from maelflow.workspace import Workspace, write_atomic

log = logging.getLogger("maelflow.relay")


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
    """A spool on a remote site, read through the site's one SSH session."""

    def __init__(self, session):
        self.session = session

    def listing(self, spool_dir: str) -> dict[str, int]:
        res = self.session.run(f"find {spool_dir} -maxdepth 1 -name '*.jsonl' -printf '%f %s\\n' 2>/dev/null || true",
                               timeout=30)
        out: dict[str, int] = {}
        for line in res.stdout.decode().splitlines() if isinstance(res.stdout, bytes) else res.stdout.splitlines():
            name, _, size = line.rpartition(" ")
            if name:
                out[name] = int(size)
        return out

    def read(self, path: str, offset: int) -> bytes:
        return self.session.read_bytes(path, offset)


@dataclass
class RelayState:
    path: Path
    files: dict[str, int] = field(default_factory=dict)
    pending: dict[str, Any] | None = None
    replayed: int = 0

    @classmethod
    def load(cls, path: Path) -> "RelayState":
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            return cls(path)
        return cls(path, d.get("files", {}), d.get("pending"), d.get("replayed", 0))

    def save(self) -> None:
        write_atomic(self.path, json.dumps({"files": self.files, "pending": self.pending,
                                            "replayed": self.replayed}, sort_keys=True))


class Sender:
    """Sends child commands on behalf of jobs, and tells whether one already took effect."""

    def __init__(self, host: str, port: int, timeout: int = 20):
        import ecflow

        self.client = ecflow.Client(host, int(port))
        self.client.set_child_timeout(timeout)
        self.client.set_zombie_child_timeout(timeout)

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
            cl.child_abort(" ".join(c.args) or "aborted (relayed)")
        elif c.cmd == "meter":
            cl.child_meter(c.args[0], int(c.args[1]))
        elif c.cmd == "label":
            cl.child_label(c.args[0], c.args[1] if len(c.args) > 1 else "")
        elif c.cmd == "event":
            cl.child_event(c.args[0], (c.args[1] if len(c.args) > 1 else "set") != "clear")
        else:
            raise ValueError(f"unknown child command {c.cmd!r}")

    def already_applied(self, c: ChildCommand) -> bool:
        self.client.sync_local()
        defs = self.client.get_defs()
        node = defs.find_abs_node(c.task) if defs else None
        if node is None:
            return True  # the suite is gone: nothing to apply any more
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
            return any(lab.name() == c.args[0] and lab.new_value() == c.args[1] for lab in node.labels)
        if c.cmd == "event":
            want = (c.args[1] if len(c.args) > 1 else "set") != "clear"
            return any(e.name() == c.args[0] and e.value() == want for e in node.events)
        return False


def state_path(ws: Workspace, suite: str, site: str) -> Path:
    return ws.path("relay", suite, f"{site}.json")


def replay(source: SpoolSource, spool_dir: str, sender: Sender, state: RelayState) -> int:
    """Replay what is new in one spool folder; returns the number of commands sent."""
    sent = 0
    if state.pending:
        c = ChildCommand.from_line(state.pending["line"])
        if not sender.already_applied(c):
            _send(sender, c)
            sent += 1
        state.files[state.pending["file"]] = state.pending["offset"] + len(state.pending["line"].encode())
        state.pending = None
        state.save()
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
            line = raw.decode()
            state.pending = {"file": name, "offset": offset, "line": line}
            state.save()
            try:
                _send(sender, ChildCommand.from_line(line))
            except ValueError as exc:
                log.warning("skipping a malformed spool line in %s at %d: %s", name, offset, exc)
            offset += len(raw)
            state.files[name] = offset
            state.pending = None
            state.replayed += 1
            state.save()
            sent += 1
    return sent


def _send(sender: Sender, c: ChildCommand) -> None:
    try:
        sender.send(c)
    except RuntimeError as exc:  # a zombie (task requeued meanwhile), a deleted suite: log, go on
        log.warning("server refused %s %s %s: %s", c.task, c.cmd, " ".join(c.args), str(exc).strip()[:300])

"""The relay spool: how a job on a compute node that cannot reach ecFlow still reports.

Each job appends its child commands (init, meter, label, event, complete, abort) as JSON lines to
its own file in the site's spool folder on the shared filesystem; maelflow reads the files over the
SSH session from the login side and replays them to the server in order (relay.py). One file per
job try keeps the order of a job's commands and needs no locking: the job is the only writer.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import Any

COMMANDS = ("init", "meter", "label", "event", "complete", "abort")


@dataclass(frozen=True)
class ChildCommand:
    task: str
    password: str
    rid: str
    try_no: int
    cmd: str
    args: tuple[str, ...]
    time: float

    def to_line(self) -> bytes:
        return (json.dumps({"task": self.task, "pass": self.password, "rid": self.rid, "try": self.try_no,
                            "cmd": self.cmd, "args": list(self.args), "time": self.time},
                           separators=(",", ":")) + "\n").encode()

    @classmethod
    def from_line(cls, line: bytes | str) -> "ChildCommand":
        d: dict[str, Any] = json.loads(line)
        return cls(d["task"], d["pass"], str(d["rid"]), int(d["try"]), d["cmd"], tuple(d["args"]), float(d["time"]))


def spool_file_name(task: str, try_no: int | str, rid: str) -> str:
    """``demo.local.train.tiny.train.1.12345.jsonl``: sortable, unique per job try."""
    return f"{task.strip('/').replace('/', '.')}.{try_no}.{rid}.jsonl"


def append(spool_dir: str, command: ChildCommand) -> str:
    """Append one command; a single O_APPEND write, so a reader never sees half a line.

    The job writes on its node and the relay reads on the login node, through the shared filesystem:
    the line is flushed to the file system (fsync) before the job goes on, so a job that dies right
    after reporting does not lose what it reported.
    """
    os.makedirs(spool_dir, exist_ok=True)
    path = os.path.join(spool_dir, spool_file_name(command.task, command.try_no, command.rid))
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, command.to_line())
        os.fsync(fd)
    finally:
        os.close(fd)
    return path


def from_env(cmd: str, args: tuple[str, ...], env: dict[str, str] | None = None) -> ChildCommand:
    env = dict(os.environ if env is None else env)
    return ChildCommand(task=env["ECF_NAME"], password=env["ECF_PASS"], rid=env.get("ECF_RID", str(os.getppid())),
                        try_no=int(env.get("ECF_TRYNO", "1")), cmd=cmd, args=tuple(args), time=time.time())


def parse_ecflow_client_args(argv: list[str]) -> tuple[str, tuple[str, ...]]:
    """Accept ecflow_client's own syntax (``--meter=progress 5``, ``--label=info text``, ``--init=RID``),
    so job scripts say the same thing in both reporting modes."""
    if not argv:
        raise ValueError("no child command given")
    first, rest = argv[0], argv[1:]
    if not first.startswith("--"):
        raise ValueError(f"expected an option such as --meter=NAME, got {first!r}")
    name, _, value = first[2:].partition("=")
    if name not in COMMANDS:
        raise ValueError(f"unknown child command --{name}; known: {', '.join(COMMANDS)}")
    args = ([value] if value else []) + rest
    if name == "label":
        return name, (args[0], " ".join(args[1:]))
    return name, tuple(args)

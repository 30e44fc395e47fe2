"""The relay spool: how a job on a compute node that cannot reach ecFlow still reports.

Each job appends its child commands (init, meter, label, event, complete, abort) as JSON lines to
its own file in the site's spool folder on the shared filesystem; maelflow reads the files over the
SSH session from the login side and replays them to the server in order (relay.py). One file per
job try keeps the order of a job's commands and needs no locking: the job is the only writer.

A line is checked field by field when it is read back (``ChildCommand.from_line``): the spool sits
on a shared filesystem and a line may be cut short, garbled or hand-written. A bad line raises
``MalformedLine`` so the relay can skip it and go on, instead of stopping on it for ever.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import Any

COMMANDS = ("init", "meter", "label", "event", "complete", "abort")
# how many arguments each command takes (at least, at most)
_ARITY = {"init": (0, 1), "meter": (2, 2), "label": (1, 2), "event": (1, 2), "complete": (0, 0), "abort": (0, 64)}


class MalformedLine(ValueError):
    """A spool line that is not a child command (bad JSON, a missing key, a wrong type)."""


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
        """Parse and check one line; ``MalformedLine`` says what is wrong with it."""
        try:
            d: Any = json.loads(line)
        except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
            raise MalformedLine(f"not JSON: {exc}") from None
        if not isinstance(d, dict):
            raise MalformedLine(f"not a JSON object but {type(d).__name__}")
        missing = [k for k in ("task", "pass", "rid", "try", "cmd", "args", "time") if k not in d]
        if missing:
            raise MalformedLine(f"missing {', '.join(missing)}")
        task, password, rid, try_no, cmd, args, when = (d[k] for k in ("task", "pass", "rid", "try", "cmd",
                                                                        "args", "time"))
        if not isinstance(task, str) or not task.startswith("/") or "\n" in task:
            raise MalformedLine(f"task must be a node path such as /suite/task, got {task!r}")
        if not isinstance(password, str) or not password:
            raise MalformedLine("pass must be a non-empty string")
        if isinstance(rid, bool) or not isinstance(rid, (str, int)) or str(rid) == "":
            raise MalformedLine(f"rid must be a string or an integer, got {rid!r}")
        if isinstance(try_no, bool) or not isinstance(try_no, int) or try_no < 0:
            raise MalformedLine(f"try must be a non-negative integer, got {try_no!r}")
        if cmd not in COMMANDS:
            raise MalformedLine(f"unknown command {cmd!r}; known: {', '.join(COMMANDS)}")
        if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
            raise MalformedLine(f"args must be a list of strings, got {args!r}")
        lo, hi = _ARITY[cmd]
        if not lo <= len(args) <= hi:
            raise MalformedLine(f"{cmd} takes {lo}..{hi} arguments, got {len(args)}")
        if cmd == "meter":
            try:
                int(args[1])
            except ValueError:
                raise MalformedLine(f"meter value must be an integer, got {args[1]!r}") from None
        if isinstance(when, bool) or not isinstance(when, (int, float)):
            raise MalformedLine(f"time must be a number, got {when!r}")
        return cls(task, password, str(rid), try_no, cmd, tuple(args), float(when))


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

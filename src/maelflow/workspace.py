"""Where one user's embedded services, built suites and run records live.

A workspace keeps everything that belongs to one stack together, so two stacks (a user's demo and a
test run, say) never share a port, a checkpoint file or a bucket. It is chosen, in order, by the
``--workspace`` option, the ``MAELFLOW_WORKSPACE`` environment variable, or a per-user default.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ENV_VAR = "MAELFLOW_WORKSPACE"


def default_root() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "maelflow" / "default"


@dataclass(frozen=True)
class Workspace:
    root: Path

    @classmethod
    def resolve(cls, explicit: str | os.PathLike[str] | None = None) -> "Workspace":
        chosen = explicit or os.environ.get(ENV_VAR) or default_root()
        return cls(Path(chosen).expanduser().resolve())

    def path(self, *parts: str) -> Path:
        return self.root.joinpath(*parts)

    def ensure(self, *parts: str) -> Path:
        p = self.path(*parts)
        p.mkdir(parents=True, exist_ok=True)
        return p

    @property
    def suites_dir(self) -> Path:
        return self.path("suites")

    # -- small JSON state files, written atomically so a crash never leaves half a file ------------
    def read_json(self, *parts: str, default: Any = None) -> Any:
        p = self.path(*parts)
        try:
            return json.loads(p.read_text())
        except FileNotFoundError:
            return default

    def write_json(self, data: Any, *parts: str, mode: int = 0o644) -> Path:
        p = self.path(*parts)
        write_atomic(p, json.dumps(data, indent=2, sort_keys=True) + "\n", mode=mode)
        return p


def write_atomic(path: Path, text: str | bytes, mode: int = 0o644) -> None:
    """Write beside the target then rename, so readers see the old file or the new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = text.encode() if isinstance(text, str) else text
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise

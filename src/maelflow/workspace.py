"""Where one user's embedded services, built suites and run records live.

A workspace keeps everything that belongs to one stack together, so two stacks (a user's demo and a
test run, say) never share a port, a checkpoint file or a bucket. It is chosen, in order, by the
``--workspace`` option, the ``MAELFLOW_WORKSPACE`` environment variable, or a per-user default.

Its root is private to its owner (0700): it holds the S3 server's objects, the catalogue index, the
ecFlow checkpoint (job passwords) and the services' credentials, which other local users of a shared
machine must not read. Files are replaced atomically and durably (fsync of the file and its folder),
so a crash or a power cut leaves the old content or the new one, never an empty file.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from maelflow_registry.config import Paths

ENV_VAR = "MAELFLOW_WORKSPACE"
# the services profile in force for a workspace (`maelflow services use NAME`); none: its own services
SERVICES_PROFILE = "services.yaml"


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

    def create(self) -> Path:
        """The root, created 0700; an existing root of ours that others can enter is closed (0700)."""
        secure_dir(self.root)
        return self.root

    def ensure(self, *parts: str) -> Path:
        self.create()
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
        self.create()
        p = self.path(*parts)
        write_atomic(p, json.dumps(data, indent=2, sort_keys=True) + "\n", mode=mode)
        return p


def secure_dir(path: Path) -> None:
    """Create ``path`` (and its parents) with the private folder mode 0700; make an existing one
    that this user owns 0700 too. The mode is given to mkdir, so the folder is never open, even for
    an instant, whatever the umask."""
    path = Path(path)
    if not path.is_dir():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
    st = path.stat()
    if st.st_uid == os.getuid() and st.st_mode & 0o077:
        os.chmod(path, 0o700)


def write_atomic(path: Path, text: str | bytes, mode: int = 0o644) -> None:
    """Write beside the target then rename, so readers see the old file or the new one, never half.

    The temporary file is created 0600 (O_EXCL) before anything is written, so a secret (``mode``
    0o600) is never readable by others, not even while it is written; it gets ``mode`` only once
    complete. The data is fsynced before the rename and the folder after it, so after a crash the
    name points at complete content (not at an empty file, as a rename before writeback can leave).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = text.encode() if isinstance(text, str) else text
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)  # O_CREAT|O_EXCL, 0600
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
            os.fchmod(fh.fileno(), mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(path.parent)


def write_secret(path: Path, text: str | bytes) -> None:
    """A credential file: 0600 from its creation, replaced atomically and durably."""
    write_atomic(path, text, mode=0o600)


def fsync_dir(path: Path) -> None:
    """Make a rename or a new name in ``path`` durable."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on a folder; the rename itself is still atomic
        pass
    finally:
        os.close(fd)


def catalogue_paths(ws: "Workspace") -> Paths:
    """Where a workspace's catalogue keeps its index, settings and tokens (the catalogue service
    and the S3 service, which makes the catalogue's buckets, both need it)."""
    return Paths(ws.path("catalogue"))

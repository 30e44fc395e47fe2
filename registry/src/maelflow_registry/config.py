"""The catalogue's settings and files, re-read by the running server when they change.

Everything lives in one directory that the caller chooses (maelflow uses ``<workspace>/catalogue/``):
``index.sqlite`` (a cache of S3), ``settings.json`` (anonymous read, naming policy, size limits),
``tokens.json`` (hashed tokens, mode 0600) and ``service-token`` (the caller's own write token).
Settings and tokens are files rather than index rows so that deleting and rebuilding the index from
S3 never loses them, and so that tokens can be made whether or not the server runs: the server
notices a new file by its modification time.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable

DEFAULT_BUCKET = "catalogue"
NAMING_POLICIES = ("anemoi", "relaxed")


@dataclass
class Settings:
    anonymous_read: bool = True          # loopback default; switch off where the port is reachable by others
    dataset_naming: str = "anemoi"       # anemoi-datasets' naming convention, or 'relaxed' (key syntax only)
    max_body_bytes: int = 16 * 1024**2   # checkpoint metadata with a full config is a few MB
    max_artefact_bytes: int = 256 * 1024**2
    bucket: str = DEFAULT_BUCKET         # entries and artefacts
    datasets_bucket: str = "ewc"         # where `anemoi-registry datasets --upload` puts zarrs (maelflow's EWC bucket)
    datasets_platform: str = "ewc"
    weights_platform: str = "ewc"
    list_limit: int = 10000              # default and maximum page of a list request
    reconcile_seconds: int = 300         # how often the server compares the index with S3's listing (0: never)
    max_connections: int = 256           # connections + requests in flight per server process; more get 503
    keep_alive_seconds: int = 5          # an idle keep-alive connection is closed after this long

    @classmethod
    def from_json(cls, data: dict | None) -> "Settings":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in (data or {}).items() if k in known})

    def to_json(self) -> dict:
        return asdict(self)


def server_limits(settings: Settings) -> dict[str, Any]:
    """uvicorn's options that keep a flood of connections from exhausting a server process.

    ``limit_concurrency``: past ``max_connections`` connections or requests in flight, uvicorn
    answers 503 at once instead of taking more work (each request may buffer a body of up to
    ``max_body_bytes``); ``timeout_keep_alive``: idle keep-alive connections do not pile up. Read
    when the server starts (a change takes a restart)."""
    return {"limit_concurrency": max(1, int(settings.max_connections)),
            "timeout_keep_alive": max(1, int(settings.keep_alive_seconds))}


@dataclass(frozen=True)
class Paths:
    """The catalogue's directory and the files in it."""

    dir: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "dir", Path(self.dir))

    @property
    def index(self) -> Path:
        return self.dir / "index.sqlite"

    @property
    def settings(self) -> Path:
        return self.dir / "settings.json"

    @property
    def tokens(self) -> Path:
        return self.dir / "tokens.json"

    @property
    def tokens_lock(self) -> Path:
        """Held (flock) across every read-modify-write of ``tokens.json`` and ``service-token``."""
        return self.dir / ".tokens.lock"

    @property
    def service_token(self) -> Path:
        """A write token for the caller's own tasks (see :meth:`maelflow_registry.auth.TokenStore.service_token`)."""
        return self.dir / "service-token"


def load_settings(paths: Paths) -> Settings:
    try:
        return Settings.from_json(json.loads(paths.settings.read_text()))
    except FileNotFoundError:
        return Settings()


def save_settings(paths: Paths, settings: Settings) -> None:
    write_atomic(paths.settings, json.dumps(settings.to_json(), indent=2, sort_keys=True) + "\n")


def write_atomic(path: Path, text: str, mode: int = 0o644) -> None:
    """Write beside the target then rename, so the server reads the old file or the new one, never half.

    The temporary file is made 0600 (``mkstemp``: O_EXCL) before anything is written, so a secret is
    never readable by others, not even while written; it gets ``mode`` once complete. The data is
    fsynced before the rename and the folder after it: after a power loss the name points at the
    complete new content or the old one, never at an empty file (which would make every
    authenticated request fail).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
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


def fsync_dir(path: Path) -> None:
    """Make a rename (or a new name) in folder ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Watched:
    """A value loaded from a file, reloaded when the file's mtime or size changes (one stat per use)."""

    def __init__(self, path: Path, load: Callable[[], Any]):
        self.path = path
        self._load = load
        self._stamp: tuple | None = None
        self._value: Any = None
        self._lock = threading.Lock()

    def get(self) -> Any:
        try:
            st = os.stat(self.path)
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        except FileNotFoundError:
            stamp = None
        if stamp != self._stamp or self._value is None:
            with self._lock:
                self._value = self._load()
                self._stamp = stamp
        return self._value

"""A stage's objects read from a local copy of the dataset instead of the object store.

The dataset is built (and published) at ECMWF; a site whose login nodes cannot reach the EWC is
fed by a push from a machine that can reach it. When that machine also holds the copy the
dataset was published from, reading it there saves downloading every byte from S3 first. The
published manifest stays the definition of the dataset: each file is hashed as it is read and a
file that differs from it is refused by the stage like a corrupt object, so the site gets exactly
the published dataset or nothing, with the same atomicity and resumption as from the store.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from maelflow_transfer.errors import StoreError, TransientError
from maelflow_transfer.manifest import Manifest
from maelflow_transfer.retry import Backoff
from maelflow_transfer.store import BUF, thread_buffer


class LocalSource:
    """The part of ``store.Store`` a stage reads objects through, over a local folder; the
    manifest still comes from ``store``."""

    damaged_hint = ("the local copy differs from the published dataset: stage from the object store "
                    "(without --from), or publish this copy again")

    def __init__(self, root: Path | str, store):
        self.root = Path(root).absolute()
        self.store = store
        self.backoff = Backoff(attempts=2, base=0.01, cap=0.01)   # a file read again is read the same
        if not self.root.is_dir():
            raise StoreError(f"--from {self.root}: no such folder")

    @property
    def url(self) -> str:
        return str(self.root)

    @property
    def endpoint(self) -> str:
        return str(self.root)

    def require_manifest(self, dataset: str) -> Manifest:
        return self.store.require_manifest(dataset)

    def _open(self, rel: str) -> int:
        path = self.root / rel
        try:
            return os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise StoreError(f"{path}: listed in the published manifest but missing from the local copy; "
                             + self.damaged_hint) from None

    def get(self, rel: str, sink, *, start: int | None = None, end: int | None = None,
            stop: threading.Event | None = None) -> int:
        """Read ``rel`` (bytes ``start``..``end`` inclusive, if given) into ``sink``, a page-aligned
        MiB at a time, like ``Store.get``."""
        view = thread_buffer()
        path = self.root / rel
        fd = self._open(rel)
        try:
            pos = start or 0
            left = None if end is None else end + 1 - pos
            n = 0
            while left is None or left > 0:
                if stop is not None and stop.is_set():
                    raise TransientError(f"reading {path}: stopped")
                want = BUF if left is None else min(BUF, left)
                k = os.preadv(fd, [view[:want]], pos)
                if not k:
                    break
                sink(view[:k])
                n, pos = n + k, pos + k
                if left is not None:
                    left -= k
            return n
        finally:
            os.close(fd)

    def read_range(self, rel: str, start: int, end: int, stop: threading.Event | None = None) -> bytes:
        """Bytes ``start``..``end`` (exclusive) of ``rel``, like ``Store.read_range``."""
        if stop is not None and stop.is_set():
            raise TransientError(f"reading {self.root / rel}: stopped")
        fd = self._open(rel)
        try:
            return os.pread(fd, end - start, start)
        finally:
            os.close(fd)

"""A manifest lists every object of a dataset with its size and SHA-256, written once at publish.

S3 ETags cannot be trusted for content (rclone's multipart ETags differ from AWS's), so the manifest
is the single source of truth for what a complete, correct copy is.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

MANIFEST_NAME = ".maelflow-manifest.json"
CHUNK = 1 << 20


@dataclass(frozen=True)
class Entry:
    key: str
    size: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    dataset: str
    entries: tuple[Entry, ...]

    @property
    def total_bytes(self) -> int:
        return sum(e.size for e in self.entries)

    def to_json(self) -> str:
        return json.dumps({"dataset": self.dataset, "format": 1, "total_bytes": self.total_bytes,
                           "objects": [e.__dict__ for e in self.entries]}, indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes) -> "Manifest":
        data = json.loads(text)
        return cls(data["dataset"], tuple(Entry(**o) for o in data["objects"]))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def scan(root: Path, dataset: str, workers: int = 8) -> Manifest:
    """Checksum every file under ``root`` (a zarr folder), in parallel."""
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST_NAME)

    def one(p: Path) -> Entry:
        return Entry(p.relative_to(root).as_posix(), p.stat().st_size, sha256_file(p))

    with ThreadPoolExecutor(max_workers=workers) as pool:
        entries = tuple(pool.map(one, files))
    return Manifest(dataset, entries)


def verify_tree(root: Path, manifest: Manifest) -> list[str]:
    """Keys that are missing or differ from the manifest (empty when the copy is complete)."""
    bad = []
    for e in manifest.entries:
        p = root / e.key
        if not p.is_file() or p.stat().st_size != e.size or sha256_file(p) != e.sha256:
            bad.append(e.key)
    return bad


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize

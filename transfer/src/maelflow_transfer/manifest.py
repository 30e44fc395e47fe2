"""A manifest lists every object of a dataset with its size and SHA-256, written once at publish.

S3 ETags cannot be trusted for content (rclone's multipart ETags differ from AWS's), so the manifest
is the single source of truth for what a complete, correct copy is. It is stored beside the dataset
in the store (``<prefix>/.maelflow-manifest.json``) and, once a stage is complete, in the staged
folder too: a folder holding the manifest of the published dataset is a finished stage.

Its keys become paths under a destination, and anyone holding the store's key can write a manifest:
a manifest is checked as it is made or read (``paths.check_keys``), so a key that would leave the
destination (``../x``, ``/x``, a backslash, NUL or newline) refuses the dataset before anything is written.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from maelflow_transfer.paths import check_keys

MANIFEST_NAME = ".maelflow-manifest.json"
CHUNK = 1 << 20
FORMAT = 1


@dataclass(frozen=True)
class Entry:
    key: str
    size: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    dataset: str
    entries: tuple[Entry, ...]

    def __post_init__(self) -> None:
        check_keys((e.key for e in self.entries), self.dataset)

    @property
    def total_bytes(self) -> int:
        return sum(e.size for e in self.entries)

    def by_key(self) -> dict[str, Entry]:
        return {e.key: e for e in self.entries}

    def to_json(self) -> str:
        return json.dumps({"dataset": self.dataset, "format": FORMAT, "total_bytes": self.total_bytes,
                           "objects": [e.__dict__ for e in self.entries]}, indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes) -> "Manifest":
        data = json.loads(text)
        if data.get("format", FORMAT) > FORMAT:
            raise ValueError(f"manifest format {data['format']} is newer than this maelflow reads ({FORMAT})")
        return cls(data["dataset"], tuple(Entry(**o) for o in data["objects"]))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as fh:
        while n := fh.readinto(buf):
            h.update(view[:n])   # hashlib releases the GIL on large updates: threads hash in parallel
    return h.hexdigest()


def list_files(root: Path) -> list[Path]:
    """The dataset's files (not the manifest, not hidden transfer leftovers), sorted."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in filenames:
            if name == MANIFEST_NAME:
                continue
            out.append(Path(dirpath) / name)
    return sorted(out)


def scan(root: Path, dataset: str, workers: int = 8) -> Manifest:
    """Checksum every file under ``root`` (a zarr folder), in parallel."""
    return scan_with_stats(root, dataset, workers)[0]


def scan_with_stats(root: Path, dataset: str, workers: int = 8) -> tuple[Manifest, dict[str, tuple[int, int]]]:
    """The manifest, and each file's (size, mtime_ns) as it was *before* it was read: a file whose
    stat differs later was written meanwhile, and its checksum cannot be trusted."""
    root = Path(root)
    files = list_files(root)
    stats: dict[str, tuple[int, int]] = {}

    def one(p: Path) -> Entry:
        st = p.stat()
        key = p.relative_to(root).as_posix()
        stats[key] = (st.st_size, st.st_mtime_ns)
        return Entry(key, st.st_size, sha256_file(p))

    with ThreadPoolExecutor(max_workers=workers) as pool:
        entries = tuple(pool.map(one, files))
    return Manifest(dataset, entries), stats


def verify_tree(root: Path, manifest: Manifest, workers: int = 4) -> list[str]:
    """Keys that are missing or differ from the manifest (empty when the copy is complete)."""
    root = Path(root)

    def bad(e: Entry) -> bool:
        p = root / e.key
        try:
            return p.stat().st_size != e.size or sha256_file(p) != e.sha256
        except OSError:
            return True

    with ThreadPoolExecutor(max_workers=workers) as pool:
        flags = list(pool.map(bad, manifest.entries))
    return [e.key for e, f in zip(manifest.entries, flags) if f]


def extra_files(root: Path, manifest: Manifest) -> list[str]:
    """Files under ``root`` that the manifest does not list."""
    known = {e.key for e in manifest.entries}
    return [p.relative_to(root).as_posix() for p in list_files(Path(root))
            if p.relative_to(root).as_posix() not in known]


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize

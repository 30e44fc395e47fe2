"""A manifest lists every object of a dataset with its size and digests, written once at publish.

S3 ETags cannot be trusted for content (rclone's multipart ETags differ from AWS's), so the manifest
is the single source of truth for what a complete, correct copy is. It is stored beside the dataset
in the store (``<prefix>/.maelflow-manifest.json``) and, once a stage is complete, in the staged
folder too: a folder holding the manifest of the published dataset is a finished stage.

Its keys become paths under a destination, and anyone holding the store's key can write a manifest:
a manifest is checked as it is made or read (``paths.check_keys``), so a key that would leave the
destination (``../x``, ``/x``, a backslash, NUL or newline) refuses the dataset before anything is written.

Two digests per object: SHA-256, the identity of the content (a site checks a push with its own
``openssl dgst -sha256`` or ``sha256sum``: no BLAKE3 there), and BLAKE3 (five times SHA-256's speed
on one core here), which every check made by this library uses where the manifest has it: a pull
on two cores then keeps up with the network. Both come from one read of the bytes (``Hashes``).
The BLAKE3 digests sit in a top-level map beside ``objects`` (``"blake3": {key: hex}``, listed in
``"digests"``), so an older reader of this format, which takes each object's fields as they are,
still reads the manifest and checks SHA-256; a manifest without them (published before) is checked
with SHA-256. They are not part of a dataset's identity: two manifests that differ only in
carrying BLAKE3 describe the same dataset (``Entry`` equality leaves ``blake3`` out).
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from maelflow_transfer.paths import check_keys

try:
    from blake3 import blake3 as _blake3
except ImportError:          # a dependency; without it every check falls back to SHA-256
    _blake3 = None

MANIFEST_NAME = ".maelflow-manifest.json"
CHUNK = 1 << 20
FORMAT = 1
SHA256, BLAKE3 = "sha256", "blake3"
HAVE_BLAKE3 = _blake3 is not None


def hasher(algo: str):
    """A new hash object of ``algo`` ("sha256" or "blake3"): ``update``, ``hexdigest``."""
    if algo == BLAKE3:
        return _blake3()           # releases the GIL while it hashes, like hashlib
    if algo == SHA256:
        return hashlib.sha256()
    raise ValueError(f"unknown digest {algo!r}")


@dataclass(frozen=True)
class Entry:
    key: str
    size: int
    sha256: str
    blake3: str | None = field(default=None, compare=False)     # not part of the dataset's identity

    @property
    def algo(self) -> str:
        """The digest a check made here uses: BLAKE3 where the manifest has it, SHA-256 else."""
        return BLAKE3 if self.blake3 and HAVE_BLAKE3 else SHA256

    def digest(self, algo: str) -> str | None:
        return self.blake3 if algo == BLAKE3 else self.sha256 if algo == SHA256 else None

    def hasher(self):
        """(algorithm, new hash object) for checking this object's bytes as they are read."""
        algo = self.algo
        return algo, hasher(algo)

    def matches(self, algo: str, hexdigest: str) -> bool:
        want = self.digest(algo)
        return want is not None and hexdigest == want


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

    @property
    def digests(self) -> tuple[str, ...]:
        """The algorithms this manifest carries: SHA-256 for every object, BLAKE3 for those in its
        ``blake3`` map (every object, when publish wrote it)."""
        return (SHA256, BLAKE3) if any(e.blake3 for e in self.entries) else (SHA256,)

    def to_json(self) -> str:
        data = {"dataset": self.dataset, "format": FORMAT, "total_bytes": self.total_bytes,
                "digests": list(self.digests),
                "objects": [{"key": e.key, "size": e.size, "sha256": e.sha256} for e in self.entries]}
        if BLAKE3 in self.digests:
            data[BLAKE3] = {e.key: e.blake3 for e in self.entries if e.blake3}
        return json.dumps(data, indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes) -> "Manifest":
        data = json.loads(text)
        if data.get("format", FORMAT) > FORMAT:
            raise ValueError(f"manifest format {data['format']} is newer than this maelflow reads ({FORMAT})")
        b3 = data.get(BLAKE3) if BLAKE3 in data.get("digests", ()) else None
        if b3 is not None and not (isinstance(b3, dict) and all(
                isinstance(v, str) and len(v) == 64 for v in b3.values())):
            raise ValueError("its blake3 digests are not a map of key to 64 hex digits")
        b3 = b3 or {}          # an object missing from the map is checked with SHA-256
        return cls(data["dataset"], tuple(Entry(o["key"], o["size"], o["sha256"], b3.get(o["key"]))
                                          for o in data["objects"]))


class Hashes:
    """SHA-256 and BLAKE3 (where installed) fed from the same buffers: one read makes both."""

    def __init__(self):
        self.sha = hashlib.sha256()
        self.b3 = _blake3() if HAVE_BLAKE3 else None

    def update(self, data) -> None:
        self.sha.update(data)
        if self.b3 is not None:
            self.b3.update(data)

    def entry(self, key: str, size: int) -> Entry:
        return Entry(key, size, self.sha.hexdigest(), self.b3.hexdigest() if self.b3 is not None else None)


def _hash_file(path: Path, h):
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as fh:
        while n := fh.readinto(buf):
            h.update(view[:n])   # hashlib and blake3 release the GIL on large updates: threads hash in parallel
    return h


def sha256_file(path: Path) -> str:
    return _hash_file(path, hashlib.sha256()).hexdigest()


def digest_file(path: Path, algo: str) -> str:
    """``algo``'s hex digest of the file at ``path``."""
    return _hash_file(path, hasher(algo)).hexdigest()


def check_file(path: Path, e: Entry) -> tuple[str, bool]:
    """(the algorithm used, whether the file at ``path`` matches ``e``): BLAKE3 where ``e`` has it."""
    algo = e.algo
    return algo, digest_file(path, algo) == e.digest(algo)


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
    """Both digests of every file under ``root`` (a zarr folder), in parallel."""
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
        return _hash_file(p, Hashes()).entry(key, st.st_size)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        entries = tuple(pool.map(one, files))
    return Manifest(dataset, entries), stats


def verify_tree(root: Path, manifest: Manifest, workers: int = 4) -> list[str]:
    """Keys that are missing or differ from the manifest (empty when the copy is complete), each
    checked with the fastest digest the manifest has for it (``Entry.algo``)."""
    root = Path(root)

    def bad(e: Entry) -> bool:
        p = root / e.key
        try:
            return p.stat().st_size != e.size or not check_file(p, e)[1]
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

"""Publish a dataset folder (an ML-ready zarr) to the EWC object store.

The folder is scanned first: every file's size, SHA-256 and BLAKE3 (both from one read) make the
manifest. Objects are then uploaded in parallel (large ones as multipart uploads, several parts at a
time), each one's bytes hashed again as they are read for the upload (BLAKE3, the faster: it only
has to match the scan): a file that changed since the scan is refused before its object is completed. Objects already in the store with the same checksum (an interrupted publish) are kept.
The manifest is written last, so a dataset without a manifest is, by definition, not published:
a failed publish publishes nothing.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

from maelflow_transfer.errors import SourceChanged, TransferError
from maelflow_transfer.manifest import Entry, Manifest, list_files, scan_with_stats
from maelflow_transfer.memory import keep_buffers_in_heap
from maelflow_transfer.progress import Progress
from maelflow_transfer.stage import Result
from maelflow_transfer.store import MULTIPART_THRESHOLD, PART_SIZE, Store


def _changed(source: Path, dataset: str, key: str) -> SourceChanged:
    return SourceChanged(f"dataset {dataset!r}: {source / key} changed while it was being published; nothing "
                         "was published (the store keeps the earlier manifest, if any): publish again once "
                         "the dataset is no longer being written")


def publish(source: Path, dataset: str, store: Store, *, workers: int = 16, progress: Progress | None = None,
            replace: bool = False, on_manifest: Callable[[Manifest], None] | None = None) -> Result:
    """Upload ``source`` to ``store`` and write its manifest; returns what was done.

    A dataset already published with other content is refused unless ``replace``: its manifest is
    then withdrawn first (the dataset is unpublished until the new one is written), and objects the
    new manifest does not list are deleted at the end.
    """
    source = Path(source)
    t0 = time.monotonic()
    keep_buffers_in_heap()
    progress = progress or Progress()
    if not source.is_dir():
        raise TransferError(f"dataset {dataset!r}: source {source} does not exist or is not a folder")
    manifest, stats = scan_with_stats(source, dataset, workers=min(workers, 8))
    if not manifest.entries:
        raise TransferError(f"dataset {dataset!r}: source {source} holds no files")
    n = len(manifest.entries)
    published = store.read_manifest()
    if published == manifest:
        progress.start(manifest.total_bytes, n)
        progress.skipped(manifest.total_bytes, n)
        progress.finish()
        return Result(n, 0, 0, time.monotonic() - t0, already=n)
    if published is not None:
        if not replace:
            differ = len(set(published.entries) ^ set(manifest.entries))
            raise TransferError(f"dataset {dataset!r} is already published at {store.url} with other content "
                                f"({differ} object entries differ): a published dataset does not change; "
                                "publish it under a new name, or replace it on purpose (--replace)")
        store.delete_manifest()
    if on_manifest:
        on_manifest(manifest)
    existing = store.list()
    progress.start(manifest.total_bytes, n)
    stop = threading.Event()
    lock = threading.Lock()
    counts = {"copied": 0, "bytes": 0}

    def one(e: Entry) -> None:
        if stop.is_set():
            return
        if existing.get(e.key) == e.size and store.sha256_of(e.key, stop) == e.sha256:
            progress.skipped(e.size)
            return
        path = source / e.key
        if e.size <= MULTIPART_THRESHOLD:
            data = path.read_bytes()
            algo, h = e.hasher()
            h.update(data)
            if len(data) != e.size or not e.matches(algo, h.hexdigest()):
                raise _changed(source, dataset, e.key)
            store.put(e.key, data, e.sha256, stop)
            progress.moved(e.size)
        else:
            def parts():
                """The file's parts, hashed as they are read; a file that no longer matches the
                scan raises after its last part, before the upload is completed."""
                (algo, h), seen = e.hasher(), 0
                with open(path, "rb") as fh:
                    while chunk := fh.read(PART_SIZE):
                        if stop.is_set():
                            raise TransferError(f"dataset {dataset!r}: publish stopped")
                        h.update(chunk)
                        seen += len(chunk)
                        progress.moved(len(chunk))
                        yield chunk
                if seen != e.size or not e.matches(algo, h.hexdigest()):
                    raise _changed(source, dataset, e.key)
            store.put_multipart(e.key, parts, e.sha256)
        progress.object_done()
        with lock:
            counts["copied"] += 1
            counts["bytes"] += e.size

    errors: list[BaseException] = []

    def guarded(e: Entry) -> None:
        try:
            one(e)
        except BaseException as exc:  # noqa: BLE001 - first failure stops the others
            errors.append(exc)
            stop.set()

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="publish") as pool:
        list(pool.map(guarded, manifest.entries))
    if errors:
        exc = errors[0]
        if isinstance(exc, TransferError):
            raise exc
        if isinstance(exc, OSError):
            raise TransferError(f"dataset {dataset!r}: reading {source} failed: {exc}") from None
        raise exc
    # a file rewritten after it was uploaded, or a file added meanwhile: the manifest would lie
    for key, (size, mtime) in stats.items():
        try:
            st = (source / key).stat()
        except OSError:
            raise _changed(source, dataset, key) from None
        if (st.st_size, st.st_mtime_ns) != (size, mtime):
            raise _changed(source, dataset, key)
    now = {p.relative_to(source).as_posix() for p in list_files(source)}
    if now != set(stats):
        raise _changed(source, dataset, sorted(now ^ set(stats))[0])
    store.write_manifest(manifest)
    if replace:
        stale = sorted(set(existing) - {e.key for e in manifest.entries})
        if stale:
            store.delete(stale)
    progress.finish()
    return Result(n, counts["copied"], counts["bytes"], time.monotonic() - t0,
                  already=n - counts["copied"])

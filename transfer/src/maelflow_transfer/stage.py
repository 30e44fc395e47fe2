"""Stage a published dataset from the object store into a site's folder, object by object.

Each object is streamed from the store into its destination while it is hashed (one pass over the
bytes, no re-reading), checked against the manifest, and only then renamed into place. Where the
destination is a site served by maelflow's SFTP server, the site hashes the bytes as they land and
renames only a match (the check moves to where the copy is, off the pushing side's cores). A wrong
object is fetched again (a few times, with back-off), then the stage fails naming it; network
failures are retried with back-off. Large objects are fetched as parallel byte ranges where the
destination allows writing at offsets (a local folder). The destination (``trees``) decides where
the bytes go: this machine's disk, or a site's disk over SFTP.
"""

from __future__ import annotations

import hashlib
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from maelflow_transfer.errors import ChecksumMismatch, DiskFull, StoreError, TransferError, TransientError, disk_error
from maelflow_transfer.manifest import Entry, Manifest
from maelflow_transfer.progress import Progress
from maelflow_transfer.store import Store

DAMAGED_STORE = "the copy in the store is corrupt; publish the dataset again from its source"
RANGE_THRESHOLD = 64 << 20     # objects above this are fetched as parallel ranges (local trees)
RANGE_SIZE = 16 << 20


def checksum_mismatch(store, manifest: Manifest, e: Entry, reads: int) -> ChecksumMismatch:
    hint = getattr(store, "damaged_hint", DAMAGED_STORE)
    return ChecksumMismatch(f"dataset {manifest.dataset!r}: object {e.key} at {store.url}/{e.key} does not match "
                            f"its manifest checksum after {reads} reads: {hint}", e.key)


@dataclass
class Result:
    objects: int
    copied: int
    bytes_copied: int
    seconds: float
    already: int = 0           # objects found complete (a re-run), not copied again

    @property
    def rate(self) -> float:
        return self.bytes_copied / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        return (f"{self.objects} objects ({self.copied} copied, {self.already} already there), "
                f"{self.bytes_copied / 2**20:.1f} MiB in {self.seconds:.1f}s at {self.rate / 2**20:.1f} MiB/s")


class RateLimit:
    """At most ``rate`` bytes/s over all threads (a shared login node; tests that must be slow)."""

    def __init__(self, rate: float | None):
        self.rate = rate
        self.lock = threading.Lock()
        self.t0 = time.monotonic()
        self.sent = 0

    def take(self, n: int) -> None:
        if not self.rate:
            return
        with self.lock:
            self.sent += n
            wait = self.sent / self.rate - (time.monotonic() - self.t0)
        if wait > 0:
            time.sleep(wait)


class _Run:
    def __init__(self, store: Store, tree, manifest: Manifest, progress: Progress, retries: int,
                 workers: int, limit: RateLimit, wrong: dict[str, int] | None = None):
        """``wrong``: times each object was refused by the site, over the stage's runs."""
        self.store, self.tree, self.manifest, self.progress = store, tree, manifest, progress
        self.retries = retries
        self.limit = limit
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.copied = self.bytes = 0
        self.done: set[str] = set()
        self.wrong = wrong if wrong is not None else {}
        self.refused: set[str] = set()     # refused by the site in this run
        self.error: BaseException | None = None
        self.range_pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="range") if tree.ranged else None

    # -- one object ----------------------------------------------------------------------------
    def fetch(self, e: Entry) -> None:
        wrong = transient = 0
        while not self.stop.is_set():
            moved = [0]
            try:
                ok = self._fetch_ranged(e, moved) if self.range_pool and e.size > RANGE_THRESHOLD \
                    else self._fetch_stream(e, moved)
            except (TransientError, ConnectionError) as exc:   # ConnectionError: the site's SSH dropped
                self.progress.moved(-moved[0])
                transient += 1
                if transient >= self.store.backoff.attempts:
                    raise StoreError(f"dataset {self.manifest.dataset!r}: {exc} (gave up after {transient} "
                                     f"tries; is {self.store.endpoint} up?)") from None
                self.store.backoff.sleep(transient - 1, self.stop)
                continue
            except BaseException:
                self.progress.moved(-moved[0])
                raise
            if ok:
                return
            self.progress.moved(-moved[0])
            wrong += 1
            if wrong > self.retries:
                raise checksum_mismatch(self.store, self.manifest, e, wrong)
            self.store.backoff.sleep(wrong - 1, self.stop)

    def _fetch_stream(self, e: Entry, moved: list[int]) -> bool:
        part = self.tree.writer(e)
        remote = getattr(part, "verifies", False)        # the site checks it (its answer comes later)
        h = hashlib.sha256()

        def count(n: int) -> None:
            moved[0] += n
            self.progress.moved(n)
            self.limit.take(n)
        try:
            if remote and hasattr(self.store, "splice"):    # a local copy: the kernel moves its bytes
                n = self.store.splice(e.key, part.write_from, e.size, count, stop=self.stop)
            else:
                def sink(view: memoryview) -> None:
                    if not remote:
                        h.update(view)
                    part.write(view)
                    count(len(view))
                n = self.store.get(e.key, sink, stop=self.stop)
        except BaseException:
            part.abort()
            raise
        if n != e.size or (not remote and h.hexdigest() != e.sha256):
            part.abort()
            return False
        if remote:
            part.commit(lambda: self.placed(e), on_mismatch=lambda: self.mismatched(e))
        else:
            part.commit(lambda: self.placed(e))
        return True

    def mismatched(self, e: Entry) -> None:
        """The site found ``e``'s bytes wrong and dropped them: fetched again by ``stage``."""
        with self.lock:
            self.wrong[e.key] = self.wrong.get(e.key, 0) + 1
            self.refused.add(e.key)

    def _fetch_ranged(self, e: Entry, moved: list[int]) -> bool:
        part = self.tree.writer(e, ranged=True)
        lock = threading.Lock()

        def one_range(start: int, end: int) -> None:
            for attempt in range(self.store.backoff.attempts):
                pos = [start]

                def sink(view: memoryview) -> None:
                    part.pwrite(view, pos[0])
                    pos[0] += len(view)
                    with lock:
                        moved[0] += len(view)
                    self.progress.moved(len(view))
                    self.limit.take(len(view))
                try:
                    self.store.get(e.key, sink, start=start, end=end, stop=self.stop)
                except TransientError:
                    with lock:
                        moved[0] -= pos[0] - start
                    self.progress.moved(-(pos[0] - start))
                    if attempt + 1 == self.store.backoff.attempts or self.stop.is_set():
                        raise
                    self.store.backoff.sleep(attempt, self.stop)
                    continue
                if pos[0] != end + 1:
                    raise TransientError(f"{e.key}: range {start}-{end} came back with {pos[0] - start} bytes")
                return

        try:
            futures = [self.range_pool.submit(one_range, s, min(s + RANGE_SIZE, e.size) - 1)
                       for s in range(0, e.size, RANGE_SIZE)]
            for f in futures:
                f.result()
            ok = part.sha256() == e.sha256
        except BaseException:
            part.abort()
            raise
        if not ok:
            part.abort()
            return False
        part.commit(lambda: self.placed(e))
        return True

    def placed(self, e: Entry) -> None:
        """``e`` is in place and journalled (for a site: the answer to its rename came back)."""
        with self.lock:
            self.done.add(e.key)
            self.copied += 1
            self.bytes += e.size
        self.progress.object_done()

    # -- all objects ---------------------------------------------------------------------------
    def run(self, todo: list[Entry], workers: int) -> None:
        items = iter(sorted(todo, key=lambda e: -e.size) if self.range_pool else todo)
        take = threading.Lock()

        def worker() -> None:
            while not self.stop.is_set():
                with take:
                    e = next(items, None)
                if e is None:
                    return
                try:
                    self.fetch(e)
                except BaseException as exc:  # noqa: BLE001 - the first failure stops every worker
                    with self.lock:
                        if self.error is None:
                            self.error = exc
                    self.stop.set()
                    return

        threads = [threading.Thread(target=worker, name=f"stage-{i}", daemon=True)
                   for i in range(max(1, min(workers, len(todo))))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if self.range_pool:
            self.range_pool.shutdown(wait=True)
        try:
            self.tree.close(drain=self.error is None)    # the site's last answers: failures surface here
        except BaseException as exc:  # noqa: BLE001
            self.error = self.error or exc
        if self.error is not None:
            raise self.error


def stage(store: Store, tree, dataset: str, *, workers: int = 32, progress: Progress | None = None,
          retries: int = 3, max_rate: float | None = None) -> Result:
    """Copy the published ``dataset`` at ``store`` into ``tree``; returns what was done.

    Nothing to do when the destination already holds this manifest's copy. Raises TransferError
    (and subclasses: NotPublished, CredentialsError, DiskFull, ChecksumMismatch, StoreError,
    DestinationConflict); the destination stays invisible after any failure.
    """
    t0 = time.monotonic()
    progress = progress or Progress()
    manifest = store.require_manifest(dataset)
    n = len(manifest.entries)
    if tree.state(manifest) == "complete":
        progress.start(manifest.total_bytes, n)
        progress.skipped(manifest.total_bytes, n)
        progress.finish()
        return Result(n, 0, 0, time.monotonic() - t0, already=n)
    done = tree.prepare(manifest, workers=min(workers, 8))
    todo = [e for e in manifest.entries if e.key not in done]
    need = sum(e.size for e in todo)
    free = tree.free_bytes()
    if free is not None and need > free:
        raise DiskFull(f"dataset {dataset!r}: {need / 2**30:.2f} GiB still to copy but only {free / 2**30:.2f} GiB "
                       f"free at {tree}; free some space (or stage to another --dest) and run again")
    progress.start(manifest.total_bytes, n)
    progress.skipped(sum(e.size for e in manifest.entries if e.key in done), len(done))
    tree.makedirs([e.key for e in todo])
    copied = nbytes = 0
    wrong: dict[str, int] = {}
    lost_runs = 0
    while todo:
        run = _Run(store, tree, manifest, progress, retries, workers, RateLimit(max_rate), wrong)
        try:
            run.run(todo, workers)
        except TransferError:
            raise
        except OSError as exc:
            err = disk_error(exc, f"dataset {dataset!r}: writing to {tree}")
            raise err if isinstance(err, TransferError) else \
                TransferError(f"dataset {dataset!r}: writing to {tree} failed: {exc}") from None
        copied, nbytes = copied + run.copied, nbytes + run.bytes
        todo = [e for e in todo if e.key not in run.done]
        if not todo:
            break
        progress.moved(-sum(e.size for e in todo))
        # objects the site refused (their bytes did not match): fetched again, as often as a pull would
        for e in todo:
            if wrong.get(e.key, 0) > retries:
                raise checksum_mismatch(store, manifest, e, wrong[e.key])
        # objects sent whose confirmation was lost with a dropped connection: fetched once more
        lost = [e for e in todo if e.key not in run.refused]
        if lost:
            lost_runs += 1
            if lost_runs > 1:
                raise TransferError(f"dataset {dataset!r}: {len(lost)} objects (first {lost[0].key}) were sent to "
                                    f"{tree} but never confirmed in place; run the stage again")
    tree.finish(manifest)
    progress.finish()
    return Result(n, copied, nbytes, time.monotonic() - t0, already=len(done))

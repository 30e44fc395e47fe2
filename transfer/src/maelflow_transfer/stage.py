"""Stage a published dataset from the object store into a folder, object by object.

Each object is streamed from the store into its destination while it is hashed (one pass over the
bytes, no re-reading), checked against the manifest (BLAKE3 where the manifest has it, 5× SHA-256's
speed per core; SHA-256 for a manifest published without it), and only then renamed into place. A wrong
object is fetched again (a few times, with back-off), then the stage fails naming it; network
failures are retried with back-off. Large objects are read as parallel byte ranges where the
destination can write at offsets and the server answers ranges: each range is written at its offset
as it arrives and hashed in order, a bounded number of ranges held in memory at a time. The
destination (``trees``) decides where the bytes go.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from maelflow_transfer.errors import ChecksumMismatch, DiskFull, StoreError, TransferError, TransientError, disk_error
from maelflow_transfer.manifest import Entry, Manifest
from maelflow_transfer.memory import keep_buffers_in_heap
from maelflow_transfer.progress import Progress
from maelflow_transfer.store import RangesUnsupported, Store

DAMAGED_STORE = "the copy in the store is corrupt; publish the dataset again from its source"
RANGE_THRESHOLD = 64 << 20     # objects above this may be read as parallel ranges (local trees) ...
# ... when fewer than this many objects (or ``workers``, if fewer) are left to read or in flight:
# ranges fill the connections that objects cannot. With enough objects, whole-object streams are
# cheaper: 12 x 64 MiB from a server that answers ranges (localbucket), 16 workers, this 2-core
# machine: whole streams 671-798 MiB/s at 0.60 client CPU-s, 8 MiB ranges 322-529 MiB/s at 1.5-2.4
# (each range is a separately assembled buffer, written at its offset through the page cache).
MIN_STREAMS = 8
RANGE_SIZE = 8 << 20
RANGE_WINDOW = 8               # ranges of one object in flight
RANGE_BUFFERS = 32             # ranges held in memory by the whole stage (RANGE_SIZE each)


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
                 workers: int, limit: RateLimit):
        self.store, self.tree, self.manifest, self.progress = store, tree, manifest, progress
        self.retries = retries
        self.limit = limit
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.copied = self.bytes = 0
        self.done: set[str] = set()
        self.error: BaseException | None = None
        self.ranged = bool(getattr(tree, "ranged", False)) and hasattr(store, "read_range")
        self.range_pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="range") if self.ranged else None
        self.range_slots = threading.BoundedSemaphore(RANGE_BUFFERS)
        self.min_streams = min(workers, MIN_STREAMS)
        self.untaken = self.in_flight = 0       # objects not yet taken by a worker, and being read

    def use_ranges(self, e: Entry) -> bool:
        """Read ``e`` as parallel ranges: a large object, a tree that can take them, a server that
        answers them (as far as known), and too few objects left to keep ``min_streams`` busy."""
        if not self.ranged or e.size <= RANGE_THRESHOLD or getattr(self.store, "ranges", True) is False:
            return False
        with self.lock:
            return self.untaken + self.in_flight < self.min_streams

    def count(self, moved: list[int], n: int) -> None:
        with self.lock:
            moved[0] += n
        self.progress.moved(n)
        self.limit.take(n)

    # -- one object ----------------------------------------------------------------------------
    def fetch(self, e: Entry) -> None:
        wrong = transient = 0
        while not self.stop.is_set():
            moved = [0]
            try:
                ok = self._fetch_ranged(e, moved) if self.use_ranges(e) else self._fetch_stream(e, moved)
            except RangesUnsupported:
                self.store.ranges = False        # this server answers no ranges: whole objects from now on
                self.progress.moved(-moved[0])
                continue
            except (TransientError, ConnectionError) as exc:
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
        algo, h = e.hasher()

        if getattr(self.store, "hashes_as_it_reads", False):
            def sink(view: memoryview) -> None:      # hashed by the store as each piece arrived
                part.write(view)
                self.count(moved, len(view))
            kwargs = {"update": h.update}
        else:
            def sink(view: memoryview) -> None:
                h.update(view)
                part.write(view)
                self.count(moved, len(view))
            kwargs = {}
        try:
            n = self.store.get(e.key, sink, stop=self.stop, **kwargs)
        except BaseException:
            part.abort()
            raise
        if n != e.size or not e.matches(algo, h.hexdigest()):
            part.abort()
            return False
        part.commit(lambda: self.placed(e))
        return True

    def _fetch_ranged(self, e: Entry, moved: list[int]) -> bool:
        """Ranges read in parallel (``range_pool``), each written at its offset as it arrives and
        hashed here in order: at most RANGE_WINDOW ranges of this object, and RANGE_BUFFERS ranges
        of the whole stage, are held in memory."""
        part = self.tree.writer(e, ranged=True)
        algo, h = e.hasher()
        bounds = [(s, min(s + RANGE_SIZE, e.size)) for s in range(0, e.size, RANGE_SIZE)]

        def one_range(start: int, end: int):
            for attempt in range(self.store.backoff.attempts):
                if self.stop.is_set():
                    raise TransientError(f"{e.key}: stopped")
                try:
                    data = self.store.read_range(e.key, start, end, stop=self.stop)
                    if len(data) != end - start:
                        raise TransientError(f"{e.key}: range {start}-{end} came back with {len(data)} bytes")
                except TransientError:
                    if attempt + 1 == self.store.backoff.attempts or self.stop.is_set():
                        raise
                    self.store.backoff.sleep(attempt, self.stop)
                    continue
                part.pwrite(memoryview(data), start)
                self.count(moved, end - start)
                return data
            raise AssertionError("unreachable")

        pending: deque = deque()
        nxt = 0
        try:
            while nxt < len(bounds) or pending:
                # another range when this object's window and the stage's memory allow; wait for a
                # slot only when nothing of this object is in flight (its next hash needs one)
                while nxt < len(bounds) and len(pending) < RANGE_WINDOW and \
                        self.range_slots.acquire(blocking=not pending):
                    pending.append(self.range_pool.submit(one_range, *bounds[nxt]))
                    nxt += 1
                fut = pending.popleft()
                try:
                    h.update(fut.result())
                finally:
                    self.range_slots.release()
        except BaseException:
            for fut in pending:
                fut.cancel()
            for fut in pending:
                if not fut.cancelled():
                    try:
                        fut.result()
                    except BaseException:  # noqa: BLE001 - the first error is the one raised
                        pass
                self.range_slots.release()
            part.abort()
            raise
        if not e.matches(algo, h.hexdigest()):
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
        self.untaken = len(todo)

        def worker() -> None:
            while not self.stop.is_set():
                with take:
                    e = next(items, None)
                    if e is not None:
                        with self.lock:
                            self.untaken -= 1
                            self.in_flight += 1
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
                finally:
                    with self.lock:
                        self.in_flight -= 1

        threads = [threading.Thread(target=worker, name=f"stage-{i}", daemon=True)
                   for i in range(max(1, min(workers, len(todo))))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if self.range_pool:
            self.range_pool.shutdown(wait=True)
        try:
            self.tree.close()
        except BaseException as exc:  # noqa: BLE001
            self.error = self.error or exc
        if self.error is not None:
            raise self.error


def already_complete(manifest: Manifest, progress: Progress, t0: float) -> Result:
    """The destination holds this manifest's copy: nothing to do, all of it counted as there."""
    n = len(manifest.entries)
    progress.start(manifest.total_bytes, n)
    progress.skipped(manifest.total_bytes, n)
    progress.finish()
    return Result(n, 0, 0, time.monotonic() - t0, already=n)


def stage(store: Store, tree, dataset: str, *, workers: int = 32, progress: Progress | None = None,
          retries: int = 3, max_rate: float | None = None) -> Result:
    """Copy the published ``dataset`` at ``store`` into ``tree``; returns what was done.

    Nothing to do when the destination already holds this manifest's copy. Raises TransferError
    (and subclasses: NotPublished, CredentialsError, DiskFull, ChecksumMismatch, StoreError,
    DestinationConflict); the destination stays invisible after any failure.
    """
    t0 = time.monotonic()
    keep_buffers_in_heap()
    progress = progress or Progress()
    manifest = store.require_manifest(dataset)
    n = len(manifest.entries)
    if tree.state(manifest) == "complete":
        return already_complete(manifest, progress, t0)
    try:
        done = tree.prepare(manifest, workers=min(workers, 8))
        todo = [e for e in manifest.entries if e.key not in done]
        need = sum(e.size for e in todo)
        free = tree.free_bytes()
        if free is not None and need > free:
            raise DiskFull(f"dataset {dataset!r}: {need / 2**30:.2f} GiB still to copy but only "
                           f"{free / 2**30:.2f} GiB free at {tree}; free some space (or stage to another "
                           "--dest) and run again")
        progress.start(manifest.total_bytes, n)
        progress.skipped(sum(e.size for e in manifest.entries if e.key in done), len(done))
        tree.makedirs([e.key for e in todo])
        run = _Run(store, tree, manifest, progress, retries, workers, RateLimit(max_rate))
        try:
            run.run(todo, workers)
        except TransferError:
            raise
        except OSError as exc:
            err = disk_error(exc, f"dataset {dataset!r}: writing to {tree}")
            raise err if isinstance(err, TransferError) else \
                TransferError(f"dataset {dataset!r}: writing to {tree} failed: {exc}") from None
        missing = [e for e in todo if e.key not in run.done]
        if missing:
            raise TransferError(f"dataset {dataset!r}: {len(missing)} objects (first {missing[0].key}) were "
                                f"never placed in {tree}; run the stage again: it continues where it stopped")
        tree.finish(manifest)
    finally:
        tree.release()        # the destination's lock: held from prepare to the rename, or the failure
    copied, nbytes = run.copied, run.bytes
    progress.finish()
    return Result(n, copied, nbytes, time.monotonic() - t0, already=len(done))

"""Push a published dataset to a site whose login nodes cannot reach the object store.

Nothing of ours runs on the site: the bytes go by rsync over the site's OpenSSH connection (several
streams riding its one master, whole files), and each object is checked where it landed by the
site's own SHA-256 tool against the manifest, one batch per rsync run (``trees.SiteTree``). The
rules of a stage hold: the ``.<name>.partial/`` folder, the journal (the hash batches' output), the
manifest written and the folder renamed only once every object matched, a killed push resumed, an
object that still does not match after ``retries`` re-sends refused (``ChecksumMismatch``).

Where the bytes come from: a local copy of the dataset (``LocalSource``, e.g. where it was built):
sent straight from that folder, the site's hashes checking it against the published manifest; or
the object store: pulled into a bounded local spool a batch at a time by the ordinary pull (``stage``
into a ``LocalTree``, verified as it is written), the next batch's pull overlapping this one's push,
so a dataset of terabytes needs two batches of room here, not its size.
"""

from __future__ import annotations

import queue
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from maelflow_transfer.errors import DiskFull, StoreError, TransferError
from maelflow_transfer.local_source import LocalSource
from maelflow_transfer.manifest import Entry, Manifest
from maelflow_transfer.progress import Progress
from maelflow_transfer.stage import Result, already_complete, checksum_mismatch, stage
from maelflow_transfer.trees import LocalTree, SiteTree

SPOOL_BATCH = 1 << 30      # bytes of the store's objects pulled into the spool at a time (two at most)
CHUNK_MAX = 256 << 20      # one rsync run sends at most this much, then its hash batch starts on the site
CHUNK_MIN = 4 << 20
SEND_ATTEMPTS = 3          # an rsync run whose connection dropped is tried again this often


@dataclass
class _Chunk:
    root: Path                      # the local folder the keys are under
    entries: list[Entry]
    done: threading.Event | None = None     # set once every chunk of its spool batch is sent
    left: list[int] = field(default_factory=lambda: [0])


class _Subset:
    """The store with its manifest cut down to one spool batch: what ``stage`` pulls."""

    def __init__(self, store, manifest: Manifest, entries: list[Entry]):
        self._store, self._manifest = store, Manifest(manifest.dataset, tuple(entries))

    def require_manifest(self, dataset: str) -> Manifest:
        return self._manifest

    def __getattr__(self, name: str):
        return getattr(self._store, name)


def _chunks(entries: list[Entry], size: int) -> list[list[Entry]]:
    out: list[list[Entry]] = [[]]
    total = 0
    for e in entries:
        if out[-1] and total + e.size > size:
            out.append([])
            total = 0
        out[-1].append(e)
        total += e.size
    return [c for c in out if c]


class _Push:
    """One pass over ``todo``: senders (rsync runs) and checkers (hash batches), ``streams`` of each."""

    def __init__(self, source, tree: SiteTree, manifest: Manifest, progress: Progress, *, streams: int,
                 max_rate: float | None, retries: int, spool: str | None, pull_workers: int):
        self.source, self.tree, self.manifest, self.progress = source, tree, manifest, progress
        self.streams, self.retries, self.spool, self.pull_workers = streams, retries, spool, pull_workers
        self.rate = max_rate / streams if max_rate else None
        self.sends: queue.Queue = queue.Queue()
        self.checks: queue.Queue = queue.Queue()
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.procs: set = set()
        self.error: BaseException | None = None
        self.copied = self.bytes = 0
        self.wrong: list[Entry] = []
        self.sent: set[str] = set()

    def fail(self, exc: BaseException) -> None:
        with self.lock:
            self.error = self.error or exc
            procs = list(self.procs)
        self.stop.set()
        for p in procs:
            p.kill()

    def _guard(self, fn, *args) -> None:
        try:
            fn(*args)
        except BaseException as exc:  # noqa: BLE001 - the first failure stops every thread
            self.fail(exc)

    # -- where the bytes come from -------------------------------------------------------------
    def feed(self, todo: list[Entry]) -> None:
        size = max(CHUNK_MIN, min(CHUNK_MAX, sum(e.size for e in todo) // (self.streams * 3) or 1))
        if isinstance(self.source, LocalSource):
            for c in self._local(todo, size):
                self.sends.put(c)
            return
        folder = Path(tempfile.mkdtemp(prefix="maelflow-push-", dir=self.spool))
        try:
            room = threading.Semaphore(2)
            pending: list[threading.Event] = []
            for k, batch in enumerate(_chunks(todo, SPOOL_BATCH)):
                while not room.acquire(timeout=0.2):
                    if self.stop.is_set():
                        return
                root = folder / f"b{k}" / "d"
                stage(_Subset(self.source, self.manifest, batch), LocalTree(root), self.manifest.dataset,
                      workers=self.pull_workers, retries=self.retries)
                done = threading.Event()
                parts = _chunks(batch, size)
                left = [len(parts)]
                pending.append(done)
                threading.Thread(target=self._drop_batch, args=(done, root.parent, room), daemon=True).start()
                for part in parts:
                    self.sends.put(_Chunk(root, part, done, left))
            for done in pending:
                while not done.wait(0.2) and not self.stop.is_set():
                    pass
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def _drop_batch(self, done: threading.Event, folder: Path, room: threading.Semaphore) -> None:
        while not done.wait(0.2) and not self.stop.is_set():
            pass
        shutil.rmtree(folder, ignore_errors=True)
        room.release()

    def _local(self, todo: list[Entry], size: int) -> list[_Chunk]:
        """The local copy's files, sizes checked here first: a file of another size is not sent
        (it counts as wrong), a missing one is the local copy's fault."""
        root = self.source.root
        ok: list[Entry] = []
        for e in todo:
            path = root / e.key
            try:
                actual = path.stat().st_size
            except FileNotFoundError:
                raise StoreError(f"{path}: listed in the published manifest but missing from the local copy; "
                                 + self.source.damaged_hint) from None
            (ok if actual == e.size else self.wrong).append(e)
        return [_Chunk(root, part) for part in _chunks(ok, size)]

    # -- senders and checkers ------------------------------------------------------------------
    def send(self) -> None:
        while not self.stop.is_set():
            chunk = self.sends.get()
            if chunk is None:
                return
            sizes = {e.key: e.size for e in chunk.entries}
            for attempt in range(SEND_ATTEMPTS):
                moved = [0]

                def sent(key: str) -> None:
                    moved[0] += sizes[key]
                    self.progress.moved(sizes[key])
                    self.sent.add(key)

                def started(proc) -> None:
                    with self.lock:
                        self.procs.add(proc)
                try:
                    self.tree.send(chunk.root, list(sizes), rate=self.rate, on_sent=sent, started=started)
                    break
                except ConnectionError:
                    self.progress.moved(-moved[0])
                    if attempt + 1 == SEND_ATTEMPTS or self.stop.is_set():
                        raise
                    time.sleep(0.5 * 2 ** attempt)
            with self.lock:
                self.procs = {p for p in self.procs if p.poll() is None}
            self.checks.put(chunk)
            if chunk.done is not None:
                with self.lock:
                    chunk.left[0] -= 1
                    if not chunk.left[0]:
                        chunk.done.set()

    def check(self, stream: int) -> None:
        while not self.stop.is_set():
            chunk = self.checks.get()
            if chunk is None:
                return
            sums = self.tree.hashes([e.key for e in chunk.entries], journal=stream)
            for e in chunk.entries:
                if sums.get(e.key) == e.sha256:
                    with self.lock:
                        self.copied += 1
                        self.bytes += e.size
                    self.progress.object_done()
                else:
                    with self.lock:
                        self.wrong.append(e)

    def run(self, todo: list[Entry]) -> list[Entry]:
        """Send and check ``todo``; returns the objects the site found wrong (left in place)."""
        senders = [threading.Thread(target=self._guard, args=(self.send,), daemon=True, name=f"push-{i}")
                   for i in range(self.streams)]
        checkers = [threading.Thread(target=self._guard, args=(self.check, i), daemon=True, name=f"check-{i}")
                    for i in range(self.streams)]
        for t in senders + checkers:
            t.start()
        self._guard(self.feed, todo)
        for _ in senders:
            self.sends.put(None)
        for t in senders:
            t.join()
        for _ in checkers:
            self.checks.put(None)
        for t in checkers:
            t.join()
        if self.error is not None:
            raise self.error
        return self.wrong


def push(source, tree: SiteTree, dataset: str, *, streams: int = 4, progress: Progress | None = None,
         retries: int = 3, max_rate: float | None = None, spool: str | None = None,
         pull_workers: int = 16) -> Result:
    """Copy the published ``dataset`` from ``source`` (a store, or a ``LocalSource``) to ``tree``.

    ``streams``: rsync runs at once (and hash batches on the site); ``spool``: where the store's
    objects wait for their push (a temporary folder by default); ``retries``: re-sends of an object
    the site found wrong (0 for a local copy: it would send the same bytes again). Raises what
    ``stage`` raises; the site's folder stays invisible after any failure.
    """
    t0 = time.monotonic()
    progress = progress or Progress()
    manifest = source.require_manifest(dataset)
    n = len(manifest.entries)
    if tree.state(manifest) == "complete":
        return already_complete(manifest, progress, t0)
    done = tree.prepare(manifest)
    todo = [e for e in manifest.entries if e.key not in done]
    need = sum(e.size for e in todo)
    free = tree.free_bytes()
    if free is not None and need > free:
        raise DiskFull(f"dataset {dataset!r}: {need / 2**30:.2f} GiB still to copy but only {free / 2**30:.2f} GiB "
                       f"free at {tree}; free some space (or push to another --dest) and run again")
    progress.start(manifest.total_bytes, n)
    progress.skipped(sum(e.size for e in manifest.entries if e.key in done), len(done))
    copied = nbytes = 0
    wrong: dict[str, int] = {}
    while todo:
        run = _Push(source, tree, manifest, progress, streams=max(1, streams), max_rate=max_rate,
                    retries=retries, spool=spool, pull_workers=pull_workers)
        try:
            bad = run.run(todo)
        except TransferError:
            raise
        except OSError as exc:
            raise TransferError(f"dataset {dataset!r}: pushing to {tree} failed: {exc}") from None
        copied, nbytes = copied + run.copied, nbytes + run.bytes
        tree.remove([e.key for e in bad])
        progress.moved(-sum(e.size for e in bad if e.key in run.sent))
        for e in bad:
            wrong[e.key] = wrong.get(e.key, 0) + 1
            if wrong[e.key] > retries:
                raise checksum_mismatch(source, manifest, e, wrong[e.key])
        todo = bad
    tree.finish(manifest)
    progress.finish()
    return Result(n, copied, nbytes, time.monotonic() - t0, already=len(done))

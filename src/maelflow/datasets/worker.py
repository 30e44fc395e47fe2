"""``maelflow transfer worker --site SITE``: carry out the transfer tasks queued in the catalogue.

The catalogue's web page ("start transfer") and ``anemoi-registry tasks --new`` queue a
``transfer-dataset`` task; the worker takes the oldest one for its site, stages the dataset there
(the way the site allows), reports the task's progress, registers the new location and marks the
task completed, or failed with the reason.

A task is written by whoever holds a catalogue write token: its ``dataset`` becomes a folder name on
the site, so it is checked as one safe path segment before anything is staged (the catalogue refuses
such a task when it is queued, too). Nothing one task does stops the worker: any error is the task's
failure, with the reason, and the worker takes the next.

While it runs a task the worker renews the task's lease (its progress patches do, and a heartbeat
every third of the lease when no progress came), so another worker takes the task over only after
this one died or stalled for a whole lease; a worker that finds its task taken over stops working
on it and leaves the outcome to the new owner.
"""

from __future__ import annotations

import threading
import time
from typing import Callable

from maelflow.datasets import catalogue_hook as hook
from maelflow_transfer.errors import TransferError
from maelflow_transfer.paths import check_key, check_segment
from maelflow_transfer.progress import Snapshot


def _prefix_from_catalogue(ws, dataset: str, source: str, bucket_hint: str | None, catalogue) -> str | None:
    """The dataset's key prefix as the catalogue records it (``s3://bucket/prefix``), if it does."""
    path = hook.location_of(ws, dataset, source, catalogue=catalogue)
    if not path or not path.startswith("s3://"):
        return None
    bucket, _, prefix = path[5:].partition("/")
    if bucket_hint and bucket != bucket_hint:
        raise TransferError(f"dataset {dataset} is recorded in bucket {bucket!r}, but this EWC store is "
                            f"{bucket_hint!r}")
    prefix = prefix.strip("/")
    return check_key(prefix, f"prefix of dataset {dataset!r} in the catalogue") if prefix else None


def _finish(ws, task: hook.TransferTask, ok: bool, msg: str, catalogue, log: Callable[[str], None]) -> None:
    """Close the task; a catalogue that cannot be told is logged, never fatal to the worker."""
    try:
        hook.task_finished(ws, task, ok, msg, catalogue=catalogue)
    except Exception as exc:  # noqa: BLE001 - CatalogueUnavailable, or anything below it
        log(f"task {task.uuid}: could not be marked {'completed' if ok else 'failed'}: {exc}")


class Heartbeat:
    """Renews a task's lease every ``every`` seconds unless progress did meanwhile; notes a takeover."""

    def __init__(self, ws, task: hook.TransferTask, catalogue, log: Callable[[str], None]):
        self.ws, self.task, self.catalogue, self.log = ws, task, catalogue, log
        self.every = max(task.lease_seconds / 3, 0.05)
        self.renewed = time.monotonic()
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-{task.uuid}", daemon=True)

    def __enter__(self) -> "Heartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(max(self.every - (time.monotonic() - self.renewed), 0.01)):
            if time.monotonic() - self.renewed < self.every:
                continue
            try:
                hook.task_heartbeat(self.ws, self.task, catalogue=self.catalogue)
                self.renewed = time.monotonic()
            except hook.TaskTakenOver as exc:
                self.lost.set()
                self.log(str(exc))
                return
            except Exception as exc:  # noqa: BLE001 - the catalogue away for a moment: try again
                self.log(f"task {self.task.uuid}: heartbeat not recorded: {exc}")
                self.renewed = time.monotonic()


def run_task(ws, task: hook.TransferTask, site_name: str, site, catalogue,
             log: Callable[[str], None] = print, workers: int | None = None) -> bool:
    from maelflow.datasets.settings import ewc_settings
    from maelflow.datasets.stage import stage_dataset

    try:
        check_segment(task.dataset, "dataset name")
    except TransferError as exc:
        msg = f"task {task.uuid}: {exc}"
        _finish(ws, task, False, str(exc), catalogue, log)
        log(msg)
        return False
    if task.source not in (hook.EWC_PLATFORM, "cli", ""):
        msg = f"source {task.source!r} is not the EWC object store: this worker stages from 'ewc' only"
        _finish(ws, task, False, msg, catalogue, log)
        log(f"task {task.uuid}: {msg}")
        return False
    last = [0.0]
    beat = Heartbeat(ws, task, catalogue, log)

    def sink(s: Snapshot) -> None:
        if beat.lost.is_set():
            raise hook.TaskTakenOver(f"task {task.uuid} was taken over by another worker")
        if s.final or time.monotonic() - last[0] >= 2.0:
            last[0] = time.monotonic()
            try:
                hook.task_progress(ws, task, s.percent, s.text(), catalogue=catalogue)
                beat.renewed = time.monotonic()
            except hook.TaskTakenOver:
                beat.lost.set()
                raise
            except hook.CatalogueUnavailable as exc:
                log(f"task {task.uuid}: progress not recorded: {exc}")
    try:
        with beat:
            bucket = ewc_settings(ws).get("bucket")
            prefix = _prefix_from_catalogue(ws, task.dataset, hook.EWC_PLATFORM, bucket, catalogue)
            res, dest, via = stage_dataset(ws, task.dataset, site_name=site_name, site=site, prefix=prefix,
                                           sinks=[sink], workers=workers)
            if beat.lost.is_set():
                raise hook.TaskTakenOver(f"task {task.uuid} was taken over by another worker")
            hook.register_location(ws, task.dataset, site_name, dest, catalogue=catalogue)
    except Exception as exc:  # noqa: BLE001 - however the stage reported it (wrapped or not)
        if beat.lost.is_set() or isinstance(exc, hook.TaskTakenOver):
            log(f"task {task.uuid}: taken over by another worker (this one's lease had expired); left to it")
            return False
        return _failed(ws, task, site_name, exc, catalogue, log)
    msg = f"{task.dataset} staged at {site_name}:{dest} ({via}): {res.summary()}"
    _finish(ws, task, True, msg, catalogue, log)
    log(f"task {task.uuid}: {msg}")
    return True


def _failed(ws, task: hook.TransferTask, site_name: str, exc: Exception, catalogue, log: Callable[[str], None]
            ) -> bool:
    """Mark the task failed with the reason (a TransferError's message, or a fault's type and text)."""
    if isinstance(exc, TransferError):
        _finish(ws, task, False, str(exc), catalogue, log)
        log(f"task {task.uuid}: {task.dataset} -> {site_name} failed: {exc}")
        return False
    import traceback

    # a bug fails this task, not the worker
    reason = f"{type(exc).__name__}: {exc} (a fault in maelflow's worker; its log has the traceback)"
    trace = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)).rstrip()
    log(f"task {task.uuid}: {task.dataset} -> {site_name} failed:\n{trace}")
    _finish(ws, task, False, reason, catalogue, log)
    return False


def run_worker(ws, site_name: str, site, *, once: bool = False, poll: float = 5.0, max_tasks: int | None = None,
               log: Callable[[str], None] = print, workers: int | None = None,
               lease_seconds: float = hook.LEASE_SECONDS) -> int:
    """Take and run tasks until none is left (``once``) or forever; returns the number run.

    A catalogue that cannot be reached while looking for a task ends a ``once`` run (its error
    raised); a worker running forever logs it and tries again after ``poll`` seconds."""
    catalogue = hook.client(ws)
    done = 0
    while max_tasks is None or done < max_tasks:
        try:
            task = hook.next_transfer_task(ws, site_name, catalogue=catalogue, lease_seconds=lease_seconds)
        except hook.CatalogueUnavailable as exc:
            if once:
                raise
            log(f"worker: {exc}; trying again in {poll:g}s")
            time.sleep(poll)
            continue
        if task is None:
            if once:
                break
            time.sleep(poll)
            continue
        log(f"task {task.uuid}: staging {task.dataset!r} to {site_name}")
        try:
            run_task(ws, task, site_name, site, catalogue, log=log, workers=workers)
        except Exception as exc:  # noqa: BLE001 - run_task fails the task itself; this is a last resort
            log(f"task {task.uuid}: {type(exc).__name__}: {exc}")
        done += 1
    return done

"""``maelflow transfer worker --site SITE``: carry out the transfer tasks queued in the catalogue.

The catalogue's web page ("start transfer") and ``anemoi-registry tasks --new`` queue a
``transfer-dataset`` task; the worker takes the oldest one for its site, stages the dataset there
(the way the site allows), reports the task's progress, registers the new location and marks the
task completed, or failed with the reason.
"""

from __future__ import annotations

import time
from typing import Callable

from maelflow.datasets import catalogue_hook as hook
from maelflow_transfer.errors import TransferError
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
    return prefix.strip("/") or None


def run_task(ws, task: hook.TransferTask, site_name: str, site, catalogue,
             log: Callable[[str], None] = print, workers: int | None = None) -> bool:
    from maelflow.datasets.settings import ewc_settings
    from maelflow.datasets.stage import stage_dataset

    if task.source not in (hook.EWC_PLATFORM, "cli", ""):
        msg = f"source {task.source!r} is not the EWC object store: this worker stages from 'ewc' only"
        hook.task_finished(ws, task, False, msg, catalogue=catalogue)
        log(f"task {task.uuid}: {msg}")
        return False
    last = [0.0]

    def sink(s: Snapshot) -> None:
        if s.final or time.monotonic() - last[0] >= 2.0:
            last[0] = time.monotonic()
            try:
                hook.task_progress(ws, task, s.percent, s.text(), catalogue=catalogue)
            except hook.CatalogueUnavailable as exc:
                log(f"task {task.uuid}: progress not recorded: {exc}")
    try:
        bucket = ewc_settings(ws).get("bucket")
        prefix = _prefix_from_catalogue(ws, task.dataset, hook.EWC_PLATFORM, bucket, catalogue)
        res, dest, via = stage_dataset(ws, task.dataset, site_name=site_name, site=site, prefix=prefix,
                                       sinks=[sink], workers=workers)
        hook.register_location(ws, task.dataset, site_name, dest, catalogue=catalogue)
    except TransferError as exc:
        hook.task_finished(ws, task, False, str(exc), catalogue=catalogue)
        log(f"task {task.uuid}: {task.dataset} -> {site_name} failed: {exc}")
        return False
    msg = f"{task.dataset} staged at {site_name}:{dest} ({via}): {res.summary()}"
    hook.task_finished(ws, task, True, msg, catalogue=catalogue)
    log(f"task {task.uuid}: {msg}")
    return True


def run_worker(ws, site_name: str, site, *, once: bool = False, poll: float = 5.0, max_tasks: int | None = None,
               log: Callable[[str], None] = print, workers: int | None = None) -> int:
    """Take and run tasks until none is left (``once``) or forever; returns the number run."""
    catalogue = hook.client(ws)
    done = 0
    while max_tasks is None or done < max_tasks:
        task = hook.next_transfer_task(ws, site_name, catalogue=catalogue)
        if task is None:
            if once:
                break
            time.sleep(poll)
            continue
        log(f"task {task.uuid}: staging {task.dataset} to {site_name}")
        run_task(ws, task, site_name, site, catalogue, log=log, workers=workers)
        done += 1
    return done

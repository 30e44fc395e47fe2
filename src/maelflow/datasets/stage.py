"""Where a stage runs, decided once for the CLI, the suite's tasks and the worker alike.

* ``here``: this machine writes the destination (a local site, or you are on the site's login node);
* ``login``: the pull runs on the site's login node, started over the site's SSH session
  (``maelflow transfer stage --via here`` there), its progress streamed back as JSON lines;
* ``push`` (also accepted as ``sftp``): the site cannot reach the object store: this side pulls
  into a bounded spool (or reads a local copy) and pushes by rsync over the site's OpenSSH
  connection, the site hashing what landed (``maelflow_transfer.push``).

``auto`` picks ``here`` for a local site, ``login`` where the login nodes reach the internet
(``internet.login``), ``push`` elsewhere. The transfer library never imports maelflow: the site's
connection is handed to it here, as the object it runs commands and rsync through.
"""

from __future__ import annotations

import json
import shlex
from pathlib import PurePosixPath
from typing import Callable, TypeVar

from maelflow.datasets.settings import dataset_prefix, default_dest, ewc_settings, open_store
from maelflow_transfer import errors as errors_mod
from maelflow_transfer.errors import TransferError
from maelflow_transfer.manifest import Manifest
from maelflow_transfer.paths import check_segment
from maelflow_transfer.progress import Progress, Snapshot
from maelflow_transfer.stage import Result, stage

T = TypeVar("T")

VIAS = ("auto", "here", "login", "push", "sftp")      # sftp: the push's former name
PULL_WORKERS = 16
PUSH_STREAMS = 4       # rsync streams of a push, and hash batches on the site: 8 sessions, sshd allows 10


def choose_via(site, via: str = "auto") -> str:
    if via not in VIAS:
        raise TransferError(f"--via must be one of {', '.join(VIAS)}, not {via!r}")
    via = "push" if via == "sftp" else via
    if via != "auto":
        if via in ("login", "push") and (site is None or site.connection.type != "ssh"):
            raise TransferError(f"--via {via} needs a site reached over SSH")
        return via
    if site is None or site.connection.type == "local":
        return "here"
    return "login" if site.internet.login else "push"


def _connection(site_name: str, site):
    from maelflow.sites.connections import connect

    return connect(site_name, site)


def _site_errors(fn: Callable[[], T]) -> T:
    """A site's failure as a TransferError for the stage's callers; its message keeps the hint
    (how to renew a credential) and the original stays its cause."""
    from maelflow.errors import SiteError

    try:
        return fn()
    except SiteError as exc:
        raise TransferError(str(exc)) from exc


def stage_dataset(ws, dataset: str, *, site_name: str | None = None, site=None, dest: str | None = None,
                  prefix: str | None = None, via: str = "auto", credentials: str | None = None,
                  sinks: list[Callable[[Snapshot], None]] | None = None, workers: int | None = None,
                  max_rate: float | None = None, source: str | None = None) -> tuple[Result, str, str]:
    """Stage ``dataset`` for ``site``; returns (result, destination, how).

    ``workers``: objects at once for a pull (default 16: latency hiding, S3 GETs are short; more only
    add GIL hand-offs here), rsync streams for a push (default 4, all riding the site's one SSH
    master). ``source``: read the objects from this local copy (checked against the published
    manifest) instead of the store: a push (or a local copy) from where the dataset was built."""
    check_segment(dataset, "dataset name")       # it becomes a folder name at the destination
    prefix = prefix or dataset_prefix(dataset, ws)
    if source is not None:
        if via not in ("auto", "here", "push", "sftp"):
            raise TransferError(f"--from reads a folder on this machine: it cannot run --via {via}")
        if via == "auto":
            via = "push" if site is not None and site.connection.type == "ssh" else "here"
    via = choose_via(site, via)
    if dest is None:
        if site is None:
            raise TransferError("give --site or --dest: where should the dataset go?")
        dest = default_dest(site, dataset)
    progress = Progress(sinks or [])
    workers = workers or (PUSH_STREAMS if via == "push" else PULL_WORKERS)
    if via == "here":
        from maelflow_transfer.trees import LocalTree

        store = _source(open_store(ewc_settings(ws, site=site, credentials=credentials), prefix), source)
        return stage(store, LocalTree(dest), dataset, workers=workers, progress=progress, max_rate=max_rate,
                     retries=0 if source else 3), dest, via
    conn = _connection(site_name, site)
    if via == "push":
        from maelflow_transfer.push import push
        from maelflow_transfer.trees import SiteTree

        store = _source(open_store(ewc_settings(ws, credentials=credentials), prefix), source)
        return _site_errors(lambda: push(store, SiteTree(conn, dest), dataset, streams=workers, progress=progress,
                                         max_rate=max_rate, retries=0 if source else 3)), dest, via
    return _site_errors(lambda: remote_stage(ws, conn, site, dataset, prefix, dest, progress, workers,
                                             max_rate)), dest, via


def _source(store, folder: str | None):
    if folder is None:
        return store
    from maelflow_transfer.local_source import LocalSource

    return LocalSource(folder, store)


def ensure_site_credentials(ws, conn, site) -> str:
    """The site's EWC credentials file; placed from the workspace's settings when missing (as
    ``maelflow deploy`` does), mode 0600, with the read-only keys: a site only reads the store."""
    from maelflow import ewc

    path = ewc.site_credentials_path(site.paths.root)
    if not conn.exists(path):
        settings = ewc_settings(ws, role=ewc.SITE_ROLE)
        conn.makedirs(str(PurePosixPath(path).parent))
        conn.put_text(path, json.dumps(settings), mode=0o600)
    return path


def remote_command(site, args: list[str]) -> str:
    lines = list(site.environment or [])
    from maelflow.sites.container import site_command

    lines.append(f"{site_command(site)} " + " ".join(shlex.quote(a) for a in args))
    return "\n".join(lines)


def remote_stage(ws, conn, site, dataset: str, prefix: str, dest: str, progress: Progress, workers: int,
                 max_rate: float | None) -> Result:
    """Run the pull on the login node; its JSON progress lines feed ``progress``'s sinks."""
    creds = ensure_site_credentials(ws, conn, site)
    args = ["transfer", "stage", dataset, "--via", "here", "--dest", dest, "--prefix", prefix,
            "--credentials", creds, "--json", "--workers", str(workers)]
    if max_rate:
        args += ["--max-rate", str(max_rate)]
    outcome: dict = {}

    def on_line(line: str) -> None:
        if line.startswith('{"progress"'):
            snap = Snapshot.from_json(line)
            if snap is not None:
                for sink in progress.sinks:
                    sink(snap)
            return
        try:
            data = json.loads(line)
        except ValueError:
            return
        if isinstance(data, dict):
            outcome.update(data)

    res = conn.run_lines(remote_command(site, args), on_line, check=False)
    if "result" in outcome:
        return Result(**outcome["result"])
    if "error" in outcome:
        cls = getattr(errors_mod, str(outcome.get("kind", "")), None)
        if not (isinstance(cls, type) and issubclass(cls, TransferError)):
            cls = TransferError
        msg = f"on {site.name}'s login node: {outcome['error']}"
        raise cls(msg, outcome.get("key", "")) if cls is errors_mod.ChecksumMismatch else cls(msg)
    tail = (res.stderr.strip().splitlines() or ["no output"])[-1]
    raise TransferError(f"the stage on {site.name}'s login node failed (exit {res.rc}): {tail}")


def verify_dataset(ws, dataset: str, *, site_name: str | None = None, site=None, dest: str | None = None,
                   prefix: str | None = None, credentials: str | None = None, via: str = "auto",
                   workers: int = 4) -> tuple[Manifest, list[str], list[str], str]:
    """(published manifest, objects missing or wrong, extra files, destination) of a staged copy."""
    from maelflow_transfer.trees import LocalTree, SiteTree

    prefix = prefix or dataset_prefix(dataset, ws)
    if dest is None:
        if site is None:
            raise TransferError("give --site or --dest: which copy should be verified?")
        dest = default_dest(site, dataset)
    store = open_store(ewc_settings(ws, site=site, credentials=credentials), prefix)
    manifest = store.require_manifest(dataset)
    if via != "here" and site is not None and site.connection.type == "ssh":
        tree = SiteTree(_connection(site_name, site), dest)
        bad, extra = _site_errors(lambda: tree.verify(manifest, workers))
    else:
        bad, extra = LocalTree(dest).verify(manifest, workers)
    return manifest, bad, extra, dest

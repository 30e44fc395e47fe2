"""Where a stage runs, decided once for the CLI, the suite's tasks and the worker alike.

* ``here``: this machine writes the destination (a local site, or you are on the site's login node);
* ``login``: the pull runs on the site's login node, started over the site's SSH session
  (``maelflow transfer stage --via here`` there), its progress streamed back as JSON lines;
* ``sftp``: the site cannot reach the object store: this side pulls and pushes over SFTP.

``auto`` picks ``here`` for a local site, ``login`` where the login nodes reach the internet
(``internet.login``), ``sftp`` elsewhere.
"""

from __future__ import annotations

import json
import os
import shlex
from pathlib import PurePosixPath
from typing import Callable

from maelflow_transfer import errors as errors_mod
from maelflow.datasets.settings import dataset_prefix, default_dest, ewc_settings, open_store
from maelflow_transfer.errors import TransferError
from maelflow_transfer.manifest import Manifest
from maelflow_transfer.progress import Progress, Snapshot
from maelflow_transfer.stage import Result, stage

VIAS = ("auto", "here", "login", "sftp")
PULL_WORKERS = 16
PUSH_WORKERS = min(4, os.cpu_count() or 1)   # one wire (an ssh process, a thread) per core


def choose_via(site, via: str = "auto") -> str:
    if via not in VIAS:
        raise TransferError(f"--via must be one of {', '.join(VIAS)}, not {via!r}")
    if via != "auto":
        if via in ("login", "sftp") and (site is None or site.connection.type != "ssh"):
            raise TransferError(f"--via {via} needs a site reached over SSH")
        return via
    if site is None or site.connection.type == "local":
        return "here"
    return "login" if site.internet.login else "sftp"


def _session(site_name: str, site):
    from maelflow.sites.ssh import session_for

    return session_for(site_name, site.connection.ssh)


def _ssh_errors(fn: Callable[[], Result]) -> Result:
    from maelflow.sites.ssh import SshError

    try:
        return fn()
    except (SshError, ConnectionError) as exc:
        raise TransferError(str(exc)) from None


def stage_dataset(ws, dataset: str, *, site_name: str | None = None, site=None, dest: str | None = None,
                  prefix: str | None = None, via: str = "auto", credentials: str | None = None,
                  sinks: list[Callable[[Snapshot], None]] | None = None, workers: int | None = None,
                  max_rate: float | None = None, source: str | None = None) -> tuple[Result, str, str]:
    """Stage ``dataset`` for ``site``; returns (result, destination, how).

    ``workers``: objects at once; default 16 for a pull (latency hiding: S3 GETs are short; more only add GIL hand-offs here), one per
    core up to 4 for an SFTP push (each worker holds its own SSH connection to the login node, with
    every request in flight: the push is bound by CPU, not by round trips). ``source``: read the objects from this local copy (checked against the published
    manifest) instead of the store: a push (or a local copy) from where the dataset was built."""
    prefix = prefix or dataset_prefix(dataset, ws)
    if source is not None:
        if via not in ("auto", "here", "sftp"):
            raise TransferError(f"--from reads a folder on this machine: it cannot run --via {via}")
        if via == "auto":
            via = "sftp" if site is not None and site.connection.type == "ssh" else "here"
    via = choose_via(site, via)
    if dest is None:
        if site is None:
            raise TransferError("give --site or --dest: where should the dataset go?")
        dest = default_dest(site, dataset)
    progress = Progress(sinks or [])
    workers = workers or (PUSH_WORKERS if via == "sftp" else PULL_WORKERS)
    if via == "here":
        from maelflow_transfer.trees import LocalTree

        store = _source(open_store(ewc_settings(ws, site=site, credentials=credentials), prefix, workers), source)
        return stage(store, LocalTree(dest), dataset, workers=workers, progress=progress, max_rate=max_rate,
                     retries=0 if source else 3), dest, via
    session = _session(site_name, site)
    if via == "sftp":
        from maelflow_transfer.trees import SftpTree

        store = _source(open_store(ewc_settings(ws, credentials=credentials), prefix, workers), source)

        server = wire_server(site) if site.sftp_server == "maelflow" else None

        def push() -> Result:
            session.prestart_wires(workers, server)      # their handshakes overlap the checks below
            return stage(store, SftpTree(session, dest, server), dataset, workers=workers, progress=progress,
                         max_rate=max_rate, retries=0 if source else 3)
        return _ssh_errors(push), dest, via
    return _ssh_errors(lambda: remote_stage(ws, session, site, dataset, prefix, dest, progress, workers,
                                            max_rate)), dest, via


def _source(store, folder: str | None):
    if folder is None:
        return store
    from maelflow_transfer.local_source import LocalSource

    return LocalSource(folder, store)


def ensure_site_credentials(ws, session, site) -> str:
    """The site's EWC credentials file; placed from the workspace's settings when missing (as
    ``maelflow deploy`` does), mode 0600."""
    from maelflow import ewc

    path = ewc.site_credentials_path(site.paths.root)
    if not session.exists(path):
        settings = ewc_settings(ws)
        session.makedirs(str(PurePosixPath(path).parent))
        session.put_text(path, json.dumps(settings), mode=0o600)
    return path


def remote_command(site, args: list[str]) -> str:
    lines = list(site.environment or [])
    lines.append(f"{site.maelflow_command} " + " ".join(shlex.quote(a) for a in args))
    return "\n".join(lines)


def wire_server(site) -> str:
    """The command that serves a push's SFTP wires on the site: its own maelflow's server, which
    writes with O_DIRECT (``maelflow.sites.sftp_server``); a site without it gets OpenSSH's. Run by
    the interpreter beside the site's maelflow where there is one (a tenth of a second sooner
    than the CLI), else through the CLI."""
    lines = list(site.environment or [])
    cmd = site.maelflow_command
    lines.append(f"m={cmd}" if " " not in cmd else f"m={shlex.quote(cmd)}")
    lines.append('case "$m" in */maelflow) p="${m%/maelflow}/python"; '
                 '[ -x "$p" ] && exec "$p" -m maelflow.sites.sftp_server;; esac')
    lines.append("exec $m transfer sftp-server")
    return "\n".join(lines)


def remote_stage(ws, session, site, dataset: str, prefix: str, dest: str, progress: Progress, workers: int,
                 max_rate: float | None) -> Result:
    """Run the pull on the login node; its JSON progress lines feed ``progress``'s sinks."""
    creds = ensure_site_credentials(ws, session, site)
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

    res = session.run_lines(remote_command(site, args), on_line, check=False)
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
    from maelflow_transfer.trees import LocalTree, SftpTree

    prefix = prefix or dataset_prefix(dataset, ws)
    if dest is None:
        if site is None:
            raise TransferError("give --site or --dest: which copy should be verified?")
        dest = default_dest(site, dataset)
    store = open_store(ewc_settings(ws, site=site, credentials=credentials), prefix)
    manifest = store.require_manifest(dataset)
    if via != "here" and site is not None and site.connection.type == "ssh":
        tree = SftpTree(_session(site_name, site), dest)
        try:
            bad, extra = tree.verify(manifest, workers)
        except Exception as exc:  # noqa: BLE001 - SSH errors
            from maelflow.sites.ssh import SshError

            if isinstance(exc, (SshError, ConnectionError)):
                raise TransferError(str(exc)) from None
            raise
    else:
        bad, extra = LocalTree(dest).verify(manifest, workers)
    return manifest, bad, extra, dest

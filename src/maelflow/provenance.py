"""What a suite or a training run was made from: config, code version, packages, host.

Written at deploy and at the start of every training run (as cylc writes its vc info beside each
run), so any result can be traced to the exact config and software that produced it.

Provenance is a record, never a reason to fail: every part that cannot be read (git, the package
list, the user name) is recorded as ``"unavailable: <reason>"``, and anemoi's own gatherer
(``anemoi.utils.provenance.gather_provenance_info``, called when anemoi-training builds its
checkpoint metadata and by ``anemoi-datasets create``) is wrapped the same way (``guard_anemoi``).

A shared installation on an HPC is a git checkout owned by someone else, which git refuses to read
("dubious ownership"); GitPython then fails with ``ValueError`` or, when git has already exited,
``BrokenPipeError``, which anemoi does not catch. ``trust_installation`` lets git read just the
checkouts this process's code is imported from (``safe.directory`` through ``GIT_CONFIG_*`` in the
environment, inherited by subprocesses): no new trust, since whoever owns that code already
decides what this process runs.
"""

from __future__ import annotations

import functools
import getpass
import hashlib
import json
import logging
import os
import platform
import socket
import subprocess
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, MutableMapping
from urllib.parse import unquote

from maelflow import __version__


UNAVAILABLE = "unavailable"

log = logging.getLogger(__name__)


def unavailable(exc: BaseException) -> str:
    text = " ".join(str(exc).split())[:300]
    return f"{UNAVAILABLE}: {type(exc).__name__}" + (f": {text}" if text else "")


# ------------------------------------------------------------------------------- git trust
def _git_root(path: Path) -> Path | None:
    for folder in (path, *path.parents):
        if (folder / ".git").exists():
            return folder
    return None


def installation_roots() -> list[str]:
    """The git checkouts this process's installed code comes from: maelflow's own source folder and
    every editable install (PEP 610 ``direct_url.json``), as anemoi's gatherer looks them up."""
    sources = [Path(__file__).resolve().parent]
    for dist in metadata.distributions():
        try:
            info = json.loads(dist.read_text("direct_url.json") or "{}")
            url = str(info.get("url", ""))
            if info.get("dir_info", {}).get("editable") and url.startswith("file://"):
                sources.append(Path(unquote(url[len("file://"):])))
        except Exception:  # noqa: BLE001 - a broken distribution is not ours to judge
            continue
    roots: list[str] = []
    for source in sources:
        try:
            root = _git_root(source.resolve())
        except OSError:
            continue
        if root is not None:
            for p in (str(root), os.path.realpath(root)):
                if p not in roots:
                    roots.append(p)
    return roots


def trust_git(paths: list[str], env: MutableMapping[str, str] | None = None) -> MutableMapping[str, str]:
    """Add ``safe.directory=<path>`` for each of ``paths`` to ``env`` (``os.environ`` by default) as
    ``GIT_CONFIG_COUNT``/``GIT_CONFIG_KEY_n``/``GIT_CONFIG_VALUE_n`` (git >= 2.31; older git has no
    ownership check); entries already there are kept. Returns ``env``."""
    env = os.environ if env is None else env
    try:
        n = int(env.get("GIT_CONFIG_COUNT") or 0)
    except ValueError:
        return env          # git refuses a bogus count anyway: not ours to mend
    have = {env.get(f"GIT_CONFIG_VALUE_{i}") for i in range(n)
            if env.get(f"GIT_CONFIG_KEY_{i}") == "safe.directory"}
    for path in paths:
        if path in have:
            continue
        env[f"GIT_CONFIG_KEY_{n}"] = "safe.directory"
        env[f"GIT_CONFIG_VALUE_{n}"] = path
        have.add(path)
        n += 1
    env["GIT_CONFIG_COUNT"] = str(n)
    return env


def trust_installation(env: MutableMapping[str, str] | None = None) -> list[str]:
    """Let git (ours, GitPython's, a subprocess's) read the checkouts of this installation even when
    another user owns them; the checkouts trusted. Never raises."""
    try:
        roots = installation_roots()
        trust_git(roots, env)
        return roots
    except Exception as exc:  # noqa: BLE001 - provenance must not stop a task
        log.warning("git provenance of the installation: %s", unavailable(exc))
        return []


# -------------------------------------------------------------------------------- gathering
def git_info(path: Path, trust: bool = False) -> dict[str, Any]:
    """Commit, branch and whether the checkout at ``path`` is modified; {} when it is no checkout.
    ``trust``: read it even when another user owns it (``path`` is this installation)."""
    env = trust_git([str(path), os.path.realpath(path)], dict(os.environ)) if trust else None

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(path), *args], capture_output=True, text=True,
                              errors="replace", timeout=10, env=env).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
    except (OSError, subprocess.TimeoutExpired):
        return {}
    if not commit:
        return {}
    try:
        diff = git("diff", "HEAD")
        branch = git("rev-parse", "--abbrev-ref", "HEAD")
    except (OSError, subprocess.TimeoutExpired) as exc:
        return {"commit": commit, "git": unavailable(exc)}
    return {"commit": commit, "branch": branch,
            "dirty": bool(diff), "diff_sha256": hashlib.sha256(diff.encode()).hexdigest() if diff else None}


def packages() -> dict[str, str]:
    return {d.metadata["Name"]: d.version for d in metadata.distributions() if d.metadata["Name"]}


def _safely(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - a record with a gap beats no training
        log.warning("provenance: %s", unavailable(exc))
        return unavailable(exc)


def record(config: dict[str, Any], extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The provenance of a suite or a run; never raises (a part it cannot read says why)."""
    source_root = Path(__file__).resolve().parents[2]

    def code() -> dict[str, Any]:
        git = _safely(lambda: git_info(source_root, trust=True))
        return {"version": __version__, **(git if isinstance(git, dict) else {"git": git})}

    text = _safely(lambda: json.dumps(config, sort_keys=True, default=str))
    return {
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "user": _safely(getpass.getuser),
        "host": _safely(socket.gethostname),
        "python": sys.version.split()[0],
        "platform": _safely(platform.platform),
        "maelflow": code(),
        "config_sha256": hashlib.sha256(text.encode()).hexdigest(),
        "config": config,
        "packages": _safely(packages),
        **(extra or {}),
    }


# --------------------------------------------------------------------------------- anemoi's
def _anemoi_fallback(reason: str) -> dict[str, Any]:
    """What anemoi's gatherer returns, as far as it can still be had, and why the rest is not."""
    info: dict[str, Any] = {"time": datetime.now(timezone.utc).replace(tzinfo=None).isoformat(),
                            "python": ".".join(str(v) for v in sys.version_info[:3]),
                            "module_versions": {}, "distribution_names": {}, "git_versions": {},
                            "unavailable": reason}
    try:
        from anemoi.utils import provenance as prov

        versions, _ = prov._module_versions()
        info["module_versions"] = versions
        info["distribution_names"] = prov.import_name_to_distribution_name(list(versions))
    except Exception:  # noqa: BLE001 - the versions are a nicety
        pass
    return info


def guarded(gather: Callable[..., dict[str, Any]]) -> Callable[..., dict[str, Any]]:
    """``gather`` (anemoi's ``gather_provenance_info``) that never raises: on any error, the
    fallback record with ``unavailable`` saying why, and a warning in the log."""
    if getattr(gather, "__maelflow_guarded__", False):
        return gather

    @functools.wraps(gather)
    def gather_provenance_info(*args: Any, **kwargs: Any) -> dict[str, Any]:
        try:
            return gather(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - BrokenPipeError from GitPython, among others
            reason = unavailable(exc)
            log.warning("anemoi provenance %s; the run goes on without it", reason, exc_info=True)
            return _anemoi_fallback(reason)

    gather_provenance_info.__maelflow_guarded__ = True  # type: ignore[attr-defined]
    return gather_provenance_info


def guard_anemoi() -> bool:
    """Trust this installation's checkouts and wrap anemoi's gatherer wherever it was imported
    (``anemoi.utils.provenance`` and modules that took it by name, such as anemoi-training's
    trainer): a provenance failure is recorded, never a training's end. False when anemoi-utils
    is not installed. Import anemoi-training's trainer before calling this."""
    trust_installation()
    try:
        from anemoi.utils import provenance as prov
    except Exception:  # noqa: BLE001 - not installed, or broken: nothing to wrap
        return False
    original = prov.gather_provenance_info
    wrapped = guarded(original)
    for module in list(sys.modules.values()):
        try:
            if vars(module).get("gather_provenance_info") is original:   # no module __getattr__
                module.gather_provenance_info = wrapped
        except Exception:  # noqa: BLE001 - lazy modules that refuse getattr
            continue
    prov.gather_provenance_info = wrapped
    return True

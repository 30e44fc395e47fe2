"""What a suite or a training run was made from: config, code version, packages, host.

Written at deploy and at the start of every training run (as cylc writes its vc info beside each
run), so any result can be traced to the exact config and software that produced it.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import platform
import socket
import subprocess
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from maelflow import __version__


def git_info(path: Path) -> dict[str, Any]:
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(path), *args], capture_output=True, text=True,
                              timeout=10).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
    except (OSError, subprocess.TimeoutExpired):
        return {}
    if not commit:
        return {}
    diff = git("diff", "HEAD")
    return {"commit": commit, "branch": git("rev-parse", "--abbrev-ref", "HEAD"),
            "dirty": bool(diff), "diff_sha256": hashlib.sha256(diff.encode()).hexdigest() if diff else None}


def packages() -> dict[str, str]:
    return {d.metadata["Name"]: d.version for d in metadata.distributions() if d.metadata["Name"]}


def record(config: dict[str, Any], extra: dict[str, Any] | None = None) -> dict[str, Any]:
    source_root = Path(__file__).resolve().parents[2]
    text = json.dumps(config, sort_keys=True)
    return {
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "user": getpass.getuser(),
        "host": socket.gethostname(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "maelflow": {"version": __version__, **git_info(source_root)},
        "config_sha256": hashlib.sha256(text.encode()).hexdigest(),
        "config": config,
        "packages": packages(),
        **(extra or {}),
    }

"""The LD_PRELOAD shim that keeps servers without a bind option on 127.0.0.1.

Compiled once per workspace from ``bindlo.c`` (shipped in the package) with the system C compiler.
"""

from __future__ import annotations

import shutil
import subprocess
from importlib import resources
from pathlib import Path

from maelflow.services.base import ServiceError
from maelflow.workspace import Workspace


def shim_path(ws: Workspace) -> Path:
    """Path of the compiled shim, building it when missing or older than its source."""
    out = ws.ensure("lib") / "libbindlo.so"
    src = resources.files("maelflow.services").joinpath("bindlo.c")
    source = src.read_bytes()
    stamp = out.with_suffix(".src")
    if out.exists() and stamp.exists() and stamp.read_bytes() == source:
        return out
    cc = shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise ServiceError("a C compiler is needed to build the loopback bind shim: apt-get install gcc libc6-dev")
    c_file = out.with_suffix(".c")
    c_file.write_bytes(source)
    tmp = out.with_name(out.name + ".tmp")
    proc = subprocess.run([cc, "-shared", "-fPIC", "-O2", "-o", str(tmp), str(c_file), "-ldl"],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise ServiceError(f"building {out} failed:\n{proc.stderr}")
    tmp.replace(out)
    stamp.write_bytes(source)
    return out


def preload_env(ws: Workspace) -> dict[str, str]:
    return {"LD_PRELOAD": str(shim_path(ws))}

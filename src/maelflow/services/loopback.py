"""The LD_PRELOAD helper that keeps servers without a bind option on 127.0.0.1.

ecflow_server 5.9.2, slurmctld and slurmd always listen on every interface; ``bindlo.c`` turns their
wildcard ``bind()`` into a loopback one. It is compiled at install time, beside this module, as
``bindlo.so`` (``python -m maelflow.services.loopback``, which scripts/install.sh runs); nothing
compiles at run time. The embedded ecflow service needs it (the core's default stack binds to
loopback), and the sandbox's SLURM daemons use the same one.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from maelflow.services.base import ServiceError

SOURCE = Path(__file__).with_name("bindlo.c")
SHIM = SOURCE.with_suffix(".so")
CFLAGS = ("-shared", "-fPIC", "-O2")
BUILD = f"{sys.executable} -m maelflow.services.loopback"


def _stale() -> bool:
    return not SHIM.is_file() or SHIM.stat().st_mtime < SOURCE.stat().st_mtime


def shim_path() -> Path:
    """The prebuilt helper; a ServiceError saying how to build it when it is missing or stale."""
    if _stale():
        state = "is older than bindlo.c" if SHIM.is_file() else "is not built"
        raise ServiceError(f"the loopback bind helper {SHIM} {state}",
                           hint=f"build it: {BUILD} (or bash scripts/install.sh; needs gcc libc6-dev)")
    return SHIM


def preload_env() -> dict[str, str]:
    return {"LD_PRELOAD": str(shim_path())}


def build() -> bool:
    """Compile ``bindlo.so`` when missing or older than its source; return whether it did."""
    if not _stale():
        return False
    cc = shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise ServiceError("a C compiler is needed to build the loopback bind helper",
                           hint="apt-get install gcc libc6-dev")
    tmp = SHIM.with_name(f".{SHIM.name}.{os.getpid()}")
    proc = subprocess.run([cc, *CFLAGS, "-o", str(tmp), str(SOURCE), "-ldl"], capture_output=True, text=True)
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise ServiceError(f"building {SHIM} failed:\n{proc.stderr}")
    tmp.replace(SHIM)
    return True


if __name__ == "__main__":
    try:
        print(f"{'built' if build() else 'up to date:'} {SHIM}")
    except ServiceError as exc:
        sys.exit(f"maelflow.services.loopback: {exc}")

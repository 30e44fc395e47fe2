"""The queue itself: ``submit JOB OUT TOKEN``, ``status ID``, ``cancel ID``, ``list`` (and ``_run ID``,
the detached runner). State lives in files under the spool folder, one folder per job id."""

from __future__ import annotations

import datetime
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

START_DELAY_S = 0.5     # like at(1), the job starts a moment after it was queued


def spool() -> Path:
    root = Path(os.environ.get("MAELFLOW_TESTSCHED_SPOOL") or Path(tempfile.gettempdir()) / f"maelflow-testsched-{os.getuid()}")
    root.mkdir(parents=True, exist_ok=True)
    return root


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text + "\n")
    os.replace(tmp, path)


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        return ""


def submit(job: str, out: str, token: str) -> int:
    root = spool()
    n = 1 + max((int(p.name) for p in root.iterdir() if p.name.isdigit()), default=0)
    while True:
        try:
            (root / str(n)).mkdir()
            break
        except FileExistsError:
            n += 1
    d = root / str(n)
    _write(d / "token", token)
    _write(d / "job", str(Path(job).absolute()))
    _write(d / "out", str(Path(out).absolute()))
    _write(d / "state", "queued")
    subprocess.Popen([sys.executable, "-m", "maelflow_testsched", "_run", str(n)], stdin=subprocess.DEVNULL,
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, cwd=os.getcwd())
    print(f"job {n} at {datetime.datetime.now():%a %b %d %H:%M:%S %Y}")
    return 0


def run(n: str) -> int:
    d = spool() / n
    time.sleep(START_DELAY_S)
    if _read(d / "state") != "queued":
        return 0
    with open(_read(d / "out"), "ab") as out:
        proc = subprocess.Popen(["bash", _read(d / "job")], stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "TESTSCHED_JOB_ID": n})
    _write(d / "pid", str(proc.pid))
    _write(d / "state", "running")
    rc = proc.wait()
    if (d / "cancel").exists():
        _write(d / "state", "cancelled")
    else:
        _write(d / "state", f"{'done' if rc == 0 else 'failed'} {rc}")
    return 0


def status(n: str) -> int:
    state = _read(spool() / n / "state")
    if state:
        print(f"{n} {state.upper()}")
    return 0


def cancel(n: str) -> int:
    d = spool() / n
    if not d.is_dir():
        print(f"testsched: no job {n}", file=sys.stderr)
        return 1
    _write(d / "cancel", "1")
    if _read(d / "state") == "queued":
        _write(d / "state", "cancelled")
        return 0
    pid = _read(d / "pid")
    if pid:
        try:
            os.killpg(int(pid), signal.SIGTERM)
        except ProcessLookupError:
            pass
    return 0


def listing() -> int:
    for d in sorted((p for p in spool().iterdir() if p.name.isdigit()), key=lambda p: int(p.name)):
        print(f"{d.name} maelflow:{_read(d / 'token')}")
    return 0


def main(argv: list[str]) -> int:
    commands = {"submit": submit, "_run": run, "status": status, "cancel": cancel, "list": listing}
    if not argv or argv[0] not in commands:
        print(f"usage: python -m maelflow_testsched {'|'.join(commands)} ...", file=sys.stderr)
        return 2
    return commands[argv[0]](*argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""The local connection: a site that is this machine (``connection.type: local``).

The same methods as the SSH connection, carried out here: commands through ``bash -c``, files with
the same atomic write-aside-and-rename, so a runner or a transfer never asks which kind it holds.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Callable

from maelflow.errors import RemoteTimeout
from maelflow.sites.connections import RemoteResult
from maelflow.sites.connections.shell import RemoteCommandError, shell_path


def _local(path: str) -> Path:
    return Path(os.path.expanduser(path))


class LocalConnection:
    """Commands and files on this machine."""

    local = True        # the site's files are this machine's: callers may read them in place

    def __init__(self, site_name: str = "local", *, dry_run: bool = False):
        self.site_name = site_name
        self.dry_run = dry_run

    @classmethod
    def for_site(cls, site_name: str, site=None, *, dry_run: bool = False) -> "LocalConnection":
        return cls(site_name, dry_run=dry_run)

    @property
    def target(self) -> str:
        return "localhost"

    def _say(self, text: str) -> None:
        print(f"[dry-run] {self.target}: {text}", file=sys.stdout, flush=True)

    # -- commands -------------------------------------------------------------------------------
    def run(self, command: str, *, input: bytes | None = None, timeout: float = 60, check: bool = True,
            retry: bool = True) -> RemoteResult:
        if self.dry_run:
            self._say(command)
            return RemoteResult(0, "", "")
        try:
            proc = subprocess.run(["bash", "-c", command], input=input,
                                  stdin=None if input is not None else subprocess.DEVNULL,
                                  capture_output=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise RemoteTimeout(f"{self.target}: `{command[:120]}` still running after {timeout:.0f} s") from None
        result = RemoteResult(proc.returncode, proc.stdout.decode(errors="replace"),
                              proc.stderr.decode(errors="replace"))
        if check and result.rc != 0:
            raise RemoteCommandError(self.target, command, result)
        return result

    def run_lines(self, command: str, on_line: Callable[[str], None], *, timeout: float = 86400,
                  check: bool = True) -> RemoteResult:
        if self.dry_run:
            self._say(command)
            return RemoteResult(0, "", "")
        return stream_lines(["bash", "-c", command], command, on_line, timeout, check, self.target)

    # -- files ----------------------------------------------------------------------------------
    def put_text(self, remote_path: str, text: str, mode: int | None = None) -> None:
        if self.dry_run:
            self._say(f"write {len(text.encode())} bytes to {remote_path}" + (f" (mode {mode:o})" if mode else ""))
            return
        _write_aside(_local(remote_path), lambda fh: fh.write(text.encode()), mode)

    def put_file(self, local: str | os.PathLike[str], remote_path: str, mode: int | None = None) -> None:
        if self.dry_run:
            self._say(f"copy {local} to {remote_path}")
            return
        with open(local, "rb") as src:
            _write_aside(_local(remote_path), lambda fh: shutil.copyfileobj(src, fh, 1 << 20), mode)

    def read_bytes(self, remote_path: str, offset: int = 0, limit: int | None = None) -> bytes:
        if self.dry_run:
            self._say(f"read {remote_path} from byte {offset}")
            return b""
        with open(_local(remote_path), "rb") as fh:
            fh.seek(offset)
            return fh.read() if limit is None else fh.read(limit)

    def exists(self, remote_path: str) -> bool:
        if self.dry_run:
            self._say(f"test -e {shell_path(remote_path)}")
            return False
        return _local(remote_path).exists()

    def makedirs(self, remote_path: str) -> None:
        if self.dry_run:
            self._say(f"mkdir -p {shell_path(remote_path)}")
            return
        _local(remote_path).mkdir(parents=True, exist_ok=True)

    def rename(self, src: str, dst: str) -> None:
        if self.dry_run:
            self._say(f"mv {shell_path(src)} {shell_path(dst)}")
            return
        os.rename(_local(src), _local(dst))

    def check(self) -> None:
        pass

    def close(self) -> None:
        pass


def _write_aside(path: Path, write: Callable, mode: int | None) -> None:
    """Readers see the old file or the whole new one: written aside, then renamed over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
        os.chmod(tmp, mode if mode is not None else 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def stream_lines(argv: list[str], command: str, on_line: Callable[[str], None], timeout: float, check: bool,
            target: str) -> RemoteResult:
    """Run ``argv``, handing each stdout line to ``on_line`` as it comes; stderr drained aside."""
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    err: list[bytes] = []
    drain = threading.Thread(target=lambda: err.append(proc.stderr.read()), daemon=True)
    drain.start()
    expired = threading.Event()
    timer = threading.Timer(timeout, lambda: (expired.set(), proc.kill()))
    timer.start()
    try:
        for raw in proc.stdout:
            on_line(raw.decode(errors="replace").rstrip("\n"))
        rc = proc.wait()
    finally:
        timer.cancel()
    drain.join()
    if expired.is_set():
        raise RemoteTimeout(f"{target}: `{command[:120]}` still running after {timeout:.0f} s")
    result = RemoteResult(rc, "", b"".join(err).decode(errors="replace"))
    if check and rc != 0:
        raise RemoteCommandError(target, command, result)
    return result

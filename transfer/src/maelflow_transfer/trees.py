"""Where a dataset lands: a folder on this machine, or a folder on a site reached over OpenSSH.

Both keep the same layout and rules. Objects are written into a hidden sibling of the destination,
``.<name>.partial/``, each renamed to its name once written, and kept only once its checksum matched
the manifest, which a journal records. Only when every object is there is the manifest written and
the folder renamed to ``<name>``: readers see nothing or the whole dataset. A re-run trusts
journalled objects whose size is unchanged and hashes any other file found in place, so a killed
stage or push continues where it stopped.

On a site nothing of ours runs: ``SiteTree`` uses the site's shell, rsync and sha256sum through the
caller's connection (an object with ``run`` and ``ssh_command``; this library never imports maelflow).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath
from typing import Callable

from maelflow_transfer.errors import DestinationConflict, DiskFull, TransferError, disk_error
from maelflow_transfer.manifest import (MANIFEST_NAME, SHA256, Entry, Manifest, check_file, extra_files,
                                      sha256_file, verify_tree)
from maelflow_transfer.paths import UnsafePath, check_inside, check_key, inside

JOURNAL_NAME = ".maelflow-journal"
LOCK_NAME = ".maelflow-lock"


# Journal lines are held back until one syncfs has put their objects (and every other object written
# before it) on the disk: a group commit. One fdatasync per object cost each stage worker 4.5 ms
# waiting for the disk's cache flush, a fifth of its time on 2 051 objects of 512 KiB.
GROUP_OBJECTS = 256
GROUP_SECONDS = 1.0


def _syncfs(fd: int) -> None:
    """Every dirty page and inode of the file system that holds ``fd`` on the disk, one cache
    flush for all of them (Linux ``syncfs``; ``sync`` where libc has none)."""
    import ctypes

    fn = getattr(ctypes.CDLL(None, use_errno=True), "syncfs", None)
    if fn is None:
        os.sync()
        return
    if fn(fd) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def partial_name(name: str) -> str:
    return f".{name}.partial"


def _fsync_dir(path: Path) -> None:
    """A rename is durable once its folder is synced."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _is_part(rel: str) -> bool:
    name = PurePosixPath(rel).name
    return name.startswith(".") and name.endswith(".part")


def _sizes(lines: list[str]) -> dict[str, int]:
    """``find -printf '%s %P\\n'`` lines: path -> size."""
    out = {}
    for line in lines:
        size, _, rel = line.partition(" ")
        if rel:
            out[rel] = int(size)
    return out


def _conflict(dest: str, manifest: Manifest, other: Manifest | None) -> DestinationConflict:
    what = "another version of the dataset" if other is not None else "something that is not a staged dataset"
    return DestinationConflict(f"dataset {manifest.dataset!r}: {dest} already exists and holds {what}; "
                               "move it away or stage to another --dest")


DIRECT_MIN = 256 << 10     # objects from this size are written with O_DIRECT (where the file system allows)
ALIGN = 4096               # O_DIRECT wants offsets, lengths and memory aligned to the logical block


class LocalPart:
    """An object being written on this machine.

    Large objects are written with O_DIRECT: a stage of terabytes must not evict the page cache
    of a shared login node, and the kernel skips allocating and copying into page-cache pages, which costs more CPU than
    the SHA-256 of the same bytes. The caller's buffers must be page-aligned for that (the
    store's are); anything else (the unaligned tail of an object, a file system that refuses
    O_DIRECT, an unaligned buffer) falls back to ordinary writes for the rest of the object.
    """

    def __init__(self, target: Path, size: int, direct: bool = False,
                 journal: Callable[[int], None] | None = None, dir_fd: int | None = None):
        """``journal(mtime_ns)`` records the object once it is in place (the tree's journal line).
        ``dir_fd``: the folder ``target`` is in, opened by the tree without following links; the
        part is then created, renamed and removed relative to it (never through a path that
        someone could swap for a symlink meanwhile, and without a path lookup per call)."""
        self.target = target
        self.journal = journal
        self.tmp = target.with_name(f".{target.name}.part")
        self.dir_fd = dir_fd
        self.direct = direct and size >= DIRECT_MIN and hasattr(os, "O_DIRECT")
        try:
            self.fd = self._open()
        except FileNotFoundError:
            if dir_fd is not None:
                raise
            target.parent.mkdir(parents=True, exist_ok=True)
            self.fd = self._open()

    def _open(self) -> int:
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
        at = {} if self.dir_fd is None else {"dir_fd": self.dir_fd}
        if at:
            flags |= os.O_NOFOLLOW
        where = self.tmp.name if at else self.tmp
        if self.direct:
            try:
                return os.open(where, flags | os.O_DIRECT, 0o644, **at)
            except OSError as exc:
                if exc.errno != errno.EINVAL:       # EINVAL: this file system has no O_DIRECT
                    raise
                self.direct = False
        return os.open(where, flags, 0o644, **at)

    def _buffered(self) -> None:
        self.direct = False
        fcntl.fcntl(self.fd, fcntl.F_SETFL, fcntl.fcntl(self.fd, fcntl.F_GETFL) & ~os.O_DIRECT)

    def write(self, data: memoryview) -> None:
        try:
            if self.direct:
                aligned = len(data) - len(data) % ALIGN
                try:
                    while aligned:
                        n = os.write(self.fd, data[:aligned])
                        data, aligned = data[n:], aligned - n
                except OSError as exc:
                    if exc.errno != errno.EINVAL:
                        raise
                if data:
                    self._buffered()            # the object's tail: no more aligned blocks follow
            while data:
                n = os.write(self.fd, data)
                data = data[n:]
        except OSError as exc:
            raise disk_error(exc, str(self.tmp)) from None

    def pwrite(self, data: memoryview, offset: int) -> None:
        try:
            while data:
                n = os.pwrite(self.fd, data, offset)
                data, offset = data[n:], offset + n
        except OSError as exc:
            raise disk_error(exc, str(self.tmp)) from None

    def sha256(self) -> str:
        return sha256_file(self.tmp)

    def commit(self, on_done: Callable[[], None]) -> None:
        """Renamed into place, handed to the journal, then ``on_done()`` (the stage counts it).

        The journal writes its line only after the object is on the disk (``LocalTree.record``'s
        group commit): a re-run after a power loss trusts journalled objects by size and time, and
        hashes any other file it finds, so a renamed object with a zero-filled tail is fetched
        again, never trusted."""
        try:
            stamp = os.fstat(self.fd).st_mtime_ns       # a rename keeps it: no lookup by path after
        except OSError as exc:
            raise disk_error(exc, str(self.tmp)) from None
        os.close(self.fd)
        self.fd = -1
        if self.dir_fd is not None:
            os.replace(self.tmp.name, self.target.name, src_dir_fd=self.dir_fd, dst_dir_fd=self.dir_fd)
        else:
            os.replace(self.tmp, self.target)
        if self.journal is not None:
            self.journal(stamp)
        on_done()

    def abort(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        try:
            if self.dir_fd is not None:
                os.unlink(self.tmp.name, dir_fd=self.dir_fd)
            else:
                os.unlink(self.tmp)
        except OSError:
            pass


class LocalTree:
    ranged = True          # parts of a large object can be written in parallel at their offsets

    def __init__(self, dest: Path | str):
        self.dest = Path(dest).absolute()
        self.partial = self.dest.with_name(partial_name(self.dest.name))
        self.journal_path = self.partial / JOURNAL_NAME
        self._journal = None
        self._lock = threading.Lock()
        self._pending: list[str] = []          # journal lines waiting for their objects' syncfs
        self._flushed = time.monotonic()
        self._flush_lock = threading.Lock()    # one syncfs at a time
        self._lock_fd: int | None = None
        self._dirs: dict[str, int] = {}       # folder (relative) -> its fd, opened without following links

    def __str__(self) -> str:
        return str(self.dest)

    # -- state ---------------------------------------------------------------------------------
    def state(self, manifest: Manifest) -> str:
        """"complete" (this manifest's copy is in place), "absent"; raises on a foreign folder."""
        mf = self.dest / MANIFEST_NAME
        if mf.is_file():
            try:
                other = Manifest.from_json(mf.read_text())
            except (ValueError, KeyError, TypeError):
                other = None
            if other == manifest:
                return "complete"
            raise _conflict(str(self.dest), manifest, other)
        if self.dest.exists():
            raise _conflict(str(self.dest), manifest, None)
        return "absent"

    def prepare(self, manifest: Manifest, workers: int = 4) -> set[str]:
        """Create the partial folder and hold its lock; return the keys already there and correct.

        The folder is never followed through a symlink (someone else's link in a shared datasets
        folder would have us unlink their files), and two stages to one destination never run at
        once: the second is refused while the first holds the lock."""
        if self.partial.is_symlink():
            raise UnsafePath(f"{self.partial} is a symbolic link; a stage never writes through one: "
                             "remove it and run the stage again", str(self.partial))
        try:
            self.partial.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise disk_error(exc, str(self.partial)) from None
        self._hold_lock()
        journal: dict[str, dict] = {}
        if self.journal_path.is_file():
            for line in self.journal_path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                    journal[rec["k"]] = rec
                except (ValueError, KeyError):
                    continue       # a line cut short by a kill
        wanted = manifest.by_key()
        done: set[str] = set()
        to_hash: list[Entry] = []
        for dirpath, _, files in os.walk(self.partial):
            for name in files:
                path = Path(dirpath) / name
                rel = path.relative_to(self.partial).as_posix()
                if rel in (JOURNAL_NAME, LOCK_NAME):
                    continue
                e = wanted.get(rel)
                st = path.stat()
                if e is None or _is_part(rel) or st.st_size != e.size:
                    path.unlink()            # leftovers of a killed run, or of another version
                    continue
                rec = journal.get(rel)
                # a line says which digest was checked ("d"; lines without it: SHA-256)
                if rec and e.matches(rec.get("d", SHA256), rec.get("h")) and rec.get("s") == e.size \
                        and rec.get("m") == st.st_mtime_ns:
                    done.add(rel)
                else:
                    to_hash.append(e)
        if to_hash:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                checks = list(pool.map(lambda e: check_file(inside(self.partial, e.key), e), to_hash))
            for e, (algo, ok) in zip(to_hash, checks):
                if ok:
                    done.add(e.key)
                    self.record(e, os.stat(inside(self.partial, e.key)).st_mtime_ns, algo)
                else:
                    inside(self.partial, e.key).unlink()
        return done

    def free_bytes(self) -> int | None:
        from maelflow_transfer import manifest as manifest_mod

        return manifest_mod.free_bytes(self.partial)

    def makedirs(self, keys: list[str]) -> None:
        for d in sorted({str(PurePosixPath(k).parent) for k in keys} - {"."}):
            folder = inside(self.partial, d)         # checked before anything is created
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise disk_error(exc, str(folder)) from None
            check_inside(self.partial, folder)

    # -- objects -------------------------------------------------------------------------------
    def writer(self, entry: Entry, ranged: bool = False) -> LocalPart:
        """``ranged``: written at offsets and hashed by reading it back, so kept in the page cache.
        ``commit(on_done)`` journals the object, then calls ``on_done()``."""
        folder, _, name = check_key(entry.key).rpartition("/")
        try:
            return LocalPart(self.partial / entry.key, entry.size, direct=not ranged,
                             journal=lambda stamp: self.record(entry, stamp), dir_fd=self._dir_fd(folder))
        except OSError as exc:
            raise disk_error(exc, str(self.partial / entry.key)) from None

    def _dir_fd(self, folder: str) -> int:
        """The partial folder's ``folder`` (a checked key's folder, "" for the top), opened once per
        stage: checked to resolve inside the partial folder (``inside``), then opened one segment at
        a time without following a symlink, so a folder swapped for a link later is never written
        through (objects are created, renamed and removed relative to this fd)."""
        fd = self._dirs.get(folder)
        if fd is not None:
            return fd
        with self._lock:
            fd = self._dirs.get(folder)
            if fd is not None:
                return fd
            if folder:
                inside(self.partial, folder)
            flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
            fd = os.open(self.partial, flags)
            try:
                for segment in folder.split("/") if folder else ():
                    try:
                        try:
                            nxt = os.open(segment, flags, dir_fd=fd)
                        except FileNotFoundError:            # not made by ``makedirs``: made here
                            try:
                                os.mkdir(segment, dir_fd=fd)
                            except FileExistsError:
                                pass
                            nxt = os.open(segment, flags, dir_fd=fd)
                    except OSError as exc:
                        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                            raise UnsafePath(f"{self.partial / folder} is or passes through a symbolic link; "
                                             "refused", str(self.partial / folder)) from None
                        raise
                    os.close(fd)
                    fd = nxt
            except BaseException:
                os.close(fd)
                raise
            self._dirs[folder] = fd
            return fd

    def record(self, entry: Entry, stamp: int | None, algo: str | None = None) -> None:
        """Journal ``entry`` as checked with ``algo`` (default: the one a stage checks it with,
        ``Entry.algo``): the line names the digest ("d") and its value ("h"). The line is written
        once its object is on the disk: after the next syncfs, every GROUP_OBJECTS objects or
        GROUP_SECONDS, and when the tree is closed."""
        algo = algo or entry.algo
        line = json.dumps({"k": entry.key, "s": entry.size, "d": algo, "h": entry.digest(algo), "m": stamp}) + "\n"
        with self._lock:
            self._pending.append(line)
            due = len(self._pending) >= GROUP_OBJECTS or time.monotonic() - self._flushed >= GROUP_SECONDS
        if due:
            self.flush()

    def flush(self) -> None:
        """One syncfs of the partial folder's file system, then the journal lines of the objects
        it made durable (those recorded before it started)."""
        with self._flush_lock:
            with self._lock:
                lines, self._pending = self._pending, []
                self._flushed = time.monotonic()
            if not lines:
                return
            fd = os.open(self.partial, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                _syncfs(fd)
            except OSError as exc:
                with self._lock:
                    self._pending[:0] = lines
                raise disk_error(exc, str(self.partial)) from None
            finally:
                os.close(fd)
            with self._lock:
                if self._journal is None:
                    self._journal = open(self.journal_path, "a", buffering=1)
                self._journal.write("".join(lines))

    def close(self) -> None:
        """The writers are done: objects synced and journalled, folders and journal closed (synced);
        the lock stays held."""
        if self._pending and self.partial.is_dir():
            self.flush()
        with self._lock:
            for fd in self._dirs.values():
                os.close(fd)
            self._dirs.clear()
            if self._journal is not None:
                self._journal.flush()
                os.fsync(self._journal.fileno())
                self._journal.close()
                self._journal = None

    def release(self) -> None:
        """The stage is over (published, or failed): another may write the destination now."""
        self.close()
        with self._lock:
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None

    def _hold_lock(self) -> None:
        if self._lock_fd is not None:
            return
        fd = os.open(self.partial / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise DestinationConflict(f"another stage is writing {self.dest} right now (it holds "
                                      f"{self.partial / LOCK_NAME}); wait for it to end") from None
        self._lock_fd = fd

    def finish(self, manifest: Manifest) -> None:
        """Every object is in place: add the manifest, drop the journal, make the folder visible."""
        tmp = self.partial / f".{MANIFEST_NAME}.tmp"
        with open(tmp, "w") as fh:
            fh.write(manifest.to_json())
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.partial / MANIFEST_NAME)
        self.journal_path.unlink(missing_ok=True)
        (self.partial / LOCK_NAME).unlink(missing_ok=True)
        _fsync_dir(self.partial)
        os.rename(self.partial, self.dest)
        self.release()                        # the lock is held until the folder has its name
        _fsync_dir(self.dest.parent)

    # -- verification --------------------------------------------------------------------------
    def verify(self, manifest: Manifest, workers: int = 4) -> tuple[list[str], list[str]]:
        """(objects missing or wrong, files the manifest does not list) of the staged copy."""
        if not self.dest.is_dir():
            return [e.key for e in manifest.entries], []
        return verify_tree(self.dest, manifest, workers), extra_files(self.dest, manifest)


class SiteTree:
    """The same layout on a site, through a connection the caller gives: ``remote.run(command,
    input=, timeout=, check=)`` (a result with ``rc``, ``stdout``, ``stderr``), ``remote.ssh_command()``
    (the ``ssh`` argv, without the host, riding the connection's master), ``remote.host`` and
    ``remote.target``. Objects arrive by rsync (``send``) and are checked where they landed by one
    hash batch per call (``hashes``), whose output is also the journal."""

    def __init__(self, remote, dest: str):
        self.remote = remote
        self.dest = dest.rstrip("/")
        p = PurePosixPath(self.dest)
        self.partial = f"{p.parent}/{partial_name(p.name)}"
        self._survey: dict | None = None      # what ``state`` found on the site

    def __str__(self) -> str:
        return f"{self.remote.target}:{self.dest}"

    def _failed(self, what: str, stderr: str) -> TransferError:
        """A command on the site failed: a full disk or quota says so (``DiskFull``)."""
        err = stderr.strip()
        if "No space" in err or "quota" in err.lower():
            return DiskFull(f"{self}: {err}")
        return TransferError(f"{self}: {what} failed: {err[-500:]}")

    # -- state ---------------------------------------------------------------------------------
    def state(self, manifest: Manifest) -> str:
        """One command on the site (a login node may be 50 ms away: one round trip, not six) looks
        at the destination and, when there is none, creates the partial folder with every folder
        of the dataset and reports its journal, its files and the free space."""
        dirs = sorted({str(PurePosixPath(e.key).parent) for e in manifest.entries} - {"."})
        mark = "@@maelflow-survey"
        script = (f"D={_q(self.dest)}; P={_q(self.partial)}\n"
                  f'if [ -f "$D/{MANIFEST_NAME}" ]; then echo {mark}-manifest; cat "$D/{MANIFEST_NAME}"; echo; fi\n'
                  f'if [ -e "$D" ]; then echo {mark}-exists; exit 0; fi\n'
                  f'mkdir -p "$P" && cd "$P" && xargs -0 -r mkdir -p -- || exit 3\n'
                  f"echo {mark}-journal; cat {JOURNAL_NAME}* 2>/dev/null; echo\n"
                  f"echo {mark}-files; find . -type f -printf '%s %P\\n'\n"
                  f"echo {mark}-df; df -Pk . | tail -1\n")
        res = self.remote.run(script, input=b"".join(d.encode() + b"\0" for d in dirs), timeout=600, check=False)
        if res.rc == 3:
            raise self._failed(f"creating {self.partial}", res.stderr)
        if res.rc != 0:
            raise TransferError(f"{self}: looking at the destination failed (exit {res.rc}): {res.stderr.strip()}")
        parts: dict[str, list[str]] = {}
        current: list[str] | None = None
        for line in res.stdout.splitlines():
            if line.startswith(mark + "-"):
                current = parts.setdefault(line[len(mark) + 1:], [])
            elif current is not None:
                current.append(line)
        if "manifest" in parts:
            try:
                other = Manifest.from_json("\n".join(parts["manifest"]))
            except (ValueError, KeyError, TypeError):
                other = None
            if other == manifest:
                return "complete"
            raise _conflict(str(self), manifest, other)
        if "exists" in parts:
            raise _conflict(str(self), manifest, None)
        try:
            free = int(parts.get("df", [""])[0].split()[3]) * 1024
        except (IndexError, ValueError):
            free = None
        self._survey = {"journal": _digests(parts.get("journal", [])), "files": _sizes(parts.get("files", [])),
                        "free": free}
        return "absent"

    def prepare(self, manifest: Manifest, workers: int = 4) -> set[str]:
        """The objects already in the partial folder and correct (``state`` has looked); anything
        else found there (a killed run's leftovers, another version's objects) is removed."""
        if self._survey is None and self.state(manifest) != "absent":     # the push asks ``state`` first
            raise TransferError(f"{self}: the destination appeared while the push was preparing")
        journal = self._survey["journal"]
        wanted = manifest.by_key()
        done: set[str] = set()
        stale: list[str] = []
        to_hash: list[str] = []
        for rel, size in self._survey["files"].items():
            if PurePosixPath(rel).name.startswith(JOURNAL_NAME) and "/" not in rel:
                continue
            e = wanted.get(rel)
            if e is None or size != e.size:
                stale.append(rel)
            elif journal.get(rel) == e.sha256:
                done.add(rel)
            else:
                to_hash.append(rel)
        for rel, digest in self.hashes(to_hash, journal=0).items():
            (done.add if digest == wanted[rel].sha256 else stale.append)(rel)
        self.remove(stale)
        return done

    def free_bytes(self) -> int | None:
        return self._survey["free"] if self._survey is not None else None

    # -- objects -------------------------------------------------------------------------------
    def send(self, root: Path, keys: list[str], *, rate: float | None = None,
             on_sent: Callable[[str], None] = lambda key: None, started: Callable | None = None) -> None:
        """``keys`` (paths under the local folder ``root``) into the partial folder, by one rsync over
        the connection's master: whole files, each renamed into place by rsync once written.
        ``on_sent(key)`` as each is done; ``started(proc)`` lets the caller kill it."""
        rsh = " ".join(shlex.quote(a) for a in self.remote.ssh_command())
        argv = ["rsync", "-e", rsh, "--from0", "--files-from=-", "--whole-file", "--ignore-times",
                "--out-format=%n"]
        if rate:
            argv.append(f"--bwlimit={max(1, int(rate / 1024))}")
        argv += [f"{root}/", f"{self.remote.host}:{_rsync_path(self.partial)}/"]
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                preexec_fn=_die_with_parent if _prctl() else None)
        if started is not None:
            started(proc)
        err: list[bytes] = []
        drain = threading.Thread(target=lambda: err.append(proc.stderr.read()), daemon=True)
        drain.start()
        try:
            proc.stdin.write(b"".join(k.encode() + b"\0" for k in keys))
            proc.stdin.close()
        except BrokenPipeError:
            pass
        wanted = set(keys)
        for raw in proc.stdout:
            key = raw.decode(errors="replace").rstrip("\n")
            if key in wanted:
                on_sent(key)
        rc = proc.wait()
        drain.join()
        if rc != 0:
            stderr = b"".join(err).decode(errors="replace")
            if "No space left" in stderr or "quota exceeded" in stderr.lower():
                raise DiskFull(f"{self}: no space left on the device (or the quota is exhausted); free some "
                               "space and run the push again: it continues where it stopped")
            if rc in RSYNC_TRANSIENT or rc < 0:
                raise ConnectionError(f"{self}: rsync lost the connection (exit {rc}): {stderr.strip()[-300:]}")
            raise TransferError(f"{self}: rsync failed (exit {rc}): {stderr.strip()[-500:]}")

    def hashes(self, keys: list[str], journal: int | None = None, root: str | None = None) -> dict[str, str]:
        """SHA-256 of ``keys`` (under the partial folder, or ``root``) computed on the site in one
        command; with ``journal``, its output is appended to that journal file as well (a killed
        push trusts those lines)."""
        if not keys:
            return {}
        tee = f" | tee -a {JOURNAL_NAME}.{journal}" if journal is not None else ""
        res = self.remote.run(f"cd {_q(root or self.partial)} && {{ {SITE_SHA256}; }}{tee}",
                              input=b"".join(k.encode() + b"\0" for k in keys), timeout=3600, check=False)
        return _digests(res.stdout.splitlines())

    def remove(self, keys: list[str]) -> None:
        if keys:
            self.remote.run(f"cd {_q(self.partial)} && xargs -0 rm -f --",
                            input=b"".join(k.encode() + b"\0" for k in keys), timeout=600)

    def finish(self, manifest: Manifest) -> None:
        """The manifest written aside and renamed, the journal dropped, then the folder renamed into
        place: one command."""
        tmp = f"{self.partial}/.{MANIFEST_NAME}.tmp"
        script = (f"umask 022 && cat > {_q(tmp)} && mv -f {_q(tmp)} {_q(self.partial + '/' + MANIFEST_NAME)}"
                  f" && rm -f {_q(self.partial)}/{JOURNAL_NAME}* && mv -T {_q(self.partial)} {_q(self.dest)}")
        res = self.remote.run(script, input=manifest.to_json().encode(), timeout=600, check=False)
        if res.rc != 0:
            raise self._failed("publishing the pushed folder", res.stderr)

    # -- verification --------------------------------------------------------------------------
    def verify(self, manifest: Manifest, workers: int = 4) -> tuple[list[str], list[str]]:
        """(objects missing or wrong, files the manifest does not list), hashed on the site."""
        res = self.remote.run(f"cd {_q(self.dest)} 2>/dev/null && find . -type f -printf '%s %P\\n' || true",
                              timeout=600)
        listing = _sizes(res.stdout.splitlines())
        listing.pop(MANIFEST_NAME, None)
        wanted = manifest.by_key()
        sums = self.hashes([k for k in wanted if listing.get(k) == wanted[k].size], root=self.dest)
        bad = [k for k, e in wanted.items() if sums.get(k) != e.sha256]
        extra = sorted(k for k in listing if k not in wanted)
        return bad, extra


# the site's SHA-256 of the NUL-separated paths on stdin, one "<hex> <path>" line each: OpenSSL where
# the site has it (SHA instructions: four times coreutils' speed here), coreutils' sha256sum else
SITE_SHA256 = ("if command -v openssl >/dev/null 2>&1; then xargs -0 -r openssl dgst -sha256 -r; "
               "else xargs -0 -r sha256sum --; fi")
RSYNC_TRANSIENT = {10, 12, 30, 35, 255}     # socket I/O, protocol stream, time-outs, ssh's own failure


def _digests(lines: list[str]) -> dict[str, str]:
    """``sha256sum`` ("<hex>  <path>") or ``openssl dgst -r`` ("<hex> *<path>") lines: path -> hex."""
    out = {}
    for line in lines:
        digest, _, rest = line.partition(" ")
        if rest:
            out[rest[1:] if rest[0] in " *" else rest] = digest.lstrip("\\")
    return out


def _q(path: str) -> str:
    """A path quoted for the site's shell, keeping a leading ``~/`` meaningful."""
    if path.startswith("~/"):
        return '"$HOME"/' + shlex.quote(path[2:])
    return shlex.quote(path)


def _rsync_path(path: str) -> str:
    """A path as rsync's remote side takes it: relative paths start in the login's home."""
    return path[2:] if path.startswith("~/") else path


def _prctl():
    """libc's prctl, looked up here: a forked child must not load libraries (another thread may
    have held the loader's lock at the fork)."""
    global _PRCTL
    if _PRCTL is None and sys.platform.startswith("linux"):
        import ctypes

        _PRCTL = ctypes.CDLL(None).prctl
    return _PRCTL


_PRCTL = None


def _die_with_parent() -> None:
    """In a child before exec: killed when the thread that started it dies (a killed push leaves
    no rsync writing into the partial folder behind it)."""
    if _PRCTL is not None:
        _PRCTL(1, signal.SIGKILL)       # PR_SET_PDEATHSIG

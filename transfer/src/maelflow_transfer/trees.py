"""Where a stage writes: a folder on this machine, or a folder on a site reached over SFTP.

Both keep the same layout and rules. Objects are written into a hidden sibling of the destination,
``.<name>.partial/``, each as ``.<object>.part`` renamed to its name once its checksum matched the
manifest, and a journal line records it. Only when every object is there is the manifest written
and the folder renamed to ``<name>``: readers see nothing or the whole dataset. A re-run trusts
journalled objects whose size is unchanged and hashes any other file found in place, so a killed
stage continues where it stopped.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath
from typing import Callable

from maelflow_transfer.errors import DestinationConflict, DiskFull, TransferError, disk_error
from maelflow_transfer.manifest import MANIFEST_NAME, Entry, Manifest, extra_files, sha256_file, verify_tree

JOURNAL_NAME = ".maelflow-journal"


def partial_name(name: str) -> str:
    return f".{name}.partial"


def _part(rel: str) -> tuple[str, str]:
    """(folder, hidden part name) of an object's temporary file."""
    p = PurePosixPath(rel)
    return str(p.parent), f".{p.name}.part"


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
    of a shared login node, every byte is on the disk before the object is renamed into place,
    and the kernel skips allocating and copying into page-cache pages, which costs more CPU than
    the SHA-256 of the same bytes. The caller's buffers must be page-aligned for that (the
    store's are); anything else (the unaligned tail of an object, a file system that refuses
    O_DIRECT, an unaligned buffer) falls back to ordinary writes for the rest of the object.
    """

    def __init__(self, target: Path, size: int, direct: bool = False,
                 journal: Callable[[int], None] | None = None):
        """``journal(mtime_ns)`` records the object once it is in place (the tree's journal line)."""
        self.target = target
        self.journal = journal
        self.tmp = target.with_name(f".{target.name}.part")
        self.direct = direct and size >= DIRECT_MIN and hasattr(os, "O_DIRECT")
        try:
            self.fd = self._open()
        except FileNotFoundError:
            target.parent.mkdir(parents=True, exist_ok=True)
            self.fd = self._open()

    def _open(self) -> int:
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        if self.direct:
            try:
                return os.open(self.tmp, flags | os.O_DIRECT, 0o644)
            except OSError as exc:
                if exc.errno != errno.EINVAL:       # EINVAL: this file system has no O_DIRECT
                    raise
                self.direct = False
        return os.open(self.tmp, flags, 0o644)

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
        """Rename into place, journal it, then ``on_done()`` (the stage counts it)."""
        os.close(self.fd)
        self.fd = -1
        os.replace(self.tmp, self.target)
        if self.journal is not None:
            self.journal(os.stat(self.target).st_mtime_ns)
        on_done()

    def abort(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        try:
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
        """Create the partial folder; return the keys already there and correct."""
        try:
            self.partial.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise disk_error(exc, str(self.partial)) from None
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
                if rel == JOURNAL_NAME:
                    continue
                e = wanted.get(rel)
                st = path.stat()
                if e is None or _is_part(rel) or st.st_size != e.size:
                    path.unlink()            # leftovers of a killed run, or of another version
                    continue
                rec = journal.get(rel)
                if rec and rec.get("h") == e.sha256 and rec.get("s") == e.size and rec.get("m") == st.st_mtime_ns:
                    done.add(rel)
                else:
                    to_hash.append(e)
        if to_hash:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                sums = list(pool.map(lambda e: sha256_file(self.partial / e.key), to_hash))
            for e, s in zip(to_hash, sums):
                if s == e.sha256:
                    done.add(e.key)
                    self.record(e, os.stat(self.partial / e.key).st_mtime_ns)
                else:
                    (self.partial / e.key).unlink()
        return done

    def free_bytes(self) -> int | None:
        from maelflow_transfer import manifest as manifest_mod

        return manifest_mod.free_bytes(self.partial)

    def makedirs(self, keys: list[str]) -> None:
        for d in sorted({str(PurePosixPath(k).parent) for k in keys}):
            try:
                (self.partial / d).mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise disk_error(exc, str(self.partial / d)) from None

    # -- objects -------------------------------------------------------------------------------
    def writer(self, entry: Entry, ranged: bool = False) -> LocalPart:
        """``ranged``: written at offsets and hashed by reading it back, so kept in the page cache.
        ``commit(on_done)`` journals the object, then calls ``on_done()``."""
        try:
            return LocalPart(self.partial / entry.key, entry.size, direct=not ranged,
                             journal=lambda stamp: self.record(entry, stamp))
        except OSError as exc:
            raise disk_error(exc, str(self.partial / entry.key)) from None

    def record(self, entry: Entry, stamp: int | None) -> None:
        line = json.dumps({"k": entry.key, "s": entry.size, "h": entry.sha256, "m": stamp}) + "\n"
        with self._lock:
            if self._journal is None:
                self._journal = open(self.journal_path, "a", buffering=1)
            self._journal.write(line)

    def close(self, drain: bool = True) -> None:
        with self._lock:
            if self._journal is not None:
                self._journal.close()
                self._journal = None

    def finish(self, manifest: Manifest) -> None:
        """Every object is in place: add the manifest, drop the journal, make the folder visible."""
        self.close()
        tmp = self.partial / f".{MANIFEST_NAME}.tmp"
        tmp.write_text(manifest.to_json())
        os.replace(tmp, self.partial / MANIFEST_NAME)
        self.journal_path.unlink(missing_ok=True)
        os.rename(self.partial, self.dest)
        fd = os.open(self.dest.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    # -- verification --------------------------------------------------------------------------
    def verify(self, manifest: Manifest, workers: int = 4) -> tuple[list[str], list[str]]:
        """(objects missing or wrong, files the manifest does not list) of the staged copy."""
        if not self.dest.is_dir():
            return [e.key for e in manifest.entries], []
        return verify_tree(self.dest, manifest, workers), extra_files(self.dest, manifest)


class SftpPart:
    """An object being written on a site over SFTP: through the thread's OpenSSH wire (pipelined,
    the cipher work done in C; the object is confirmed when the site's answer to its rename comes
    back), or paramiko's SFTP where there is no ``ssh`` binary (each step waited for)."""

    def __init__(self, tree: "SftpTree", entry: Entry):
        folder, name = _part(entry.key)
        base = tree.partial if folder == "." else f"{tree.partial}/{folder}"
        self.tree, self.entry = tree, entry
        self.tmp = f"{base}/{name}"
        self.target = f"{tree.partial}/{entry.key}"
        self.wire = tree.session.sftp_wire(tree.server)
        self.fh = self.wire.upload(self.tmp) if self.wire else tree.session.open_writer(self.tmp)

    @property
    def verifies(self) -> bool:
        """The site checks the object's size and SHA-256 itself (maelflow's SFTP server): the caller
        need not hash it, and passes ``on_mismatch`` to ``commit``."""
        return self.wire is not None and self.wire.verifies

    def write(self, data: memoryview) -> None:
        self.fh.write(data)

    def write_from(self, fd: int, offset: int, length: int) -> None:
        """Bytes of a local file, spliced into the wire (only where ``verifies``: the site checks them)."""
        self.fh.write_from(fd, offset, length)

    def commit(self, on_done: Callable[[], None], on_mismatch: Callable[[], None] | None = None) -> None:
        """Close and rename into place, in flight; ``on_done`` once the site says it is there. With
        ``on_mismatch``, the site renames it only if its bytes match the manifest, and calls that
        instead when they did not (it has dropped them)."""
        def placed() -> None:
            self.tree.record(self.entry, None, self.wire)
            on_done()
        if self.wire is not None:
            expect = (self.entry.size, self.entry.sha256) if on_mismatch is not None else None
            self.fh.commit(self.target, placed, expect=expect, on_mismatch=on_mismatch)
        else:
            self.fh.close()
            self.tree.session.rename(self.tmp, self.target)
            placed()

    def abort(self) -> None:
        self.fh.abort()


class SftpTree:
    """The same layout on a site, written over the site's SSH session (``maelflow.sites.ssh``)."""

    ranged = False

    def __init__(self, session, dest: str, server: str | None = None):
        """``server``: the site's command serving the push's SFTP wires (``wire_server``); None:
        OpenSSH's sftp-server."""
        self.session = session
        self.server = server
        self.dest = dest.rstrip("/")
        parent = str(PurePosixPath(self.dest).parent)
        self.partial = f"{parent}/{partial_name(PurePosixPath(self.dest).name)}"
        self.journal_path = f"{self.partial}/{JOURNAL_NAME}"
        self._journal = None
        self._lock = threading.Lock()
        self._survey: dict | None = None      # what ``state`` found on the site

    def __str__(self) -> str:
        return f"{self.session.target}:{self.dest}"

    def _q(self, path: str) -> str:
        from maelflow.sites.ssh import shell_path

        return shell_path(path)

    def _failed(self, what: str, stderr: str) -> TransferError:
        """A command on the site failed: a full disk or quota says so (``DiskFull``)."""
        err = stderr.strip()
        if "No space" in err or "quota" in err.lower():
            return DiskFull(f"{self}: {err}")
        return TransferError(f"{self}: {what} failed: {err}")

    def state(self, manifest: Manifest) -> str:
        """One command on the site (a login node may be 50 ms away: one round trip, not six) looks
        at the destination and, when there is none, creates the partial folder with every folder
        of the dataset and reports its journal, its files and the free space: ``prepare``,
        ``free_bytes`` and ``makedirs`` then use what it found."""
        dirs = sorted({str(PurePosixPath(e.key).parent) for e in manifest.entries} - {"."})
        mark = "@@maelflow-survey"
        script = (f"D={self._q(self.dest)}; P={self._q(self.partial)}\n"
                  f'if [ -f "$D/{MANIFEST_NAME}" ]; then echo {mark}-manifest; cat "$D/{MANIFEST_NAME}"; echo; fi\n'
                  f'if [ -e "$D" ]; then echo {mark}-exists; exit 0; fi\n'
                  f'mkdir -p "$P" && cd "$P" && xargs -0 -r mkdir -p -- || exit 3\n'
                  f"echo {mark}-journal; cat {JOURNAL_NAME} 2>/dev/null; echo\n"
                  f"echo {mark}-files; find . -type f -printf '%s %P\\n'\n"
                  f"echo {mark}-df; df -Pk . | tail -1\n")
        res = self.session.run_standalone(script, input=b"".join(d.encode() + b"\0" for d in dirs))
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
        files = _sizes(parts.get("files", []))
        try:
            free = int(parts.get("df", [""])[0].split()[3]) * 1024
        except (IndexError, ValueError):
            free = None
        self._survey = {"journal": parts.get("journal", []), "files": files, "free": free, "dirs": set(dirs)}
        return "absent"

    def _listing(self, root: str) -> dict[str, int]:
        res = self.session.run(f"cd {self._q(root)} 2>/dev/null && find . -type f -printf '%s %P\\n' || true",
                               timeout=600)
        return _sizes(res.stdout.splitlines())

    def _sha256sum(self, root: str, keys: list[str]) -> dict[str, str]:
        if not keys:
            return {}
        data = b"".join(k.encode() + b"\0" for k in keys)
        res = self.session.run(f"cd {self._q(root)} && xargs -0 sha256sum --", input=data, timeout=3600, check=False)
        out = {}
        for line in res.stdout.splitlines():
            digest, _, rel = line.partition("  ")
            if rel:
                out[rel] = digest.lstrip("\\")
        return out

    def prepare(self, manifest: Manifest, workers: int = 4) -> set[str]:
        """The objects already in the partial folder and correct (``state`` has looked)."""
        if self._survey is None and self.state(manifest) != "absent":     # ``stage`` asks ``state`` first
            raise TransferError(f"{self}: the destination appeared while the stage was preparing")
        survey = self._survey
        journal: dict[str, dict] = {}
        for line in survey["journal"]:
            try:
                rec = json.loads(line)
                journal[rec["k"]] = rec
            except (ValueError, KeyError, TypeError):
                continue       # a line cut short by a kill
        wanted = manifest.by_key()
        done: set[str] = set()
        stale: list[str] = []
        to_hash: list[str] = []
        for rel, size in survey["files"].items():
            if rel == JOURNAL_NAME:
                continue
            e = wanted.get(rel)
            if e is None or _is_part(rel) or size != e.size:
                stale.append(rel)
                continue
            rec = journal.get(rel)
            if rec and rec.get("h") == e.sha256 and rec.get("s") == e.size:
                done.add(rel)
            else:
                to_hash.append(rel)
        for rel, digest in self._sha256sum(self.partial, to_hash).items():
            if digest == wanted[rel].sha256:
                done.add(rel)
                self.record(wanted[rel], None)
            else:
                stale.append(rel)
        if stale:
            data = b"".join(k.encode() + b"\0" for k in stale)
            self.session.run(f"cd {self._q(self.partial)} && xargs -0 rm -f --", input=data, timeout=600)
        return done

    def free_bytes(self) -> int | None:
        return self._survey["free"] if self._survey is not None else None

    def makedirs(self, keys: list[str]) -> None:
        dirs = sorted({str(PurePosixPath(k).parent) for k in keys} - {"."}
                      - (self._survey["dirs"] if self._survey is not None else set()))
        if dirs:
            data = b"".join(d.encode() + b"\0" for d in dirs)
            res = self.session.run(f"cd {self._q(self.partial)} && xargs -0 mkdir -p --", input=data,
                                   timeout=600, check=False)
            if res.rc != 0:
                raise self._failed("creating folders", res.stderr)

    def writer(self, entry: Entry, ranged: bool = False) -> SftpPart:
        return SftpPart(self, entry)

    def record(self, entry: Entry, stamp: int | None, wire=None) -> None:
        """A journal line: through ``wire`` (appended on the site, in flight) when there is one."""
        line = (json.dumps({"k": entry.key, "s": entry.size, "h": entry.sha256}) + "\n").encode()
        if wire is not None:
            wire.append_line(self.journal_path, line)
            return
        with self._lock:
            if self._journal is None:
                self._journal = self.session.open_writer(self.journal_path, append=True)
            self._journal.write(line)

    def close(self, drain: bool = True) -> None:
        """``drain``: wait for the site's answers to everything sent (raising what it refused)."""
        if drain:
            self.session.sync_wires()
        with self._lock:
            if self._journal is not None:
                try:
                    self._journal.close()
                except Exception:  # noqa: BLE001 - a journal line lost costs a re-check, no more
                    pass
                self._journal = None

    def finish(self, manifest: Manifest) -> None:
        """The manifest written aside and renamed, the journal dropped, then the folder renamed into
        place: over one of the push's wires, already open (paramiko's session is not needed for a
        fresh push at all), else as one command."""
        self.close()
        tmp = f"{self.partial}/.{MANIFEST_NAME}.tmp"
        wire = self.session.idle_wire(self.server)
        if wire is not None:
            try:
                up = wire.upload(tmp)
                up.write(manifest.to_json().encode())
                up.commit(f"{self.partial}/{MANIFEST_NAME}", lambda: None)
                wire.remove(self.journal_path, missing_ok=True)      # answered after the rename's
                wire.rename(self.partial, self.dest)                 # only once those succeeded
            except OSError as exc:
                raise disk_error(exc, str(self)) from None
            return
        script = (f"umask 022 && cat > {self._q(tmp)} && mv -f {self._q(tmp)} {self._q(self.partial + '/' + MANIFEST_NAME)}"
                  f" && rm -f {self._q(self.journal_path)} && mv -T {self._q(self.partial)} {self._q(self.dest)}")
        res = self.session.run(script, input=manifest.to_json().encode(), timeout=600, check=False)
        if res.rc != 0:
            raise self._failed("publishing the staged folder", res.stderr)

    def verify(self, manifest: Manifest, workers: int = 4) -> tuple[list[str], list[str]]:
        listing = self._listing(self.dest)
        listing.pop(MANIFEST_NAME, None)
        wanted = manifest.by_key()
        present = [k for k in wanted if listing.get(k) == wanted[k].size]
        sums = self._sha256sum(self.dest, present)
        bad = [k for k, e in wanted.items() if sums.get(k) != e.sha256]
        extra = sorted(k for k in listing if k not in wanted)
        return bad, extra

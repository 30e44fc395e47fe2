"""maelflow's own SFTP server for a push's wires: run on the site, it writes objects with O_DIRECT.

Why not the site's ``sftp-server``: OpenSSH's writes every byte through the page cache. On a login
node that evicts everyone else's cached files for a dataset of terabytes, and allocating and
filling those pages can cost more CPU than the cipher (measured here: 2.4 s of system time per GiB
into fresh pages, 0.3 s with O_DIRECT). This server speaks the subset of SFTP v3 that
``sftp_wire.SftpWire`` sends (open, write, close, remove, mkdir, rename, posix-rename) over the
ssh channel's stdin/stdout, started by the site's own maelflow, exactly as rsync starts its remote
half. Anything else is answered "unsupported", and a site without maelflow gets OpenSSH's server
instead (the wire falls back by itself).

Two threads. The reader takes the channel: message heads in small reads, write data straight
into page-aligned 1 MiB buffers (reused for every file: fresh ones would pay their page faults
again), one per file being written. Everything that touches the disk, and every answer, is a job
for the executor, which runs them in order: full blocks written with O_DIRECT, a file's last
block and its unaligned tail at its close, renames after the closes before them. So the reader
never waits for the disk (an O_DIRECT write of an object's last block would otherwise stall the
channel once per object) until a few blocks are waiting for it, and the answers still go out in
the order of the requests, as the wire requires. The executor also hashes each file as it writes
it in sequence, for ``commit@maelflow``: the object is renamed into place only if its size and
SHA-256 are the manifest's, else removed (the check is of what reached the site's disk, and the
pushing side's cores are spared it). A write is answered once its data is taken; a
failure to write it (a full disk) is the answer to the file's next write or its close, so an
object is never confirmed unless all of it reached the file. Writes out of sequence, append
handles and file systems without O_DIRECT use ordinary writes. Standard library only: it runs in
whatever Python the site's maelflow has, before any of maelflow's dependencies is imported.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import mmap
import os
import queue
import sys
import threading

_INIT, _VERSION, _OPEN, _CLOSE, _WRITE, _REMOVE, _MKDIR, _RENAME = 1, 2, 3, 4, 6, 13, 14, 18
_STATUS, _HANDLE, _EXTENDED = 101, 102, 200
_FXF_WRITE, _FXF_APPEND, _FXF_CREAT, _FXF_TRUNC, _FXF_EXCL = 0x02, 0x04, 0x08, 0x10, 0x20
_OK, _EOF, _NO_SUCH_FILE, _PERMISSION_DENIED, _FAILURE, _BAD_MESSAGE, _OP_UNSUPPORTED = 0, 1, 2, 3, 4, 5, 8
_ATTR_SIZE, _ATTR_UIDGID, _ATTR_PERMISSIONS, _ATTR_ACMODTIME, _ATTR_EXTENDED = 0x1, 0x2, 0x4, 0x8, 0x80000000
BLOCK = 1 << 20            # one O_DIRECT write
ALIGN = 4096
OPEN_AS = b"open-as@maelflow"   # OPEN with a handle the client chose ("c..."): it writes without waiting
COMMIT = b"commit@maelflow"     # rename a closed file into place only if its size and SHA-256 are these
MISMATCH = "maelflow-mismatch"  # how a COMMIT whose file differs is answered (a FAILURE status's message)
MAX_MESSAGE = 1 << 24      # the wire sends 1 MiB writes; anything far larger is a broken stream


class Protocol(Exception):
    """The stream is not SFTP as the wire speaks it: the server stops."""


def _status_code(exc: OSError) -> int:
    if exc.errno == errno.ENOENT:
        return _NO_SUCH_FILE
    if exc.errno in (errno.EACCES, errno.EPERM):
        return _PERMISSION_DENIED
    return _FAILURE


class _Reader:
    """Reads the channel: message heads in small exact reads, write data straight into buffers."""

    def __init__(self, fd: int):
        self.fd = fd

    def into(self, view: memoryview) -> None:
        while len(view):
            n = os.readv(self.fd, [view])
            if n == 0:
                raise EOFError
            view = view[n:]

    def exact(self, n: int) -> bytes:
        buf = bytearray(n)
        self.into(memoryview(buf))
        return bytes(buf)


class _Pool:
    """Page-aligned blocks, reused; at most ``waiting`` full ones queued for the disk before the
    reader waits too (back-pressure down the channel)."""

    def __init__(self, waiting: int = 8) -> None:
        self.free: list[mmap.mmap] = []
        self.lock = threading.Condition()
        self.queued, self.waiting = 0, waiting

    def take(self) -> mmap.mmap:
        with self.lock:
            return self.free.pop() if self.free else mmap.mmap(-1, BLOCK)

    def give(self, buf: mmap.mmap) -> None:
        with self.lock:
            self.free.append(buf)

    def queue_one(self) -> None:
        with self.lock:
            self.lock.wait_for(lambda: self.queued < self.waiting)
            self.queued += 1

    def done_one(self) -> None:
        with self.lock:
            self.queued -= 1
            self.lock.notify_all()


class _File:
    """One open file. The reader fills ``buf``; the executor owns ``fd`` and sets ``error``, the
    first failure of a write already answered, reported at the file's next answer."""

    def __init__(self, path: str, append: bool):
        self.path, self.append = path, append
        self.fd = -1
        self.direct = False
        self.error: OSError | None = None
        self.buf: mmap.mmap | None = None
        self.base = self.fill = 0          # file offset of buf[0]; bytes in buf (the reader's)
        self.sequential = not append       # every write so far continued the previous one
        self.sha = hashlib.sha256()        # of the bytes written, in order (the executor's), while sequential
        self.hashed = 0                    # bytes in ``sha``; -1 once a write broke the sequence

    # -- executor side ----------------------------------------------------------------------------
    def hash(self, data, offset: int) -> None:
        """Bytes about to be written at ``offset``: the digest covers the file while it is written
        in sequence from its start; a gap or a rewrite voids it (a COMMIT then reads the file)."""
        if self.hashed >= 0 and offset == self.hashed:
            self.sha.update(data)
            self.hashed += len(data)
        else:
            self.hashed = -1

    def write_out(self, data, offset: int) -> None:
        view = memoryview(data)
        while len(view):
            n = os.pwrite(self.fd, view, offset)
            view, offset = view[n:], offset + n

    def no_direct(self) -> None:
        if self.direct:
            self.direct = False
            fcntl.fcntl(self.fd, fcntl.F_SETFL, fcntl.fcntl(self.fd, fcntl.F_GETFL) & ~os.O_DIRECT)

    def put(self, data, offset: int, direct: bool) -> None:
        """Write ``data`` at ``offset``: O_DIRECT if it is aligned and the file allows, else not."""
        if self.error is not None or self.fd < 0:
            return
        try:
            if not direct:
                self.no_direct()
            try:
                self.write_out(data, offset)
            except OSError as exc:
                if exc.errno != errno.EINVAL or not self.direct:
                    raise
                self.no_direct()                    # opens O_DIRECT but refuses its writes
                self.write_out(data, offset)
        except OSError as exc:
            self.error = exc


class Server:
    def __init__(self, fd_in: int, fd_out: int):
        self.reader = _Reader(fd_in)
        self.out = fd_out
        self.files: dict[bytes, _File] = {}        # the reader's view of the open handles
        self.digests: dict[str, tuple[int, str] | None] = {}   # closed files' (size, SHA-256), the executor's
        self.handles = 0
        self.pool = _Pool()
        self.jobs: queue.Queue = queue.Queue()
        self.executor = threading.Thread(target=self._execute, name="sftp-server-disk", daemon=True)
        self.executor.start()

    # -- executor ----------------------------------------------------------------------------------
    def _execute(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            job()

    def _later(self, job) -> None:
        self.jobs.put(job)

    def _send(self, kind: int, payload: bytes) -> None:
        msg = (len(payload) + 1).to_bytes(4, "big") + bytes([kind]) + payload
        view = memoryview(msg)
        try:
            while len(view):
                view = view[os.write(self.out, view):]
        except OSError:
            pass            # the channel is gone: the reader sees its end and stops

    def _status(self, rid: int, code: int, message: str = "") -> None:
        text = (message or ("Success" if code == _OK else "Failure")).encode()
        self._send(_STATUS, _u32(rid) + _u32(code) + _u32(len(text)) + text + _u32(0))

    def _fail(self, rid: int, exc: OSError) -> None:
        self._status(rid, _status_code(exc), exc.strerror or str(exc))

    def _answer(self, rid: int, op) -> None:
        """A job: ``op()`` then its status (its own OSError as the failure)."""
        def job() -> None:
            try:
                op()
            except OSError as exc:
                self._fail(rid, exc)
                return
            self._status(rid, _OK)
        self._later(job)

    def _commit(self, rid: int, tmp: str, target: str, size: int, digest: str) -> None:
        """A job: ``tmp`` (closed) renamed to ``target`` if it holds ``size`` bytes with this SHA-256;
        else removed, and the answer says what it held. The digest of a file written in sequence
        was taken as it was written; any other is read back."""
        try:
            got = self.digests.pop(tmp, None)
            if got is None:
                got = _file_digest(tmp)
            if got == (size, digest):
                os.rename(tmp, target)
                self._status(rid, _OK)
                return
            try:
                os.unlink(tmp)
            except OSError:
                pass
            self._status(rid, _FAILURE, f"{MISMATCH}: {tmp} held {got[0]} bytes with SHA-256 {got[1]}")
        except OSError as exc:
            self._fail(rid, exc)

    # -- reader ------------------------------------------------------------------------------------
    def serve(self) -> None:
        try:
            while True:
                try:
                    head = self.reader.exact(5)
                except EOFError:
                    return
                length, kind = int.from_bytes(head[:4], "big"), head[4]
                if length < 1 or length > MAX_MESSAGE:
                    raise Protocol(f"message of {length} bytes")
                if kind == _WRITE:
                    self._write(length - 1)
                    continue
                body = self.reader.exact(length - 1)
                self._dispatch(kind, _Body(body))
        finally:
            for handle in list(self.files):
                self._close(None, handle)
            self.jobs.put(None)
            self.executor.join()

    def _dispatch(self, kind: int, body: "_Body") -> None:
        if kind == _INIT:
            ext = (_str(b"posix-rename@openssh.com") + _str(b"1") + _str(b"max-write@maelflow")
                   + _str(str(BLOCK).encode()) + _str(OPEN_AS) + _str(b"1") + _str(COMMIT) + _str(b"1"))
            self._later(lambda: self._send(_VERSION, _u32(3) + ext))
            return
        rid = body.u32()
        if kind == _OPEN:
            path, pflags = body.text(), body.u32()
            self._open(rid, path, pflags, body.attrs().get("mode", 0o666))
        elif kind == _CLOSE:
            self._close(rid, body.string())
        elif kind == _REMOVE:
            path = body.text()
            self._answer(rid, lambda: (self.digests.pop(path, None), os.unlink(path)))
        elif kind == _MKDIR:
            path, mode = body.text(), body.attrs().get("mode", 0o777) & 0o7777
            self._answer(rid, lambda: os.mkdir(path, mode))
        elif kind == _RENAME:                          # v3 semantics: never over an existing name
            old, new = body.text(), body.text()

            def rename() -> None:
                if os.path.lexists(new):
                    raise FileExistsError(errno.EEXIST, f"{new} exists", new)
                self.digests.pop(old, None)
                os.rename(old, new)
            self._answer(rid, rename)
        elif kind == _EXTENDED:
            name = body.string()
            if name == b"posix-rename@openssh.com":
                old, new = body.text(), body.text()
                self._answer(rid, lambda: (self.digests.pop(old, None), os.rename(old, new)))
            elif name == COMMIT:                    # tmp, target, size, SHA-256 (hex)
                tmp, target, size, digest = body.text(), body.text(), body.u64(), body.string().decode()
                self._later(lambda: self._commit(rid, tmp, target, size, digest))
            elif name == OPEN_AS:                   # handle, path, pflags, attrs: no HANDLE to wait for
                handle, path, pflags = body.string(), body.text(), body.u32()
                if handle in self.files or not handle.startswith(b"c"):
                    self._later(lambda: self._status(rid, _FAILURE, "handle in use"))
                    return
                self._open(rid, path, pflags, body.attrs().get("mode", 0o666), handle)
            else:
                self._later(lambda: self._status(rid, _OP_UNSUPPORTED, "not supported by maelflow's SFTP server"))
        else:
            self._later(lambda: self._status(rid, _OP_UNSUPPORTED, "not supported by maelflow's SFTP server"))

    def _open(self, rid: int, path: str, pflags: int, mode: int, handle: bytes | None = None) -> None:
        """OPEN answers the handle it makes; OPEN_AS takes the client's, answers a status."""
        if not pflags & _FXF_WRITE:
            self._later(lambda: self._status(rid, _OP_UNSUPPORTED, "maelflow's SFTP server only writes files"))
            return
        flags = os.O_WRONLY
        flags |= os.O_CREAT if pflags & _FXF_CREAT else 0
        flags |= os.O_TRUNC if pflags & _FXF_TRUNC else 0
        flags |= os.O_EXCL if pflags & _FXF_EXCL else 0
        append = bool(pflags & _FXF_APPEND)
        flags |= os.O_APPEND if append else 0
        chosen = handle is not None
        if handle is None:
            self.handles += 1
            handle = str(self.handles).encode()
        f = self.files[handle] = _File(path, append)

        def job() -> None:
            try:
                if not append and hasattr(os, "O_DIRECT"):
                    try:
                        f.fd, f.direct = os.open(path, flags | os.O_DIRECT, mode & 0o7777), True
                    except OSError as exc:
                        if exc.errno != errno.EINVAL:      # EINVAL: this file system has no O_DIRECT
                            raise
                if f.fd < 0:
                    f.fd = os.open(path, flags, mode & 0o7777)
            except OSError as exc:
                f.error = exc
                self._fail(rid, exc)
                return
            if chosen:
                self._status(rid, _OK)
            else:
                self._send(_HANDLE, _u32(rid) + _str(handle))
        self._later(job)

    def _write(self, length: int) -> None:
        fixed = self.reader.exact(8)                     # id, handle length
        rid, hlen = int.from_bytes(fixed[:4], "big"), int.from_bytes(fixed[4:], "big")
        if hlen > 256 or 8 + hlen + 12 > length + 4:
            raise Protocol("malformed WRITE")
        rest = self.reader.exact(hlen + 12)
        handle = rest[:hlen]
        offset = int.from_bytes(rest[hlen:hlen + 8], "big")
        n = int.from_bytes(rest[hlen + 8:], "big")
        if 4 + 4 + hlen + 12 + n != length:
            raise Protocol("WRITE length does not match its message")
        f = self.files.get(handle)
        if f is None:
            self.reader.exact(n)
            self._later(lambda: self._status(rid, _FAILURE, "no such handle"))
            return
        if f.sequential and offset == f.base + f.fill:
            while n:
                if f.buf is None:
                    f.buf = self.pool.take()
                k = min(n, BLOCK - f.fill)
                self.reader.into(memoryview(f.buf)[f.fill:f.fill + k])
                f.fill += k
                n -= k
                if f.fill == BLOCK:
                    self._flush(f)
        else:
            data = self.reader.exact(n)                  # read whole first: the stream stays in step
            self._flush(f)
            f.sequential = False
            def job() -> None:
                if f.append:
                    _append(f, data)
                else:
                    f.hash(data, offset)
                    f.put(data, offset, direct=False)
            self._later(job)

        def answer() -> None:
            if f.error is not None:
                self._fail(rid, f.error)
            else:
                self._status(rid, _OK)
        self._later(answer)

    def _flush(self, f: _File) -> None:
        """What the file's buffer holds to the disk (a full block, or what is left at its close or
        before an out-of-sequence write): its aligned part O_DIRECT, an unaligned tail not."""
        if f.buf is None:
            return
        buf, base, fill = f.buf, f.base, f.fill
        f.buf, f.base, f.fill = None, base + fill, 0
        aligned = fill - fill % ALIGN
        self.pool.queue_one()

        def job() -> None:
            try:
                f.hash(memoryview(buf)[:fill], base)
                if aligned:
                    f.put(memoryview(buf)[:aligned], base, direct=True)
                if fill > aligned:
                    f.put(memoryview(buf)[aligned:fill], base + aligned, direct=False)
            finally:
                self.pool.give(buf)
                self.pool.done_one()
        self._later(job)

    def _close(self, rid: int | None, handle: bytes) -> None:
        f = self.files.pop(handle, None)
        if f is None:
            if rid is not None:
                self._later(lambda: self._status(rid, _FAILURE, "no such handle"))
            return
        self._flush(f)

        def job() -> None:
            if f.fd >= 0:
                try:
                    os.close(f.fd)
                except OSError as exc:
                    f.error = f.error or exc
                f.fd = -1
                if f.error is None and not f.append:
                    self.digests[f.path] = (f.hashed, f.sha.hexdigest()) if f.hashed >= 0 else None
            if rid is None:
                return
            if f.error is not None:
                self._fail(rid, f.error)
            else:
                self._status(rid, _OK)
        self._later(job)


def _file_digest(path: str) -> tuple[int, str]:
    sha, size = hashlib.sha256(), 0
    with open(path, "rb") as fh:
        while chunk := fh.read(BLOCK):
            sha.update(chunk)
            size += len(chunk)
    return size, sha.hexdigest()


def _append(f: _File, data: bytes) -> None:
    if f.error is not None or f.fd < 0:
        return
    try:
        view = memoryview(data)
        while len(view):
            view = view[os.write(f.fd, view):]
    except OSError as exc:
        f.error = exc


class _Body:
    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def _take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise Protocol("message cut short")
        v = self.data[self.pos:self.pos + n]
        self.pos += n
        return v

    def u32(self) -> int:
        return int.from_bytes(self._take(4), "big")

    def u64(self) -> int:
        return int.from_bytes(self._take(8), "big")

    def string(self) -> bytes:
        return self._take(self.u32())

    def text(self) -> str:
        return os.fsdecode(self.string())

    def attrs(self) -> dict:
        flags, out = self.u32(), {}
        if flags & _ATTR_SIZE:
            self.pos += 8
        if flags & _ATTR_UIDGID:
            self.pos += 8
        if flags & _ATTR_PERMISSIONS:
            out["mode"] = self.u32()
        if flags & _ATTR_ACMODTIME:
            self.pos += 8
        if flags & _ATTR_EXTENDED:
            for _ in range(self.u32()):
                self.string()
                self.string()
        return out


def _u32(v: int) -> bytes:
    return (v & 0xFFFFFFFF).to_bytes(4, "big")


def _str(raw: bytes) -> bytes:
    return _u32(len(raw)) + raw


def main() -> int:
    """Serve the channel on stdin/stdout from the login directory, as OpenSSH's sftp-server does."""
    os.chdir(os.path.expanduser("~"))
    fd_in, fd_out = sys.stdin.fileno(), sys.stdout.fileno()
    for fd in (fd_in, fd_out):
        try:    # sshd's pipes hold 64 KiB: a whole block per wake-up instead
            fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, BLOCK)
        except (OSError, AttributeError):
            pass
    sys.stdout = sys.stderr                               # nothing else may write into the channel
    try:
        Server(fd_in, fd_out).serve()
    except Protocol as exc:
        print(f"maelflow sftp-server: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""maelflow's own SFTP server for a push's wires: run on the site, it writes objects with O_DIRECT.

Why not the site's ``sftp-server``: OpenSSH's writes every byte through the page cache. On a login
node that evicts everyone else's cached files for a dataset of terabytes, and allocating and
filling those pages costs more CPU than the cipher (measured here: 2.4 s of system time per GiB
into fresh pages, 0.3 s with O_DIRECT). This server speaks the subset of SFTP v3 that
``sftp_wire.SftpWire`` sends (open, write, close, remove, mkdir, rename, posix-rename) over the
ssh channel's stdin/stdout, started as ``maelflow transfer sftp-server`` by the site's own
maelflow, exactly as rsync starts its remote half. Anything else is answered "unsupported", and
a site without maelflow gets OpenSSH's server instead (the wire falls back by itself).

Each file being written collects the incoming data in a page-aligned 1 MiB buffer that is written
with O_DIRECT when full, while the next one fills (one writer thread: the disk and the pipe work
at once); the unaligned tail goes through the page cache at close. A write is answered once it is
buffered; a failure to write it (a full disk) is answered to the file's next write or its close,
so an object is never confirmed unless all of it reached the file. Writes that are not in
sequence, and file systems without O_DIRECT, use ordinary writes. Standard library only: it runs
in whatever Python the site's maelflow has, before any of maelflow's dependencies is imported.
"""

from __future__ import annotations

import errno
import fcntl
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
MAX_MESSAGE = 1 << 24      # the wire sends 255 KiB writes; anything far larger is a broken stream


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


class _Blocks(threading.Thread):
    """Writes full blocks while the reader fills the next. The page-aligned buffers are reused for
    every file (a fresh one per file would pay its page faults again); at most ``in_flight`` wait
    for the disk before the reader waits too."""

    def __init__(self, in_flight: int = 3) -> None:
        super().__init__(name="sftp-server-writer", daemon=True)
        self.jobs: queue.Queue = queue.Queue()
        self.free: queue.Queue = queue.Queue()
        self.in_flight, self.limit = 0, in_flight
        self.lock = threading.Lock()

    def take(self) -> mmap.mmap:
        try:
            return self.free.get_nowait()
        except queue.Empty:
            pass
        with self.lock:
            behind = self.in_flight >= self.limit
        if behind:                          # the disk is behind: stop reading the channel until a
            return self.free.get()          # block is written (one of those in flight comes back)
        return mmap.mmap(-1, BLOCK)

    def ship(self, f: "_File", buf: mmap.mmap, offset: int, length: int) -> None:
        with self.lock:
            self.in_flight += 1
        self.jobs.put((f, buf, offset, length))

    def run(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            f, buf, offset, length = job
            try:
                if f.error is None:
                    try:
                        f.write_out(memoryview(buf)[:length], offset)
                    except OSError as exc:
                        if exc.errno != errno.EINVAL:       # a file system that opens O_DIRECT but
                            raise                           # refuses its writes: the page cache then
                        f.no_direct()
                        f.write_out(memoryview(buf)[:length], offset)
            except OSError as exc:
                f.error = exc
            finally:
                with self.lock:
                    self.in_flight -= 1
                self.free.put(buf)
                with f.cond:
                    f.pending -= 1
                    f.cond.notify_all()


class _File:
    """One open file. ``error``: the first failure of a write already answered, reported next."""

    def __init__(self, path: str, fd: int, direct: bool, append: bool, blocks: _Blocks):
        self.path, self.fd, self.direct, self.append = path, fd, direct, append
        self.blocks = blocks
        self.error: OSError | None = None
        self.cond = threading.Condition()
        self.pending = 0                   # blocks given to the writer thread, not yet written
        self.buf: mmap.mmap | None = None
        self.base = self.fill = 0          # file offset of buf[0]; bytes in buf

    def write_out(self, data: memoryview, offset: int) -> None:
        while len(data):
            n = os.pwrite(self.fd, data, offset)
            data, offset = data[n:], offset + n

    def _ship(self) -> None:
        """The buffer's aligned part to the writer thread; its unaligned rest moves to the next."""
        aligned = self.fill - self.fill % ALIGN
        if self.buf is None or not aligned:
            return
        nxt, rest = self.blocks.take(), self.fill - aligned
        if rest:
            nxt[:rest] = self.buf[aligned:self.fill]
        with self.cond:
            self.pending += 1
        self.blocks.ship(self, self.buf, self.base, aligned)
        self.buf, self.base, self.fill = nxt, self.base + aligned, rest

    def _drain(self) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self.pending == 0)

    def no_direct(self) -> None:
        fcntl.fcntl(self.fd, fcntl.F_SETFL, fcntl.fcntl(self.fd, fcntl.F_GETFL) & ~os.O_DIRECT)

    def _buffered(self) -> None:
        """From here on ordinary writes: the unaligned tail, writes out of sequence, no O_DIRECT."""
        if self.direct:
            self._ship()
            self._drain()
            self.direct = False
            self.no_direct()
        if self.buf is not None:
            if self.fill and self.error is None:
                self.write_out(memoryview(self.buf)[:self.fill], self.base)
            self.base, self.fill = self.base + self.fill, 0
            self.blocks.free.put(self.buf)
            self.buf = None

    def write(self, offset: int, length: int, reader: _Reader) -> None:
        """Take ``length`` bytes of the channel for ``offset``; raises a failure to report."""
        if self.direct and offset == self.base + self.fill:
            if self.buf is None:
                self.buf = self.blocks.take()
            view = memoryview(self.buf)
            while length:
                k = min(length, BLOCK - self.fill)
                reader.into(view[self.fill:self.fill + k])
                self.fill += k
                length -= k
                if self.fill == BLOCK:
                    self._ship()
                    view = memoryview(self.buf)
        else:
            data = memoryview(reader.exact(length))          # read whole first: the stream stays in step
            if self.error is None:
                try:
                    self._buffered()
                    if self.append:
                        while len(data):
                            data = data[os.write(self.fd, data):]
                    else:
                        self.write_out(data, offset)
                except OSError as exc:
                    self.error = exc
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        try:
            self._buffered()
        except OSError as exc:
            self.error = self.error or exc
        finally:
            os.close(self.fd)
        if self.error is not None:
            raise self.error


class Server:
    def __init__(self, fd_in: int, fd_out: int):
        self.reader = _Reader(fd_in)
        self.out = fd_out
        self.files: dict[bytes, _File] = {}
        self.handles = 0
        self.blocks = _Blocks()
        self.blocks.start()

    # -- answers -------------------------------------------------------------------------------
    def _send(self, kind: int, payload: bytes) -> None:
        msg = (len(payload) + 1).to_bytes(4, "big") + bytes([kind]) + payload
        view = memoryview(msg)
        while len(view):
            view = view[os.write(self.out, view):]

    def _status(self, rid: int, code: int, message: str = "") -> None:
        text = (message or ("Success" if code == _OK else "Failure")).encode()
        self._send(_STATUS, _u32(rid) + _u32(code) + _u32(len(text)) + text + _u32(0))

    def _fail(self, rid: int, exc: OSError) -> None:
        self._status(rid, _status_code(exc), exc.strerror or str(exc))

    # -- requests ------------------------------------------------------------------------------
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
            for f in list(self.files.values()):
                try:
                    f.close()
                except OSError:
                    pass
            self.files.clear()
            self.blocks.jobs.put(None)

    def _dispatch(self, kind: int, body: "_Body") -> None:
        if kind == _INIT:
            self._send(_VERSION, _u32(3) + _str(b"posix-rename@openssh.com") + _str(b"1")
                       + _str(b"max-write@maelflow") + _str(str(BLOCK).encode()))
            return
        rid = body.u32()
        try:
            if kind == _OPEN:
                path, pflags = body.text(), body.u32()
                mode = body.attrs().get("mode", 0o666)
                self._open(rid, path, pflags, mode)
            elif kind == _CLOSE:
                f = self.files.pop(body.string(), None)
                if f is None:
                    self._status(rid, _FAILURE, "no such handle")
                    return
                f.close()
                self._status(rid, _OK)
            elif kind == _REMOVE:
                os.unlink(body.text())
                self._status(rid, _OK)
            elif kind == _MKDIR:
                path = body.text()
                os.mkdir(path, body.attrs().get("mode", 0o777) & 0o7777)
                self._status(rid, _OK)
            elif kind == _RENAME:                      # v3 semantics: never over an existing name
                old, new = body.text(), body.text()
                if os.path.lexists(new):
                    self._status(rid, _FAILURE, f"{new} exists")
                    return
                os.rename(old, new)
                self._status(rid, _OK)
            elif kind == _EXTENDED and body.string() == b"posix-rename@openssh.com":
                os.rename(body.text(), body.text())
                self._status(rid, _OK)
            else:
                self._status(rid, _OP_UNSUPPORTED, "not supported by maelflow's SFTP server")
        except OSError as exc:
            self._fail(rid, exc)

    def _open(self, rid: int, path: str, pflags: int, mode: int) -> None:
        if not pflags & _FXF_WRITE:
            self._status(rid, _OP_UNSUPPORTED, "maelflow's SFTP server only writes files")
            return
        flags = os.O_WRONLY
        flags |= os.O_CREAT if pflags & _FXF_CREAT else 0
        flags |= os.O_TRUNC if pflags & _FXF_TRUNC else 0
        flags |= os.O_EXCL if pflags & _FXF_EXCL else 0
        append = bool(pflags & _FXF_APPEND)
        flags |= os.O_APPEND if append else 0
        direct = not append and hasattr(os, "O_DIRECT")
        fd = -1
        if direct:
            try:
                fd = os.open(path, flags | os.O_DIRECT, mode & 0o7777)
            except OSError as exc:
                if exc.errno != errno.EINVAL:          # EINVAL: this file system has no O_DIRECT
                    raise
                direct = False
        if fd < 0:
            fd = os.open(path, flags, mode & 0o7777)
        self.handles += 1
        handle = str(self.handles).encode()
        self.files[handle] = _File(path, fd, direct, append, self.blocks)
        self._send(_HANDLE, _u32(rid) + _str(handle))

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
            self._status(rid, _FAILURE, "no such handle")
            return
        try:
            f.write(offset, n, self.reader)
            self._status(rid, _OK)
        except OSError as exc:
            self._fail(rid, exc)


class _Body:
    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def u32(self) -> int:
        if self.pos + 4 > len(self.data):
            raise Protocol("message cut short")
        v = int.from_bytes(self.data[self.pos:self.pos + 4], "big")
        self.pos += 4
        return v

    def string(self) -> bytes:
        n = self.u32()
        if self.pos + n > len(self.data):
            raise Protocol("string cut short")
        v = self.data[self.pos:self.pos + n]
        self.pos += n
        return v

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

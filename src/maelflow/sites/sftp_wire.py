"""SFTP over an OpenSSH ``ssh`` subprocess, pipelined: the bulk path of a dataset push.

paramiko does the SSH cipher and packet work in Python (about 100 MB/s for a push here); the OpenSSH
client does it in C, and this side only frames SFTP messages into a pipe. The server at the other
end is maelflow's own on the site (``sftp_server.py``: O_DIRECT, 1 MiB writes, handles chosen here)
where the site's maelflow starts it, else OpenSSH's ``sftp`` subsystem (``fallback``).

Nothing waits on the site per object: an object is opened, written (255 KiB messages for
OpenSSH's server, 1 MiB for maelflow's), closed and renamed into place with every request in
flight at once, and the answers are read as they come back (the server answers in order). With
maelflow's server the open carries a handle chosen here (``open-as@maelflow``), so not even the
open's answer is waited for; with OpenSSH's the first write waits for it. An object counts as in
place when the answer to its rename says so: then ``on_done`` runs (the journal line, the
progress), on the thread that owns the wire. A request that fails is raised where it is read back,
naming its path; the wire stays in step. One wire serves one thread.
"""

from __future__ import annotations

import collections
import errno
import fcntl
import itertools
import os
import subprocess
from typing import Callable

# SFTP v3 (draft-ietf-secsh-filexfer-02): the few messages a push needs
_INIT, _VERSION, _OPEN, _CLOSE, _WRITE, _REMOVE, _MKDIR, _RENAME = 1, 2, 3, 4, 6, 13, 14, 18
_STATUS, _HANDLE, _EXTENDED = 101, 102, 200
_FXF_WRITE, _FXF_APPEND, _FXF_CREAT, _FXF_TRUNC = 0x02, 0x04, 0x08, 0x10
_FX_NO_SUCH_FILE, _FX_PERMISSION_DENIED = 2, 3
OPENSSH_CIPHERS = "aes128-gcm@openssh.com,aes256-gcm@openssh.com,chacha20-poly1305@openssh.com,aes128-ctr,aes256-ctr"
# curve25519 ahead of the client's defaults: OpenSSH 9's first choice, the post-quantum hybrid
# sntrup761x25519, costs 0.1 s more per connection here (0.25 s against 0.15 s for `ssh host true`),
# and a push opens one connection per core; a server that offers only the hybrid still gets it
OPENSSH_KEX = "^curve25519-sha256,curve25519-sha256@libssh.org"
PIPE_SIZE = 1 << 20
MAX_WRITE_EXTENSION = "max-write@maelflow"     # maelflow's server: the WRITE size it takes (decimal)
OPEN_AS_EXTENSION = "open-as@maelflow"         # maelflow's server: OPEN with a handle the client chose
COMMIT_EXTENSION = "commit@maelflow"           # maelflow's server: rename only if size and SHA-256 match
MISMATCH = "maelflow-mismatch"                 # its answer's message when they did not
MAX_ANSWER = 1 << 20      # answers are statuses and handles: a longer one is not SFTP


class WireLost(ConnectionError):
    """The ssh process is gone or the conversation is out of step; the next ``sftp_wire()`` opens
    a new one. Its stderr's last line says why (credentials, host key, network)."""


def sftp_path(path: str) -> str:
    """SFTP paths are relative to the login directory; it does not expand ``~`` like a shell."""
    if path == "~":
        return "."
    return path[2:] if path.startswith("~/") else path


def _sstr(data: str | bytes) -> bytes:
    raw = data.encode() if isinstance(data, str) else data
    return len(raw).to_bytes(4, "big") + raw


def _u32(value: int) -> bytes:
    return value.to_bytes(4, "big")


class SftpWire:
    WRITE_CHUNK = 255 * 1024
    WINDOW = 256              # requests in flight before the oldest answer is waited for

    def __init__(self, argv: list[str], target: str, fallback: list[str] | None = None):
        """``fallback``: the argv to start instead when ``argv``'s server dies before it answers
        INIT (maelflow's own server where the site's maelflow lacks it: OpenSSH's subsystem)."""
        self.target = target
        self.fallback = fallback
        self._ids = itertools.count(1)
        self._pending: collections.deque[tuple[int, Callable[[int, bytes], None] | None]] = collections.deque()
        self._inbuf = bytearray()
        self._appenders: dict[str, _Upload] = {}
        self._extensions: dict[str, bytes] | None = None
        self._write_chunk: int | None = None
        self._dead: WireLost | None = None       # gone before INIT could be sent: raised at first use
        self._start(argv)
        try:
            self._send(_INIT, _u32(3))    # the answer is read at first use: the handshake runs meanwhile
        except WireLost as exc:
            if self.fallback:
                self._use_fallback()
            else:
                self._dead = exc

    def _use_fallback(self) -> None:
        """Nothing but INIT was sent: start over with the other server."""
        argv, self.fallback = self.fallback, None
        self._start(argv)
        self._send(_INIT, _u32(3))

    def _start(self, argv: list[str]) -> None:
        self.argv = argv
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     bufsize=0, start_new_session=True)
        self._out, self._in = self.proc.stdin.fileno(), self.proc.stdout.fileno()
        for fd in (self._out, self._in):
            try:    # 1 MiB pipes: ssh takes four writes per wake-up instead of a quarter of one
                fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
            except OSError:
                pass

    @property
    def write_chunk(self) -> int:
        """Bytes per WRITE: 255 KiB (what OpenSSH's sftp-server takes) unless the server says more
        (maelflow's: a whole block, a quarter of the messages and of the work per byte on both sides)."""
        if self._write_chunk is None:
            try:
                n = int(self.extensions.get(MAX_WRITE_EXTENSION, b"0"))
            except ValueError:
                n = 0
            self._write_chunk = min(max(n, self.WRITE_CHUNK), 1 << 24)
        return self._write_chunk

    @property
    def verifies(self) -> bool:
        """The server checks an object's size and SHA-256 before renaming it (``commit(expect=)``)."""
        return COMMIT_EXTENSION in self.extensions

    @property
    def extensions(self) -> dict[str, bytes]:
        """The server's extensions (name: data), from its answer to INIT; a server that dies
        before answering (or answers something else) is replaced by the fallback, once."""
        if self._extensions is None:
            if self._dead is not None:
                raise self._dead
            try:
                body = self._version()
            except WireLost:
                if not self.fallback:
                    raise
                self._use_fallback()
                body = self._version()
            found, pos = {}, 4
            while pos < len(body):
                n = int.from_bytes(body[pos:pos + 4], "big")
                name = body[pos + 4:pos + 4 + n].decode(errors="replace")
                pos += 4 + n
                m = int.from_bytes(body[pos:pos + 4], "big")
                found[name] = body[pos + 4:pos + 4 + m]
                pos += 4 + m
            self._extensions = found
        return self._extensions

    def _version(self) -> bytes:
        kind, body = self._read_message()
        if kind != _VERSION:
            raise self._lost(f"unexpected SFTP answer {kind} to INIT")
        return body

    # -- framing -------------------------------------------------------------------------------
    def _lost(self, what: str) -> WireLost:
        err = b""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stderr is not None:
            err = self.proc.stderr.read() or b""
        detail = err.decode(errors="replace").strip().splitlines()
        return WireLost(f"{self.target}: SFTP {what}" + (f": {detail[-1]}" if detail else ""))

    def _send(self, kind: int, payload: bytes, data: bytes | memoryview = b"",
              spliced: tuple[int, int, int] | None = None) -> None:
        """``spliced`` = (fd, offset, length): the message's data moved from that file into the
        pipe by the kernel (``splice``), never copied through this process; a file that ends
        early is padded with zeros so that the stream stays in step (the server then refuses it)."""
        size = len(data) if spliced is None else spliced[2]
        head = (len(payload) + size + 1).to_bytes(4, "big") + bytes([kind]) + payload
        parts: list = [head, data] if data else [head]
        try:
            while parts:                       # one system call per message, whatever its size
                n = os.writev(self._out, parts)
                while parts and n >= len(parts[0]):
                    n -= len(parts[0])
                    parts.pop(0)
                if parts and n:
                    parts[0] = memoryview(parts[0])[n:]
            if spliced is not None:
                fd, offset, left = spliced
                while left:
                    k = os.splice(fd, self._out, left, offset_src=offset)
                    if not k:
                        zeros = memoryview(bytes(left))
                        while len(zeros):
                            zeros = zeros[os.write(self._out, zeros):]
                        break
                    offset, left = offset + k, left - k
        except (BrokenPipeError, OSError, ValueError):
            raise self._lost("connection closed") from None

    def _read_message(self) -> tuple[int, bytes]:
        buf = self._inbuf
        while True:
            if len(buf) >= 5:
                n = int.from_bytes(buf[:4], "big") + 4
                if n > MAX_ANSWER:
                    raise self._lost("answer too long: is something on the site (a login script) writing "
                                     "into the channel?")
                if len(buf) >= n:
                    kind, body = buf[4], bytes(buf[5:n])
                    del buf[:n]
                    return kind, body
            try:
                chunk = os.read(self._in, 1 << 16)
            except OSError:
                chunk = b""
            if not chunk:
                raise self._lost("connection closed")
            buf += chunk

    def _request(self, kind: int, payload: bytes, data: bytes | memoryview = b"",
                 on_answer: Callable[[int, bytes], None] | None = None,
                 spliced: tuple[int, int, int] | None = None) -> int:
        if self._extensions is None:
            self.extensions                     # the VERSION answer comes before any other
        rid = next(self._ids)
        self._send(kind, _u32(rid & 0xFFFFFFFF) + payload, data, spliced)
        self._pending.append((rid, on_answer))
        while len(self._pending) > self.WINDOW:
            self._answer_next()
        return rid

    def _answer_next(self) -> None:
        kind, body = self._read_message()
        rid, on_answer = self._pending.popleft()
        if int.from_bytes(body[:4], "big") != rid & 0xFFFFFFFF:
            raise self._lost(f"answer out of order (expected {rid & 0xFFFFFFFF})")
        if on_answer is not None:
            on_answer(kind, body[4:])          # may raise: the message is consumed, the wire in step

    def wait(self, rid: int) -> None:
        """Read answers up to and including request ``rid``'s."""
        while self._pending and self._pending[0][0] <= rid:
            self._answer_next()

    def sync(self) -> None:
        """Every request answered: raises the first failure among them."""
        for up in list(self._appenders.values()):
            up.finish()
        self._appenders.clear()
        while self._pending:
            self._answer_next()

    def status_error(self, kind: int, body: bytes, path: str) -> OSError | None:
        if kind != _STATUS:
            return None
        code = int.from_bytes(body[:4], "big")
        if not code:
            return None
        n = int.from_bytes(body[4:8], "big")
        msg = body[8:8 + n].decode(errors="replace")
        if code == _FX_NO_SUCH_FILE:
            return FileNotFoundError(2, msg or "No such file", path)
        if code == _FX_PERMISSION_DENIED:
            return PermissionError(13, msg or "Permission denied", path)
        for err in (errno.ENOSPC, errno.EDQUOT):     # maelflow's server names these (OpenSSH's says "Failure")
            if msg == os.strerror(err):
                return OSError(err, f"{self.target}: SFTP error {code} on {path}: {msg}", path)
        return OSError(f"{self.target}: SFTP error {code} on {path}: {msg}")

    def _call(self, kind: int, payload: bytes, path: str) -> None:
        """A request answered now (folders, single renames): raises what the server refused."""
        failure: list[OSError] = []

        def check(k: int, body: bytes) -> None:
            err = self.status_error(k, body, path)
            if err is not None:
                failure.append(err)
        self.wait(self._request(kind, payload, on_answer=check))
        if failure:
            raise failure[0]

    # -- operations ----------------------------------------------------------------------------
    def upload(self, remote_path: str) -> "_Upload":
        """A file created (or truncated) at ``remote_path`` and written as a stream of chunks."""
        return _Upload(self, sftp_path(remote_path), _FXF_WRITE | _FXF_CREAT | _FXF_TRUNC)

    def append_line(self, remote_path: str, line: bytes) -> None:
        """Append ``line`` to ``remote_path`` (O_APPEND on the site: lines from many wires stay whole)."""
        up = self._appenders.get(remote_path)
        if up is None:
            up = self._appenders[remote_path] = _Upload(self, sftp_path(remote_path),
                                                        _FXF_WRITE | _FXF_CREAT | _FXF_APPEND)
        up.write(line)

    def rename(self, src: str, dst: str, on_done: Callable[[], None] | None = None,
               now: bool = True) -> None:
        a, b = sftp_path(src), sftp_path(dst)

        def check(kind: int, body: bytes) -> None:
            err = self.status_error(kind, body, a)
            if err is not None:
                raise err
            if on_done is not None:
                on_done()
        if "posix-rename@openssh.com" in self.extensions:
            rid = self._request(_EXTENDED, _sstr("posix-rename@openssh.com") + _sstr(a) + _sstr(b), on_answer=check)
        else:
            rid = self._request(_RENAME, _sstr(a) + _sstr(b), on_answer=check)
        if now:
            self.wait(rid)

    def remove(self, remote_path: str, missing_ok: bool = False) -> None:
        path = sftp_path(remote_path)
        try:
            self._call(_REMOVE, _sstr(path), path)
        except FileNotFoundError:
            if not missing_ok:
                raise

    def mkdir(self, remote_path: str) -> None:
        path = sftp_path(remote_path)
        self._call(_MKDIR, _sstr(path) + _u32(0), path)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self) -> None:
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class _Upload:
    """One file being written through a wire; nothing here waits for the site but ``close``."""

    def __init__(self, wire: SftpWire, path: str, flags: int):
        self.wire, self.path = wire, path
        self.handle: bytes | None = None
        self.error: OSError | None = None
        self.offset = 0
        self.done = self.aborted = False
        if OPEN_AS_EXTENSION in wire.extensions:     # maelflow's server: our handle, no answer to wait for
            self.handle = f"c{next(wire._ids)}".encode()
            self._open = wire._request(_EXTENDED, _sstr(OPEN_AS_EXTENSION) + _sstr(self.handle) + _sstr(path)
                                       + _u32(flags) + _u32(0), on_answer=self._checked)
        else:
            self._open = wire._request(_OPEN, _sstr(path) + _u32(flags) + _u32(0), on_answer=self._opened)

    def _opened(self, kind: int, body: bytes) -> None:
        err = self.wire.status_error(kind, body, self.path)
        if err is not None:
            self.error = self.error or err
        elif kind == _HANDLE:
            self.handle = body[4:4 + int.from_bytes(body[:4], "big")]
        else:
            raise self.wire._lost(f"unexpected answer {kind} to OPEN {self.path}")

    def _checked(self, kind: int, body: bytes) -> None:
        err = self.wire.status_error(kind, body, self.path)
        if err is not None and self.error is None and not self.aborted:
            self.error = err

    def _ready(self) -> bytes:
        if self.handle is None and self.error is None:
            self.wire.wait(self._open)
        if self.error is not None:
            raise self.error
        return self.handle

    def write(self, data: bytes | memoryview) -> None:
        handle = _sstr(self._ready())
        view = memoryview(data)
        step = self.wire.write_chunk
        for i in range(0, len(view), step):
            chunk = view[i:i + step]
            self.wire._request(_WRITE, handle + self.offset.to_bytes(8, "big") + _u32(len(chunk)), chunk,
                               on_answer=self._checked)
            self.offset += len(chunk)
        if self.error is not None:
            raise self.error

    def write_from(self, fd: int, offset: int, length: int) -> None:
        """``length`` bytes of the file ``fd`` from ``offset``, spliced into the wire (no copy here)."""
        handle = _sstr(self._ready())
        step = self.wire.write_chunk
        for pos in range(0, length, step):
            n = min(step, length - pos)
            self.wire._request(_WRITE, handle + self.offset.to_bytes(8, "big") + _u32(n), on_answer=self._checked,
                               spliced=(fd, offset + pos, n))
            self.offset += n
        if self.error is not None:
            raise self.error

    def commit(self, target: str, on_done: Callable[[], None], expect: tuple[int, str] | None = None,
               on_mismatch: Callable[[], None] | None = None) -> None:
        """Close, then rename to ``target``: both in flight; ``on_done`` runs once the rename's
        answer says the object is in place (a failure of any of its requests is raised then).
        ``expect`` = (size, SHA-256) on a server that ``verifies``: it renames only a file that
        holds exactly that, else drops it and ``on_mismatch`` runs instead."""
        handle = self._ready()
        self.wire._request(_CLOSE, _sstr(handle), on_answer=self._checked)
        self.done = True
        if expect is not None and self.wire.verifies:
            def checked(kind: int, body: bytes) -> None:
                if self.error is not None:                 # a write or the close failed: that is the news
                    raise self.error
                err = self.wire.status_error(kind, body, self.path)
                if err is None:
                    on_done()
                elif MISMATCH in str(err) and on_mismatch is not None:
                    on_mismatch()
                else:
                    raise err
            size, digest = expect
            self.wire._request(_EXTENDED, _sstr(COMMIT_EXTENSION) + _sstr(self.path) + _sstr(sftp_path(target))
                               + size.to_bytes(8, "big") + _sstr(digest), on_answer=checked)
            return

        def placed() -> None:
            if self.error is not None:
                raise self.error
            on_done()
        self.wire.rename(self.path, target, on_done=placed, now=False)

    def finish(self) -> None:
        """Close now, waiting for every answer: raises what the site refused."""
        if self.done:
            return
        handle = self._ready()
        self.wire.wait(self.wire._request(_CLOSE, _sstr(handle), on_answer=self._checked))
        self.done = True
        if self.error is not None:
            raise self.error

    def abort(self) -> None:
        """Close and remove, not waiting and ignoring failures: the object is fetched again."""
        if self.done:
            return
        self.done = self.aborted = True
        try:
            if self.handle is not None or self.error is None:
                handle = self._ready()
                self.wire._request(_CLOSE, _sstr(handle))
            self.wire._request(_REMOVE, _sstr(self.path))
        except OSError:
            pass

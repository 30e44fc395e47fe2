"""Keep-alive HTTP/1.1 GETs for the stage's hot path: the body goes straight into the caller's buffer.

A stage reads thousands of objects of a few hundred KiB. ``http.client`` parses each response head
with the email package and reads the body through a BufferedReader in socket-sized pieces: a tenth
of a millisecond of Python per object under the GIL, and a wake-up of the worker thread per piece.
Here the head is read with one or two ``recv`` calls and the body lands directly in the caller's
(page-aligned) buffer, a whole buffer per system call (``MSG_WAITALL`` on plain sockets), so a
worker wakes once per MiB. It does what S3 GETs need and no more: Content-Length, chunked and
read-until-close bodies, keep-alive with one silent reconnect when the server had closed an idle
connection, TLS through ``ssl``, time-outs through the socket. Transport failures are ``OSError``s
(``ConnectionError``, ``TimeoutError``, ``ProtocolError``), which the store retries.
"""

from __future__ import annotations

import socket
import ssl
import struct
from urllib.parse import urlsplit

HEAD_MAX = 64 << 10
_tls: ssl.SSLContext | None = None


class ProtocolError(OSError):
    """The server's answer is not HTTP/1.1 as this reader understands it."""


def _tls_context() -> ssl.SSLContext:
    global _tls
    if _tls is None:
        _tls = ssl.create_default_context()
    return _tls


class Connection:
    """One keep-alive connection to ``scheme://netloc``; one thread uses it at a time."""

    def __init__(self, scheme: str, netloc: str, timeout: float = 60.0):
        u = urlsplit(f"{scheme}://{netloc}")
        self.scheme, self.netloc, self.timeout = scheme, netloc, timeout
        self.host, self.port = u.hostname or "", u.port or (443 if scheme == "https" else 80)
        self.sock: socket.socket | None = None
        self.waitall = 0
        self._head = bytearray(HEAD_MAX)
        self._response: Response | None = None

    def _connect(self) -> None:
        sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.scheme == "https":
            self.sock = _tls_context().wrap_socket(sock, server_hostname=self.host)
            self.waitall = 0                    # TLS sockets take no recv flags
            return
        # blocking, with the time-out in the kernel: recv can then wait for a whole buffer
        sock.settimeout(None)
        tv = struct.pack("ll", int(self.timeout), int(self.timeout % 1 * 1e6))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)
        self.sock = sock
        self.waitall = socket.MSG_WAITALL

    def close(self) -> None:
        if self.sock is not None:
            try:
                self.sock.close()
            finally:
                self.sock = None

    def get(self, path: str, headers: dict[str, str] | None = None) -> "Response":
        """Send ``GET path`` and read the response head; the body is read from the Response."""
        request = "".join([f"GET {path} HTTP/1.1\r\nHost: {self.netloc}\r\n",
                           *(f"{k}: {v}\r\n" for k, v in (headers or {}).items()), "\r\n"]).encode("latin-1")
        if self._response is not None and not self._response.done:
            self.close()                        # the last body was not read to its end
        reused = self.sock is not None
        try:
            return self._exchange(request)
        except (ConnectionError, _ClosedBeforeAnswer):
            if not reused:
                raise
        self.close()                            # the server had dropped the idle connection
        return self._exchange(request)

    def _exchange(self, request: bytes) -> "Response":
        if self.sock is None:
            self._connect()
        try:
            self.sock.sendall(request)
            return self._read_head()
        except BaseException:
            self.close()
            raise

    def _recv_into(self, view: memoryview, flags: int = 0) -> int:
        try:
            return self.sock.recv_into(view, len(view), flags)
        except BlockingIOError:                 # SO_RCVTIMEO ran out
            raise TimeoutError(f"no data from {self.netloc} for {self.timeout:g}s") from None

    def _read_head(self) -> "Response":
        buf, view, got = self._head, memoryview(self._head), 0
        while True:
            n = self._recv_into(view[got:])
            if n == 0:
                if got == 0:
                    raise _ClosedBeforeAnswer(f"{self.netloc} closed the connection before answering")
                raise ConnectionResetError(f"{self.netloc} closed the connection in a response head")
            got += n
            end = buf.find(b"\r\n\r\n", max(0, got - n - 3), got)
            if end >= 0:
                break
            if got == len(buf):
                raise ProtocolError(f"{self.netloc}: response head longer than {HEAD_MAX} bytes")
        lines = bytes(buf[:end]).decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
            raise ProtocolError(f"{self.netloc}: not an HTTP/1.x status line: {lines[0][:80]!r}")
        fields: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            fields[name.strip().lower()] = value.strip()
        self._response = Response(self, int(parts[1]), fields, bytes(buf[end + 4:got]))
        return self._response


class _ClosedBeforeAnswer(ConnectionError):
    pass


class Response:
    """The body of one GET; ``readinto`` fills the caller's buffer as far as the body goes."""

    def __init__(self, conn: Connection, status: int, headers: dict[str, str], early: bytes):
        self.conn, self.status, self.headers = conn, status, headers
        self._early = early                     # body bytes that came with the head
        self.chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        length = headers.get("content-length")
        self.remaining: int | None = None if self.chunked or length is None else int(length)
        self._keep = headers.get("connection", "").lower() != "close" and (self.chunked or length is not None)
        self._chunk = 0                         # bytes left in the current chunk
        self.done = self.remaining == 0
        if self.done:
            self._finish()

    def _finish(self) -> None:
        self.done = True
        if not self._keep or self._early:
            self.conn.close()

    def readinto(self, view: memoryview) -> int:
        """Bytes copied into ``view``: all of it unless the body ended (then 0 at the end)."""
        if self.done:
            return 0
        if self.chunked:
            return self._read_chunked(view)
        want = len(view) if self.remaining is None else min(len(view), self.remaining)
        n = 0
        if self._early:
            n = min(len(self._early), want)
            view[:n] = self._early[:n]
            self._early = self._early[n:]
        while n < want:
            k = self.conn._recv_into(view[n:want], self.conn.waitall)
            if k == 0:
                if self.remaining is None:      # a body delimited by the end of the connection
                    self._finish()
                    return n
                raise ConnectionResetError(f"{self.conn.netloc} closed the connection with "
                                           f"{self.remaining - n} bytes of the body still to come")
            n += k
        if self.remaining is not None:
            self.remaining -= n
            if self.remaining == 0:
                self._finish()
        return n

    def read(self) -> bytes:
        """The whole (small) body: an error document."""
        out = bytearray()
        buf = bytearray(64 << 10)
        while n := self.readinto(memoryview(buf)):
            out += buf[:n]
        return bytes(out)

    # -- chunked bodies: not the hot path (S3 GETs carry a Content-Length) ------------------------
    def _more(self) -> None:
        data = self.conn.sock.recv(64 << 10)
        if not data:
            raise ConnectionResetError(f"{self.conn.netloc} closed the connection in a chunked body")
        self._early += data

    def _line(self) -> bytes:
        while (i := self._early.find(b"\r\n")) < 0:
            self._more()
        line, self._early = self._early[:i], self._early[i + 2:]
        return line

    def _read_chunked(self, view: memoryview) -> int:
        n = 0
        while n < len(view):
            if self._chunk == 0:
                size = self._line().split(b";", 1)[0].strip()
                try:
                    self._chunk = int(size, 16)
                except ValueError:
                    raise ProtocolError(f"{self.conn.netloc}: bad chunk size {size[:20]!r}") from None
                if self._chunk == 0:
                    while self._line():         # trailers, up to the empty line
                        pass
                    self._finish()
                    return n
            if not self._early:
                self._more()
            k = min(self._chunk, len(self._early), len(view) - n)
            view[n:n + k] = self._early[:k]
            self._early, self._chunk, n = self._early[k:], self._chunk - k, n + k
            if self._chunk == 0:
                while len(self._early) < 2:
                    self._more()
                if self._early[:2] != b"\r\n":
                    raise ProtocolError(f"{self.conn.netloc}: chunk longer than its size line says")
                self._early = self._early[2:]
        return n

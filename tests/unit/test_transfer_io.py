"""The stage's hot-path I/O: the keep-alive HTTP reader against a socket server speaking canned
HTTP/1.1 answers (length, chunked, close-delimited bodies, an idle connection dropped, a body cut
short, a silent server), and the O_DIRECT object writer with its fallbacks."""

from __future__ import annotations

import errno
import hashlib
import mmap
import os
import socket
import threading

import pytest

from maelflow_transfer.http_get import Connection, ProtocolError
from maelflow_transfer.manifest import Entry
from maelflow_transfer.trees import ALIGN, LocalPart, LocalTree

pytestmark = pytest.mark.unit


class CannedServer:
    """Answers each request on a connection with the next canned bytes, then closes it;
    ``None`` reads the request and closes without answering."""

    def __init__(self, *connections: list[bytes | None]):
        self.connections = list(connections)
        self.requests: list[bytes] = []
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        for answers in self.connections:
            conn, _ = self.sock.accept()
            with conn:
                for answer in answers:
                    head = b""
                    while b"\r\n\r\n" not in head:
                        chunk = conn.recv(4096)
                        if not chunk:
                            break
                        head += chunk
                    self.requests.append(head)
                    if answer is None:
                        break
                    conn.sendall(answer)

    def connection(self, timeout: float = 5.0) -> Connection:
        return Connection("http", f"127.0.0.1:{self.port}", timeout=timeout)


def _body(conn: Connection, path: str = "/b/k", size: int = 1 << 16) -> tuple[int, bytes]:
    resp = conn.get(path, {"Range": "bytes=0-9"})
    out = bytearray()
    buf = bytearray(size)
    while n := resp.readinto(memoryview(buf)):
        out += buf[:n]
    return resp.status, bytes(out)


def test_content_length_bodies_on_one_kept_alive_connection():
    payload = os.urandom(300_000)
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nETag: \"x\"\r\n\r\n" % len(payload) + payload
    server = CannedServer([answer, answer])
    conn = server.connection()
    assert _body(conn) == (200, payload)
    assert _body(conn, size=4096) == (200, payload)      # the same connection, small buffers
    assert len(server.requests) == 2
    assert server.requests[0].startswith(b"GET /b/k HTTP/1.1\r\nHost: 127.0.0.1:")
    assert b"\r\nRange: bytes=0-9\r\n" in server.requests[0]


def test_chunked_and_close_delimited_bodies():
    chunked = (b"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"5;ext=1\r\n<Code\r\nB\r\n>NoSuchKey<\r\n0\r\nX-Trailer: y\r\n\r\n")
    closing = b"HTTP/1.1 500 Internal\r\nConnection: close\r\n\r\n<Code>InternalError</Code>"
    server = CannedServer([chunked, closing])
    conn = server.connection()
    resp = conn.get("/b/missing")
    assert (resp.status, resp.read()) == (404, b"<Code>NoSuchKey<")
    resp = conn.get("/b/k")
    assert (resp.status, resp.read()) == (500, b"<Code>InternalError</Code>")
    assert conn.sock is None                             # the server said it closes


def test_an_idle_connection_dropped_by_the_server_is_reopened_once():
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi"
    server = CannedServer([ok, None], [ok])
    conn = server.connection()
    assert _body(conn) == (200, b"hi")
    assert _body(conn) == (200, b"hi")                   # first try hits the closed socket
    assert len(server.requests) == 3


def test_a_body_cut_short_and_a_silent_server_are_transport_errors():
    cut = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly-part"
    server = CannedServer([cut])
    conn = server.connection()
    resp = conn.get("/b/k")
    with pytest.raises(ConnectionResetError, match="bytes of the body still to come"):
        resp.readinto(memoryview(bytearray(200)))
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    conn = Connection("http", f"127.0.0.1:{silent.getsockname()[1]}", timeout=0.3)
    with pytest.raises(TimeoutError, match="no data"):
        conn.get("/b/k")
    silent.close()
    bad = CannedServer([b"SMTP ready\r\n\r\n"])
    with pytest.raises(ProtocolError, match="not an HTTP/1.x status line"):
        bad.connection().get("/")


def test_direct_writer_writes_aligned_blocks_and_a_buffered_tail(tmp_path):
    data = os.urandom(3 * ALIGN * 64 + 123)                # not a multiple of the block size
    buf = mmap.mmap(-1, len(data))
    buf[:] = data
    stamps = []
    part = LocalPart(tmp_path / "obj", len(data), direct=True, journal=stamps.append)
    view = memoryview(buf)
    part.write(view[: 2 * ALIGN * 64])                    # aligned: O_DIRECT where the file system allows
    part.write(view[2 * ALIGN * 64:])                     # the rest, with the unaligned tail
    part.commit(lambda: None)
    assert stamps == [(tmp_path / "obj").stat().st_mtime_ns]
    assert (tmp_path / "obj").read_bytes() == data
    assert not (tmp_path / ".obj.part").exists()


def test_direct_writer_falls_back_for_unaligned_buffers_and_refusing_file_systems(tmp_path, monkeypatch):
    data = os.urandom(512 * 1024)
    part = LocalPart(tmp_path / "a", len(data), direct=True)
    part.write(memoryview(b"x" + data)[1:])               # an odd address: EINVAL, then buffered writes
    part.commit(lambda: None)
    assert (tmp_path / "a").read_bytes() == data

    from maelflow_transfer import trees

    real_open = os.open

    def no_direct(path, flags, mode=0o777):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, mode)
    monkeypatch.setattr(trees.os, "open", no_direct)
    part = LocalPart(tmp_path / "b", len(data), direct=True)
    assert not part.direct
    part.write(memoryview(data))
    part.commit(lambda: None)
    assert hashlib.sha256((tmp_path / "b").read_bytes()).digest() == hashlib.sha256(data).digest()


def test_ranged_objects_are_not_written_direct(tmp_path):
    try:
        os.close(os.open(tmp_path / "probe", os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644))
        supported = True
    except OSError:
        supported = False
    tree = LocalTree(tmp_path / "ds.zarr")
    tree.partial.mkdir(parents=True)
    e = Entry("data/0.0", 1 << 20, "0" * 64)
    assert tree.writer(e).direct is supported
    assert tree.writer(e, ranged=True).direct is False     # hashed by reading it back: keep it cached
    assert tree.writer(Entry(".zattrs", 100, "0" * 64)).direct is False

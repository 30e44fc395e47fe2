"""The stage's hot-path I/O: the obstore-backed Store (aligned buffers, ranges, the mapping of
missing objects, refused and silent servers, and a server answering ranges with 200, to the stage's
errors), and the O_DIRECT object writer with its fallbacks."""

from __future__ import annotations

import errno
import hashlib
import mmap
import os
import socket
import threading
import time

import pytest

from maelflow_transfer import store as store_mod
from maelflow_transfer.errors import NotPublished, StoreError, TransientError
from maelflow_transfer.manifest import Entry
from maelflow_transfer.retry import Backoff
from maelflow_transfer.store import BUF, ObjectMissing, RangesUnsupported, Store
from maelflow_transfer.trees import ALIGN, LocalPart, LocalTree

pytestmark = pytest.mark.unit


class CannedServer:
    """Answers each request on a connection with the next canned bytes, then closes it;
    ``None`` reads the request and stays silent until the test ends."""

    def __init__(self, *connections: list[bytes | None]):
        self.connections = list(connections)
        self.requests: list[bytes] = []
        self.done = threading.Event()
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
                        self.done.wait(30)
                        break
                    conn.sendall(answer)

    def store(self, prefix: str = "ds") -> Store:
        from obstore.store import S3Store

        objects = S3Store("ewc", prefix=prefix, endpoint=f"http://127.0.0.1:{self.port}", region="us-east-1",
                          virtual_hosted_style_request=False,
                          credential_provider=lambda: {"access_key_id": "AKID", "secret_access_key": "s",
                                                       "token": None, "expires_at": None},
                          client_options={"allow_http": True, "connect_timeout": "1s", "read_timeout": "1s"},
                          retry_config={"max_retries": 0})
        return Store(objects, backoff=Backoff(attempts=2, base=0.01, cap=0.01))


def _memory(**objects: bytes) -> Store:
    import obstore
    from obstore.store import MemoryStore

    mem = MemoryStore()
    for key, data in objects.items():
        obstore.put(mem, key, data)
    return Store(mem, url="s3://ewc/ds", endpoint="memory", backoff=Backoff(attempts=2, base=0.01, cap=0.01))


def test_objects_arrive_in_full_page_aligned_buffers_whole_or_streamed(monkeypatch):
    data = os.urandom(3 * BUF + 12345)
    store = _memory(**{"data/0.0": data})
    for whole_max in (store_mod.WHOLE_MAX, BUF):          # read in one call, then as a stream
        monkeypatch.setattr(store_mod, "WHOLE_MAX", whole_max)
        pieces, got = [], bytearray()

        def sink(view: memoryview) -> None:
            assert isinstance(view.obj, mmap.mmap)          # the thread's aligned buffer: O_DIRECT-able
            pieces.append(len(view))
            got.extend(view)
        assert store.get("data/0.0", sink) == len(data)
        assert bytes(got) == data and pieces == [BUF, BUF, BUF, 12345]
    got = bytearray()
    assert store.get("data/0.0", got.extend, start=10, end=BUF + 9) == BUF
    assert bytes(got) == data[10:BUF + 10]
    assert bytes(store.read_range("data/0.0", 5, 105)) == data[5:105] and store.ranges is True


def test_missing_objects_and_manifests_are_clear_errors():
    store = _memory(**{"data/0.0": b"x"})
    with pytest.raises(ObjectMissing, match="missing from the store, although the manifest lists it"):
        store.get("data/1.0", lambda view: None)
    assert store.read_manifest() is None
    with pytest.raises(NotPublished, match="no manifest at s3://ewc/ds/.maelflow-manifest.json"):
        store.require_manifest("ds")
    assert store.sha256_of("data/1.0") is None


def test_a_sinks_own_error_is_not_taken_for_the_stores():
    store = _memory(**{"data/0.0": os.urandom(2 * BUF)})

    def full(view: memoryview) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(OSError) as info:
        store.get("data/0.0", full)
    assert info.value.errno == errno.ENOSPC and not isinstance(info.value, TransientError)


def test_a_refused_connection_and_a_silent_server_are_transient_then_final():
    free = socket.socket()
    free.bind(("127.0.0.1", 0))
    port = free.getsockname()[1]
    free.close()                                          # nothing listens there any more
    refused = CannedServer()
    refused.port = port
    store = refused.store()
    with pytest.raises(TransientError):
        store.get("data/0.0", lambda view: None)
    with pytest.raises(StoreError, match=r"gave up after 2 tries; is http://127.0.0.1:\d+ up\?"):
        store.read_manifest()
    silent = CannedServer([None])
    t0 = time.monotonic()
    with pytest.raises(TransientError):
        silent.store().get("data/0.0", lambda view: None)
    assert time.monotonic() - t0 < 10
    silent.done.set()


def test_a_range_answered_with_200_says_the_server_has_no_ranges():
    """rclone's serve s3 answers a range with 200 and the range's bytes: obstore refuses it, the
    store says so once and the stage reads such objects whole."""
    body = b"0123456789"
    server = CannedServer([b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\nContent-Range: bytes 0-9/100\r\n"
                           b"ETag: \"x\"\r\nLast-Modified: Tue, 01 Dec 2026 10:00:00 GMT\r\n\r\n" + body])
    store = server.store()
    with pytest.raises(RangesUnsupported):
        store.read_range("data/0.0", 0, 10)
    assert store.ranges is False
    assert b"range: bytes=0-9" in server.requests[0].lower()


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
    assert tree.writer(e, ranged=True).direct is False     # written at offsets, range by range
    assert tree.writer(Entry(".zattrs", 100, "0" * 64)).direct is False


FAULTS = """
import resource, sys, threading
if sys.argv[1] == "keep":
    from maelflow_transfer.memory import keep_buffers_in_heap
    assert keep_buffers_in_heap() and keep_buffers_in_heap()       # glibc here; idempotent
def work():                  # what stage workers do: object-sized buffers, allocated, filled, freed
    for i in range(300):
        b = bytearray((256 + (i % 7) * 64) << 10)
        del b
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
threads = [threading.Thread(target=work) for _ in range(8)]
[t.start() for t in threads]
[t.join() for t in threads]
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def test_object_sized_buffers_are_reused_from_the_heap_not_mapped_afresh():
    import subprocess
    import sys

    def faults(mode: str) -> int:
        return int(subprocess.run([sys.executable, "-c", FAULTS, mode], capture_output=True, text=True,
                                  check=True).stdout)

    default, kept = faults("default"), faults("keep")
    assert kept < default / 2, (kept, default)


def test_journal_lines_are_written_only_after_their_objects_are_on_the_disk(tmp_path, monkeypatch):
    """Group commit: one syncfs per GROUP_OBJECTS objects (and at close), each line written after it."""
    from maelflow_transfer import trees as trees_mod
    from maelflow_transfer.stage import stage
    from maelflow_transfer.trees import LocalTree
    from tests.unit.test_transfer_engine import MemoryStore, _objects

    events: list[tuple[str, int]] = []
    real = trees_mod._syncfs

    def syncfs(fd):
        journal = tmp_path / ".a.zarr.partial" / trees_mod.JOURNAL_NAME
        events.append(("syncfs", len(journal.read_text().splitlines()) if journal.exists() else 0))
        real(fd)

    monkeypatch.setattr(trees_mod, "_syncfs", syncfs)
    monkeypatch.setattr(trees_mod, "GROUP_OBJECTS", 10)
    monkeypatch.setattr(trees_mod, "GROUP_SECONDS", 3600)
    store = MemoryStore(_objects(24, 3000))          # 25 objects with .zattrs
    res = stage(store, LocalTree(tmp_path / "a.zarr"), "ds", workers=1)
    assert res.copied == 25
    # a syncfs after the 10th and the 20th object and at the close; each found the journal holding
    # only the lines of the objects an earlier syncfs made durable
    assert events == [("syncfs", 0), ("syncfs", 10), ("syncfs", 20)]

"""The pipelined SFTP wire against both servers a push's wires reach on a site, on a pipe (without
the SSH leg): OpenSSH's own ``sftp-server`` (what ``ssh -s sftp`` runs) and maelflow's
(``maelflow transfer sftp-server``, O_DIRECT). Every request in flight, objects confirmed by their
rename's answer, refusals raised where their answers are read, O_APPEND journal lines, aborts."""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path

import pytest

from maelflow.sites.sftp_wire import SftpWire, WireLost

pytestmark = pytest.mark.integration
SFTP_SERVER = Path("/usr/lib/openssh/sftp-server")   # Debian openssh-sftp-server (scripts/install.sh)


MAELFLOW_SERVER = [str(Path(sys.executable).with_name("maelflow")), "transfer", "sftp-server"]


def openssh_server(root: Path) -> list[str]:
    if not SFTP_SERVER.exists():
        pytest.fail(f"{SFTP_SERVER} is missing: run scripts/install.sh (openssh-server)")
    return [str(SFTP_SERVER), "-d", str(root)]


@pytest.fixture(params=["openssh", "maelflow"])
def wire(request, tmp_path):
    argv = openssh_server(tmp_path) if request.param == "openssh" else MAELFLOW_SERVER
    w = SftpWire(argv, f"local {request.param} sftp-server")
    yield w
    w.close()


def test_objects_are_written_in_flight_and_confirmed_by_their_rename(wire, tmp_path):
    placed = []
    blobs = {f"obj{i}": os.urandom(300_000 + i) for i in range(20)}
    for name, data in blobs.items():
        up = wire.upload(str(tmp_path / f".{name}.part"))
        up.write(memoryview(data)[:100_000])
        up.write(memoryview(data)[100_000:])          # more than one 255 KiB message
        up.commit(str(tmp_path / name), lambda name=name: placed.append(name))
    assert len(placed) < len(blobs)                   # nothing was waited for...
    wire.sync()
    assert placed == list(blobs)                      # ...and every answer came back, in order
    for name, data in blobs.items():
        assert (tmp_path / name).read_bytes() == data
    assert not list(tmp_path.glob(".*.part"))


def test_journal_lines_are_appended_and_an_abort_leaves_nothing(wire, tmp_path):
    journal = tmp_path / "journal"
    for i in range(5):
        wire.append_line(str(journal), f"line {i}\n".encode())
    up = wire.upload(str(tmp_path / ".gone.part"))
    up.write(b"x" * 1000)
    up.abort()
    wire.sync()
    assert journal.read_text().splitlines() == [f"line {i}" for i in range(5)]
    assert not (tmp_path / ".gone.part").exists()


def test_refusals_are_raised_naming_the_path_and_the_wire_stays_in_step(wire, tmp_path):
    up = wire.upload(str(tmp_path / "no-such-folder" / "obj.part"))
    with pytest.raises(FileNotFoundError) as err:   # at the write (OpenSSH: the open's answer is
        up.write(b"data")                           # waited for) or at the close (maelflow's server:
        up.finish()                                 # the client's own handle, nothing waited for)
    assert "no-such-folder" in str(err.value)
    ok = wire.upload(str(tmp_path / ".a.part"))
    ok.write(b"a" * 10)
    ok.commit(str(tmp_path / "missing-folder" / "a"), lambda: None)   # the rename will be refused
    with pytest.raises(FileNotFoundError):
        wire.sync()
    done = []
    last = wire.upload(str(tmp_path / ".b.part"))     # the same wire goes on
    last.write(b"b" * 10)
    last.commit(str(tmp_path / "b"), lambda: done.append(1))
    wire.sync()
    assert done == [1] and (tmp_path / "b").read_bytes() == b"b" * 10
    wire.mkdir(str(tmp_path / "made"))
    assert (tmp_path / "made").is_dir()


def test_a_dead_server_is_a_lost_wire(tmp_path):
    w = SftpWire(["sh", "-c", "echo 'ssh: Permission denied (publickey)' >&2; exit 255"], "site")
    with pytest.raises(WireLost, match="Permission denied"):
        w.upload(str(tmp_path / "x"))


def test_a_server_that_does_not_start_falls_back_to_the_other(tmp_path):
    w = SftpWire(["sh", "-c", "echo 'maelflow: command not found' >&2; exit 127"], "site",
                 fallback=openssh_server(tmp_path))
    done = []
    up = w.upload(str(tmp_path / ".a.part"))
    up.write(b"a" * 1000)
    up.commit(str(tmp_path / "a"), lambda: done.append(1))
    w.sync()
    w.close()
    assert done == [1] and (tmp_path / "a").read_bytes() == b"a" * 1000
    assert w.argv == openssh_server(tmp_path)


def test_maelflow_server_writes_large_objects_whole_and_refuses_what_it_does_not_serve(tmp_path):
    w = SftpWire(MAELFLOW_SERVER, "maelflow sftp-server")
    data = os.urandom(5 * 2**20 + 12_345)             # O_DIRECT blocks, then an unaligned tail
    done = []
    up = w.upload(str(tmp_path / ".big.part"))
    for i in range(0, len(data), 700_001):            # the wire cuts these into 255 KiB messages
        up.write(memoryview(data)[i:i + 700_001])
    up.commit(str(tmp_path / "big"), lambda: done.append(1))
    small = w.upload(str(tmp_path / ".small.part"))
    small.write(b"s" * 10)
    small.commit(str(tmp_path / "small"), lambda: done.append(2))
    w.sync()
    assert done == [1, 2]
    assert (tmp_path / "big").read_bytes() == data and (tmp_path / "small").read_bytes() == b"s" * 10
    opendir = 11
    with pytest.raises(OSError, match="SFTP error 8 .*not supported"):
        w._call(opendir, len(str(tmp_path)).to_bytes(4, "big") + str(tmp_path).encode(), str(tmp_path))
    w.close()


def test_maelflow_server_reports_a_failed_write_of_an_answered_block(tmp_path):
    """/dev/full: every write fails with ENOSPC, also the blocks written after their WRITE was
    answered (O_DIRECT, by the writer thread): the failure reaches the file's next answer."""
    w = SftpWire(MAELFLOW_SERVER, "maelflow sftp-server")
    for size in (600_000, 3 * 2**20 + 5):          # the tail only; whole blocks and a tail
        up = w.upload("/dev/full")
        with pytest.raises(OSError, match="No space left") as err:
            up.write(b"x" * size)
            up.finish()
        assert err.value.errno == errno.ENOSPC          # a stage makes it its DiskFull
    done = []
    ok = w.upload(str(tmp_path / ".ok.part"))         # the wire goes on
    ok.write(b"k" * 10)
    ok.commit(str(tmp_path / "ok"), lambda: done.append(1))
    w.sync()
    assert done == [1]
    w.close()


def test_maelflow_server_renames_only_what_matches_the_manifest(tmp_path):
    """commit@maelflow: the site hashes the bytes as they land and renames a match; a mismatch is
    dropped and said (on_mismatch), never placed; a file written out of sequence is read back."""
    import hashlib

    w = SftpWire(MAELFLOW_SERVER, "maelflow sftp-server")
    assert w.verifies
    data = os.urandom(3 * 2**20 + 99)
    right = (len(data), hashlib.sha256(data).hexdigest())
    wrong = (len(data), hashlib.sha256(b"other").hexdigest())
    events = []
    for name, expect in (("good", right), ("bad", wrong)):
        up = w.upload(str(tmp_path / f".{name}.part"))
        up.write(memoryview(data))
        up.commit(str(tmp_path / name), lambda name=name: events.append(("placed", name)), expect=expect,
                  on_mismatch=lambda name=name: events.append(("refused", name)))
    # out of sequence: the second half first (the digest taken while writing no longer holds)
    up = w.upload(str(tmp_path / ".shuffled.part"))
    half = len(data) // 2
    up.offset = half
    up.write(memoryview(data)[half:])
    up.offset = 0
    up.write(memoryview(data)[:half])
    up.commit(str(tmp_path / "shuffled"), lambda: events.append(("placed", "shuffled")), expect=right,
              on_mismatch=lambda: events.append(("refused", "shuffled")))
    w.sync()
    assert events == [("placed", "good"), ("refused", "bad"), ("placed", "shuffled")]
    assert (tmp_path / "good").read_bytes() == data and (tmp_path / "shuffled").read_bytes() == data
    assert not (tmp_path / "bad").exists() and not list(tmp_path.glob(".*.part"))
    w.close()

"""The pipelined SFTP wire against OpenSSH's own ``sftp-server`` on a pipe (what ``ssh -s sftp``
runs on the site, without the SSH leg): every request in flight, objects confirmed by their
rename's answer, refusals raised where their answers are read, O_APPEND journal lines, aborts."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from maelflow.sites.sftp_wire import SftpWire, WireLost

pytestmark = pytest.mark.integration
SFTP_SERVER = Path("/usr/lib/openssh/sftp-server")   # Debian openssh-sftp-server (scripts/install.sh)


@pytest.fixture
def wire(tmp_path):
    if not SFTP_SERVER.exists():
        pytest.fail(f"{SFTP_SERVER} is missing: run scripts/install.sh (openssh-server)")
    w = SftpWire([str(SFTP_SERVER), "-d", str(tmp_path)], "local sftp-server")
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
    with pytest.raises(FileNotFoundError) as err:
        up.write(b"data")
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

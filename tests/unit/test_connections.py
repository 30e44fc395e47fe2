"""The connections without a site: the ``ssh`` argv each auth mode gets, what a dry run prints, how
the OpenSSH client's failures (exit 255 and its stderr) become CredentialError, HostKeyError or
ConnectionLost, and the local connection's commands and files."""

from __future__ import annotations

import os
import subprocess

import pytest

from maelflow.config.models import Connection, Site, SshSettings
from maelflow.errors import ConnectionLost, CredentialError, HostKeyError, RemoteTimeout
from maelflow.sites.connections import connect, connection_class
from maelflow.sites.connections import ssh as ssh_mod
from maelflow.sites.connections.local import LocalConnection
from maelflow.sites.connections.shell import RemoteCommandError, shell_path

pytestmark = pytest.mark.unit
from maelflow.sites.connections.ssh import SshConnection


@pytest.fixture
def key(tmp_path):
    path = tmp_path / "id_ed25519"
    path.write_text("not really a key\n")
    kh = tmp_path / "known_hosts"
    kh.write_text("")
    return path, kh


def settings(key, **changes) -> SshSettings:
    path, kh = key
    base = dict(host="login.example.org", port=2222, user="alice", identity_file=str(path), known_hosts=str(kh),
                renew_hint="run renew-cred and retry")
    return SshSettings(**{**base, **changes})


def opt(argv: list[str], name: str) -> str | None:
    """The value of ``-o Name=value`` in an ssh argv."""
    for a, b in zip(argv, argv[1:]):
        if a == "-o" and b.startswith(name + "="):
            return b.split("=", 1)[1]
    return None


class FakeSsh:
    """Stands in for every process the connection starts: ``answers`` maps a predicate on the argv
    to (rc, stdout, stderr); the first match answers, else success."""

    def __init__(self, monkeypatch, *answers):
        self.calls: list[list[str]] = []
        self.answers = list(answers)
        monkeypatch.setattr(ssh_mod.subprocess, "run", self)
        monkeypatch.setattr(ssh_mod.time, "sleep", lambda s: None)

    def __call__(self, argv, **kw):
        self.calls.append(list(argv))
        for match, (rc, out, err) in self.answers:
            if match(argv):
                return subprocess.CompletedProcess(argv, rc, out, err)
        return subprocess.CompletedProcess(argv, 0, b"", b"")


def is_master(argv) -> bool:
    return "-N" in argv and "ControlMaster=yes" in argv


# ------------------------------------------------------------------------------------- argv
def test_key_argv_never_prompts_and_rides_a_private_master(key, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    c = SshConnection("hpc", settings(key))
    argv = c.ssh_command()
    assert argv[0] == "ssh" and "login.example.org" not in argv
    for name, value in (("BatchMode", "yes"), ("PasswordAuthentication", "no"), ("KbdInteractiveAuthentication", "no"),
                        ("StrictHostKeyChecking", "yes"), ("ServerAliveInterval", "15"), ("ServerAliveCountMax", "4"),
                        ("ControlMaster", "auto"), ("IdentitiesOnly", "yes"), ("UserKnownHostsFile", str(key[1])),
                        ("ConnectTimeout", "10")):
        assert opt(argv, name) == value, name
    assert argv[argv.index("-i") + 1] == str(key[0]) and argv[argv.index("-l") + 1] == "alice"
    assert argv[argv.index("-p") + 1] == "2222" and argv[argv.index("-c") + 1].startswith("aes128-gcm@openssh.com")
    folder = tmp_path / "maelflow-ssh"
    assert opt(argv, "ControlPath").startswith(f"{folder}/m-") and str(os.getpid()) not in opt(argv, "ControlPath")
    assert folder.stat().st_mode & 0o777 == 0o700
    # the same login and key share it, across connections and processes (one handshake for a suite)
    assert opt(SshConnection("hpc", settings(key)).ssh_command(), "ControlPath") == opt(argv, "ControlPath")
    # another key never shares the master
    other = SshConnection("hpc", settings(key, identity_file=str(tmp_path / "other")))
    assert opt(other.ssh_command(), "ControlPath") != opt(argv, "ControlPath")


def test_certificate_agent_2fa_and_jump_argv(key, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    cert = tmp_path / "id_ed25519-cert.pub"
    argv = SshConnection("c", settings(key, auth="certificate", proxy_jump="gw.example.org")).ssh_command()
    assert opt(argv, "CertificateFile") == str(cert) and argv[argv.index("-J") + 1] == "gw.example.org"
    agent = SshConnection("a", settings(key, auth="agent", identity_file=None)).ssh_command()
    assert "-i" not in agent and opt(agent, "IdentitiesOnly") is None
    monkeypatch.setenv(ssh_mod.CONTROL_PATH_ENV, "/run/cm/%r@%h:%p")
    twofa = SshConnection("t", settings(key, auth="2fa", identity_file=None)).ssh_command()
    assert opt(twofa, "ControlPath") == "/run/cm/%r@%h:%p" and opt(twofa, "ControlMaster") == "no"
    assert opt(twofa, "ControlPersist") is None


def test_connect_finds_both_connections_by_type(key):
    assert connection_class("local") is LocalConnection and connection_class("ssh") is SshConnection
    site = Site(name="hpc", scheduler="slurm", slurm={}, connection=Connection(type="ssh", ssh=settings(key)),
                paths={"root": "/r", "datasets": "/r/d", "outputs": "/r/o"})
    conn = connect("hpc", site)
    assert conn is connect("hpc", site) and conn.target == "alice@login.example.org:2222"
    assert connect("hpc", site, dry_run=True) is not conn
    ssh_mod.close_all()


# ------------------------------------------------------------------------------------- dry run
def test_dry_run_prints_every_side_effect_and_runs_nothing(key, capsys, monkeypatch):
    fake = FakeSsh(monkeypatch)
    c = SshConnection("hpc", settings(key), dry_run=True)
    assert c.run("sbatch job").ok
    c.put_text("/r/jobs/a.job", "#!/bin/bash\n", mode=0o755)
    c.makedirs("~/r/jobs")
    c.rename("/r/a", "/r/b")
    assert not c.exists("/r/a") and c.read_bytes("/r/out") == b""
    c.check()
    out = capsys.readouterr().out.splitlines()
    assert out == ["[dry-run] alice@login.example.org:2222: sbatch job",
                   "[dry-run] alice@login.example.org:2222: write 12 bytes to /r/jobs/a.job (mode 755)",
                   '[dry-run] alice@login.example.org:2222: mkdir -p "$HOME"/r/jobs',
                   "[dry-run] alice@login.example.org:2222: mv -f -T /r/a /r/b",
                   "[dry-run] alice@login.example.org:2222: test -e /r/a",
                   "[dry-run] alice@login.example.org:2222: read /r/out from byte 0"]
    assert fake.calls == []


# ------------------------------------------------------------------------------------- failures
def test_refused_key_is_a_credential_error_naming_the_file_and_the_hint(key, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    FakeSsh(monkeypatch, (is_master, (255, b"", b"alice@login.example.org: Permission denied (publickey).\r\n")))
    with pytest.raises(CredentialError) as info:
        SshConnection("hpc", settings(key)).run("true")
    msg = str(info.value)
    assert "site hpc" in msg and str(key[0]) in msg and "refused the key" in msg
    assert msg.endswith("run renew-cred and retry") and info.value.hint == "run renew-cred and retry"


def test_passphrase_key_and_missing_key_say_so(key, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    FakeSsh(monkeypatch, (is_master, (255, b"", b"Permission denied (publickey).\n")),
            (lambda a: a[0] == "ssh-keygen", (1, b"", b"Load key: incorrect passphrase supplied to decrypt private key")))
    with pytest.raises(CredentialError, match="passphrase-protected"):
        SshConnection("hpc", settings(key)).check()
    with pytest.raises(CredentialError, match="private key file is missing") as info:
        SshConnection("hpc", settings(key, identity_file=str(tmp_path / "gone"))).check()
    assert str(tmp_path / "gone") in str(info.value)


def test_host_key_and_network_failures(key, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    fake = FakeSsh(monkeypatch, (is_master, (255, b"", b"No ED25519 host key is known for [login]:2222.\r\n"
                                                      b"Host key verification failed.\r\n")))
    with pytest.raises(HostKeyError, match="unknown or changed"):
        SshConnection("hpc", settings(key)).check()
    fake.answers = [(is_master, (255, b"", b"ssh: connect to host login port 2222: Connection refused\r\n"))]
    fake.calls.clear()
    with pytest.raises(ConnectionLost) as info:
        SshConnection("hpc", settings(key)).check()
    assert not info.value.sent and len(fake.calls) == 3          # set-up is retried: nothing was sent
    with pytest.raises(HostKeyError, match="known_hosts file .* is missing"):
        SshConnection("hpc", settings(key, known_hosts=str(tmp_path / "nope"))).check()


def test_a_drop_during_a_command_is_retried_unless_told_not_to(key, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    drops = []

    def dropped(argv) -> bool:
        if argv[-1] == "echo hi" and len(drops) < 1:
            drops.append(1)
            return True
        return False
    fake = FakeSsh(monkeypatch, (dropped, (255, b"", b"Connection to login closed by remote host.\r\n")),
                   (lambda a: a[-1] == "sbatch x", (255, b"", b"client_loop: send disconnect: Broken pipe\r\n")),
                   (lambda a: a[-1] == "exit 255", (255, b"", b"the command's own complaint\n")))
    c = SshConnection("hpc", settings(key))
    # the master's socket is there once the master was opened
    monkeypatch.setattr(ssh_mod.os.path, "exists", lambda p: any(is_master(a) for a in fake.calls))
    assert c.run("echo hi").ok and drops                             # retried after the drop
    with pytest.raises(ConnectionLost) as info:
        c.run("sbatch x", retry=False)
    assert info.value.sent
    assert c.run("exit 255", check=False).rc == 255                  # the remote command's exit, not ssh's
    with pytest.raises(RemoteCommandError, match="exited with 255"):
        c.run("exit 255")
    assert sum(1 for a in fake.calls if is_master(a)) == 1           # one handshake for all of it


def test_2fa_without_a_master_says_how_to_open_one(key, tmp_path, monkeypatch):
    FakeSsh(monkeypatch, (lambda a: "-O" in a, (255, b"", b"Control socket connect(/x): No such file or directory\n")))
    c = SshConnection("twofa", settings(key, auth="2fa", identity_file=None), control_path=f"{tmp_path}/%r@%h:%p")
    with pytest.raises(CredentialError) as info:
        c.run("true")
    msg = str(info.value)
    assert "no live SSH master" in msg and "ssh -M -o ControlPersist=12h" in msg and f"{tmp_path}/%r@%h:%p" in msg
    assert msg.endswith("run renew-cred and retry")


def test_expired_certificate_is_named_before_connecting(key, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    cert = tmp_path / "id_ed25519-cert.pub"
    cert.write_text("x")
    fake = FakeSsh(monkeypatch, (lambda a: a[0].endswith("ssh-keygen") and "-L" in a,
                                 (0, "        Valid: from 2020-01-01T00:00:00 to 2020-01-02T00:00:00\n", "")))
    with pytest.raises(CredentialError, match="certificate expired at 2020-01-02") as info:
        SshConnection("c", settings(key, auth="certificate")).check()
    assert str(cert) in str(info.value) and not any(is_master(a) for a in fake.calls)


# ------------------------------------------------------------------------------------- local
def test_local_connection_runs_commands_and_writes_files_atomically(tmp_path, capsys):
    c = LocalConnection("here")
    r = c.run("echo out; echo err >&2; exit 3", check=False)
    assert (r.rc, r.stdout, r.stderr) == (3, "out\n", "err\n")
    assert c.run("cat | wc -c", input=b"x" * 1000).stdout.strip() == "1000"
    with pytest.raises(RemoteCommandError, match="exited with 3"):
        c.run("exit 3")
    with pytest.raises(RemoteTimeout):
        c.run("sleep 5", timeout=0.2)
    path = tmp_path / "a" / "b.txt"
    c.put_text(str(path), "hello world\n", mode=0o640)
    assert path.read_text() == "hello world\n" and path.stat().st_mode & 0o777 == 0o640
    assert os.listdir(path.parent) == ["b.txt"]
    assert c.read_bytes(str(path), offset=6) == b"world\n" and c.read_bytes(str(path), 0, 5) == b"hello"
    with pytest.raises(FileNotFoundError):
        c.read_bytes(str(path) + ".nope")
    c.put_file(str(path), str(tmp_path / "copy"))
    c.rename(str(tmp_path / "copy"), str(tmp_path / "moved"))
    assert c.exists(str(tmp_path / "moved")) and not c.exists(str(tmp_path / "copy"))
    c.makedirs(str(tmp_path / "x" / "y"))
    lines: list[str] = []
    assert c.run_lines("printf '1\\n2\\n'; echo e >&2", lines.append).stderr == "e\n" and lines == ["1", "2"]
    LocalConnection("here", dry_run=True).run("rm -rf /")
    assert capsys.readouterr().out == "[dry-run] localhost: rm -rf /\n"


def test_shell_path_keeps_home_meaningful():
    assert shell_path("~/a b") == '"$HOME"/\'a b\'' and shell_path("~") == '"$HOME"' and shell_path("/x;y") == "'/x;y'"

"""SSH sessions to sites: the one place maelflow opens a connection to a login node.

Why one place: every way a site authenticates (a key, an agent, a short-lived certificate, 2FA in
front of a multiplexed session) fails in its own way, and an operator must read at once what to
renew. And these sessions run inside ecFlow's job commands: a prompt waiting on a terminal would
hang the server's submission of every later task. So nothing here prompts (BatchMode, no password
or keyboard-interactive auth, stdin closed), and every failure is a ``CredentialError`` ending with
the site's ``renew_hint`` or a ``ConnectionLost`` within seconds.

Two backends answer the same calls: paramiko for key/agent/certificate (one transport reused by
every command of a process), and the OpenSSH client for 2FA sites, riding a ControlMaster the
operator opened after their 2FA login (a 2FA prompt can only be answered by a person).
"""

from __future__ import annotations

import atexit
import getpass
import io
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import PurePosixPath
from typing import BinaryIO, Callable, TypeVar

from maelflow.config.models import SshSettings
from maelflow.sites.sftp_wire import OPENSSH_CIPHERS, OPENSSH_KEX, SftpWire
from maelflow.sites.sftp_wire import sftp_path as _sftp_path

CONTROL_PATH_ENV = "MAELFLOW_SSH_CONTROL_PATH"
DEFAULT_CONTROL_PATH = "~/.ssh/maelflow-%r@%h:%p"
RETRY_DELAYS = (0.5, 1.5)          # three attempts in all
KEEPALIVE_S = 30
MASTER_CHECK_TIMEOUT_S = 3.0
# AES-GCM first: paramiko's default (aes128-ctr + a separate HMAC pass) moves about 170 MB/s over
# SFTP here, aes128-gcm about 270 MB/s; servers without GCM still get the rest of the list
PREFERRED_CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com")

T = TypeVar("T")


# ------------------------------------------------------------------------------------- results
@dataclass(frozen=True)
class RemoteResult:
    rc: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.rc == 0


class SshError(RuntimeError):
    """The site could not be used over SSH (see the subclasses for why)."""


class CredentialError(SshError):
    """The credential is missing, expired or refused: only the operator can fix it (renew_hint)."""


class HostKeyError(SshError):
    """The login node's host key is unknown or changed: never connect blindly to such a host."""


class RemoteTimeout(SshError):
    """A remote command outlived its timeout; it may still be running there."""


class RemoteCommandError(SshError):
    def __init__(self, target: str, command: str, result: RemoteResult):
        self.result = result
        short = command if len(command) <= 200 else command[:200] + "..."
        detail = (result.stderr.strip() or result.stdout.strip())[-500:]
        super().__init__(f"{target}: `{short}` exited with {result.rc}: {detail}")


class ConnectionLost(ConnectionError):
    """The transport died (or could not be set up). ``sent`` says whether the command may have run:
    callers of non-idempotent commands must find out before trying again."""

    def __init__(self, message: str, sent: bool):
        super().__init__(message)
        self.sent = sent


# ------------------------------------------------------------------------------------- helpers
def shell_path(path: str) -> str:
    """A path quoted for the remote shell, keeping a leading ``~/`` meaningful."""
    if path == "~":
        return '"$HOME"'
    if path.startswith("~/"):
        return '"$HOME"/' + shlex.quote(path[2:])
    return shlex.quote(path)


def _tmp_name(remote_path: str) -> tuple[str, str]:
    p = PurePosixPath(remote_path)
    return str(p.parent), str(p.parent / f".{p.name}.tmp")


_VALID_RE = re.compile(r"Valid:\s+(?:from\s+(\S+)\s+to\s+(\S+)|(forever)|after\s+(\S+)|before\s+(\S+))")


def _parse_cert_time(text: str) -> datetime:
    utc = text.endswith("Z")
    stamp = datetime.strptime(text.rstrip("Z"), "%Y-%m-%dT%H:%M:%S")
    return stamp.replace(tzinfo=timezone.utc) if utc else stamp.astimezone()


def certificate_validity(cert_file: str) -> tuple[datetime | None, datetime | None] | None:
    """(valid from, valid to) of an OpenSSH certificate, None for an open end; None when unknown.

    ssh-keygen is the reference reader of the format (paramiko does not parse validity); where it is
    missing the server's refusal still ends in a CredentialError, only later.
    """
    keygen = shutil.which("ssh-keygen")
    if not keygen:
        return None
    proc = subprocess.run([keygen, "-L", "-f", cert_file], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=10)
    m = _VALID_RE.search(proc.stdout) if proc.returncode == 0 else None
    if not m:
        return None
    start, end, forever, after, before = m.groups()
    if forever:
        return (None, None)
    if after:
        return (_parse_cert_time(after), None)
    if before:
        return (None, _parse_cert_time(before))
    return (_parse_cert_time(start), _parse_cert_time(end))


def _transport_factory(sock, **kwargs):
    """A paramiko Transport that proposes the fast ciphers first (see PREFERRED_CIPHERS)."""
    import paramiko

    t = paramiko.Transport(sock, **kwargs)
    opts = t.get_security_options()
    have = tuple(opts.ciphers)
    opts.ciphers = tuple(c for c in PREFERRED_CIPHERS if c in have) + tuple(c for c in have
                                                                         if c not in PREFERRED_CIPHERS)
    return t


class RemoteWriter:
    """A file being written on the site, streamed: ``write`` chunks, then ``close`` or ``abort``."""

    def write(self, data: bytes | memoryview) -> None: ...
    def close(self) -> None: ...
    def abort(self) -> None: ...

    def __enter__(self) -> "RemoteWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


# ------------------------------------------------------------------------------------- backends
class _Backend:
    def __init__(self, session: "SshSession"):
        self.s = session
        self.settings = session.settings

    def connect(self) -> None: ...
    def alive(self) -> bool: ...
    def execute(self, command: str, input: bytes | None, timeout: float) -> tuple[int, bytes, bytes]: ...
    def put(self, remote_path: str, src: BinaryIO, mode: int | None) -> None: ...
    def read_bytes(self, remote_path: str, offset: int, limit: int | None) -> bytes: ...
    def exists(self, remote_path: str) -> bool: ...
    def makedirs(self, remote_path: str) -> None: ...
    def close(self) -> None: ...
    def open_writer(self, remote_path: str, append: bool) -> RemoteWriter: ...
    def rename(self, src: str, dst: str) -> None: ...
    def stream(self, command: str, on_line: Callable[[str], None], timeout: float) -> tuple[int, bytes]: ...


class _ParamikoBackend(_Backend):
    """key / agent / certificate: one transport, many channels, SFTP for files."""

    def __init__(self, session: "SshSession"):
        super().__init__(session)
        self.client = None
        self._sftp = None
        self._thread_sftp = threading.local()   # one SFTP channel per thread for parallel writers
        self._channels: list = []

    # -- credentials ----------------------------------------------------------------------------
    def _identity(self) -> str:
        st = self.settings
        if st.identity_file:
            return os.path.expanduser(st.identity_file)
        for name in ("id_ed25519", "id_ecdsa", "id_rsa"):
            candidate = os.path.expanduser(f"~/.ssh/{name}")
            if os.path.exists(candidate):
                return candidate
        raise self.s.credential_error("no identity_file configured and no default key found", "~/.ssh/id_*")

    def _pkey(self):
        import paramiko

        st = self.settings
        if st.auth == "agent":
            sock = os.environ.get("SSH_AUTH_SOCK", "")
            if not sock or not paramiko.Agent().get_keys():
                raise self.s.credential_error("no key loaded in the SSH agent", sock or "$SSH_AUTH_SOCK unset")
            return None
        path = self._identity()
        if not os.path.isfile(path):
            raise self.s.credential_error("private key file is missing", path)
        if st.auth == "certificate":
            cert = os.path.expanduser(st.certificate_file or f"{path}-cert.pub")
            if not os.path.isfile(cert):
                raise self.s.credential_error("certificate file is missing", cert)
            window = certificate_validity(cert)
            now = datetime.now().astimezone()
            if window and window[1] is not None and window[1] <= now:
                raise self.s.credential_error(
                    f"certificate expired at {window[1]:%Y-%m-%d %H:%M:%S %Z}", cert)
            if window and window[0] is not None and window[0] > now:
                raise self.s.credential_error(
                    f"certificate is not valid before {window[0]:%Y-%m-%d %H:%M:%S %Z}", cert)
        try:
            pkey = paramiko.PKey.from_path(path)
        except (paramiko.PasswordRequiredException, TypeError):
            # TypeError: cryptography's OpenSSH-format loader asking for the missing passphrase
            raise self.s.credential_error("private key is passphrase-protected: load it in an agent and "
                                          "use auth: agent", path) from None
        except (paramiko.SSHException, ValueError, OSError) as exc:
            raise self.s.credential_error(f"cannot read the private key ({exc})", path) from None
        if st.auth == "certificate":
            try:
                pkey.load_certificate(cert)
            except (ValueError, OSError, paramiko.SSHException) as exc:
                raise self.s.credential_error(f"certificate does not match the key ({exc})", cert) from None
        return pkey

    # -- connection -----------------------------------------------------------------------------
    def connect(self) -> None:
        import paramiko

        st = self.settings
        pkey = self._pkey()
        client = paramiko.SSHClient()
        if st.known_hosts:
            kh = os.path.expanduser(st.known_hosts)
            if not os.path.isfile(kh):
                raise HostKeyError(f"site {self.s.site_name}: known_hosts file {kh} is missing")
            client.load_host_keys(kh)
        else:
            client.load_system_host_keys()
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
        sock = None
        if st.proxy_jump:
            sock = paramiko.ProxyCommand(
                f"ssh -o BatchMode=yes -o ConnectTimeout={math.ceil(st.connect_timeout)} "
                f"-W {shlex.quote(st.host)}:{st.port} {shlex.quote(st.proxy_jump)}")
        t = st.connect_timeout
        try:
            client.connect(st.host, st.port, username=self.s.user, pkey=pkey, look_for_keys=False,
                           allow_agent=st.auth == "agent", timeout=t, banner_timeout=t, auth_timeout=t,
                           channel_timeout=t, sock=sock, transport_factory=_transport_factory)
        except paramiko.AuthenticationException as exc:
            client.close()
            what = st.identity_file or os.environ.get("SSH_AUTH_SOCK", "the agent")
            if st.auth == "certificate":
                what = st.certificate_file or what
            raise self.s.credential_error(f"the login node refused the credential ({exc})",
                                          os.path.expanduser(what)) from None
        except paramiko.BadHostKeyException as exc:
            client.close()
            raise HostKeyError(f"site {self.s.site_name}: host key of {self.s.target} changed ({exc}); "
                               "check with the site before updating known_hosts") from None
        except paramiko.SSHException as exc:
            client.close()
            msg = str(exc)
            if "known_hosts" in msg:
                raise HostKeyError(f"site {self.s.site_name}: {msg}; add the login node's host key to "
                                   f"{st.known_hosts or '~/.ssh/known_hosts'} (ssh-keyscan, checked "
                                   "against the site's published fingerprint)") from None
            if "authentication methods" in msg:
                raise self.s.credential_error(msg, st.identity_file or "the agent") from None
            raise ConnectionLost(f"{self.s.target}: {msg}", sent=False) from None
        except (OSError, EOFError) as exc:
            client.close()
            raise ConnectionLost(f"{self.s.target}: cannot connect ({exc})", sent=False) from None
        client.get_transport().set_keepalive(KEEPALIVE_S)
        self.client = client

    def alive(self) -> bool:
        t = self.client.get_transport() if self.client else None
        return bool(t and t.is_active())

    def _transport(self):
        t = self.client.get_transport() if self.client else None
        if not t or not t.is_active():
            raise ConnectionLost(f"{self.s.target}: connection is closed", sent=False)
        return t

    # -- commands -------------------------------------------------------------------------------
    def execute(self, command: str, input: bytes | None, timeout: float) -> tuple[int, bytes, bytes]:
        import paramiko

        transport = self._transport()
        try:
            chan = transport.open_session(timeout=self.settings.connect_timeout)
        except (paramiko.SSHException, EOFError, OSError) as exc:
            raise ConnectionLost(f"{self.s.target}: cannot open a channel ({exc})", sent=False) from None
        try:
            chan.exec_command(command)
        except (paramiko.SSHException, EOFError, OSError) as exc:
            raise ConnectionLost(f"{self.s.target}: lost while starting a command ({exc})", sent=True) from None
        feeder = None
        if input:
            def feed() -> None:
                try:
                    chan.sendall(input)
                    chan.shutdown_write()
                except (OSError, EOFError, paramiko.SSHException):
                    pass
            feeder = threading.Thread(target=feed, daemon=True)
            feeder.start()
        else:
            chan.shutdown_write()
        out, err = bytearray(), bytearray()
        deadline = time.monotonic() + timeout
        pause = 0.001
        try:
            while True:
                got = False
                while chan.recv_ready():
                    out += chan.recv(65536)
                    got = True
                while chan.recv_stderr_ready():
                    err += chan.recv_stderr(65536)
                    got = True
                # exit_status_ready() is also true for a channel closed by a dying transport, which
                # never sent a status (exit_status stays -1): a lost connection, not an exit code
                finished = chan.exit_status_ready() and not chan.recv_ready() and not chan.recv_stderr_ready()
                if finished and (chan.exit_status != -1 or transport.is_active()):
                    return chan.exit_status, bytes(out), bytes(err)   # -1: killed by a signal
                if not transport.is_active():
                    raise ConnectionLost(f"{self.s.target}: connection dropped while running a command",
                                         sent=True)
                if time.monotonic() > deadline:
                    raise RemoteTimeout(f"{self.s.target}: `{command[:120]}` still running after {timeout:.0f} s")
                if got:
                    pause = 0.001
                else:
                    time.sleep(pause)
                    pause = min(pause * 2, 0.05)
        finally:
            chan.close()
            if feeder:
                feeder.join(timeout=1)

    # -- files ----------------------------------------------------------------------------------
    def sftp(self):
        if self._sftp is None:
            self._transport()
            self._sftp = self.client.open_sftp()
        return self._sftp

    def _guard(self, op: Callable[[], T]) -> T:
        """Errors of a dead transport become ConnectionLost; file errors (ENOENT...) stay what they are."""
        import paramiko

        try:
            return op()
        except (FileNotFoundError, PermissionError):
            raise
        except (OSError, EOFError, paramiko.SSHException) as exc:
            if not self.alive():
                self._sftp = None
                raise ConnectionLost(f"{self.s.target}: connection dropped during SFTP ({exc})",
                                     sent=True) from None
            raise

    def put(self, remote_path: str, src: BinaryIO, mode: int | None) -> None:
        parent, tmp = _tmp_name(_sftp_path(remote_path))
        final = _sftp_path(remote_path)

        def op() -> None:
            sftp = self.sftp()
            try:
                sftp.putfo(src, tmp)
            except FileNotFoundError:
                self.makedirs(parent)
                src.seek(0)
                sftp.putfo(src, tmp)
            if mode is not None:
                sftp.chmod(tmp, mode)
            sftp.posix_rename(tmp, final)
        self._guard(op)

    def read_bytes(self, remote_path: str, offset: int, limit: int | None) -> bytes:
        def op() -> bytes:
            with self.sftp().open(_sftp_path(remote_path), "rb") as fh:
                fh.seek(offset)
                return fh.read() if limit is None else fh.read(limit)
        return self._guard(op)

    def exists(self, remote_path: str) -> bool:
        def op() -> bool:
            try:
                self.sftp().stat(_sftp_path(remote_path))
                return True
            except FileNotFoundError:
                return False
        return self._guard(op)

    def makedirs(self, remote_path: str) -> None:
        def op() -> None:
            sftp = self.sftp()
            path = PurePosixPath(_sftp_path(remote_path))
            missing = []
            while str(path) not in ("", ".", "/"):
                try:
                    sftp.stat(str(path))
                    break
                except FileNotFoundError:
                    missing.append(str(path))
                    path = path.parent
            for d in reversed(missing):
                try:
                    sftp.mkdir(d)
                except OSError:
                    sftp.stat(d)        # created meanwhile by someone else: fine
        self._guard(op)

    # -- streamed files, renames, streamed commands (dataset transfers) --------------------------
    def thread_sftp(self):
        """This thread's own SFTP channel: parallel writers must not share one channel's lock."""
        sftp = getattr(self._thread_sftp, "sftp", None)
        if sftp is None or sftp.sock.closed:
            self._transport()
            sftp = self._thread_sftp.sftp = self.client.open_sftp()
            self._channels.append(sftp)
        return sftp

    def open_writer(self, remote_path: str, append: bool) -> RemoteWriter:
        backend = self

        class _Writer(RemoteWriter):
            def __init__(self) -> None:
                self.fh = backend._guard(lambda: backend.thread_sftp().open(
                    _sftp_path(remote_path), "ab" if append else "wb", bufsize=1 << 20))
                self.fh.set_pipelined(True)

            def write(self, data) -> None:
                backend._guard(lambda: self.fh.write(data))

            def close(self) -> None:
                backend._guard(self.fh.close)     # waits for the pipelined writes' answers

            def abort(self) -> None:
                try:
                    self.fh.close()
                except Exception:  # noqa: BLE001 - the caller is already failing
                    pass
        return _Writer()

    def rename(self, src: str, dst: str) -> None:
        self._guard(lambda: self.thread_sftp().posix_rename(_sftp_path(src), _sftp_path(dst)))

    def stream(self, command: str, on_line: Callable[[str], None], timeout: float) -> tuple[int, bytes]:
        import paramiko

        transport = self._transport()
        try:
            chan = transport.open_session(timeout=self.settings.connect_timeout)
            chan.exec_command(command)
        except (paramiko.SSHException, EOFError, OSError) as exc:
            raise ConnectionLost(f"{self.s.target}: cannot start a command ({exc})", sent=True) from None
        chan.shutdown_write()
        chan.settimeout(1.0)
        out, err = bytearray(), bytearray()
        deadline = time.monotonic() + timeout
        try:
            while True:
                try:
                    data = chan.recv(65536)
                except TimeoutError:
                    data = None
                if data:
                    out += data
                    while b"\n" in out:
                        line, _, rest = bytes(out).partition(b"\n")
                        out[:] = rest
                        on_line(line.decode(errors="replace"))
                while chan.recv_stderr_ready():
                    err += chan.recv_stderr(65536)
                if data == b"" or (chan.exit_status_ready() and not chan.recv_ready()):
                    while chan.recv_stderr_ready():
                        err += chan.recv_stderr(65536)
                    if out:
                        on_line(out.decode(errors="replace"))
                    if chan.exit_status == -1 and not transport.is_active():
                        raise ConnectionLost(f"{self.s.target}: connection dropped while running a command",
                                             sent=True)
                    return chan.recv_exit_status(), bytes(err)
                if not transport.is_active():
                    raise ConnectionLost(f"{self.s.target}: connection dropped while running a command", sent=True)
                if time.monotonic() > deadline:
                    raise RemoteTimeout(f"{self.s.target}: `{command[:120]}` still running after {timeout:.0f} s")
        finally:
            chan.close()

    def close(self) -> None:
        for chan in self._channels:
            try:
                chan.close()
            except Exception:  # noqa: BLE001 - closing a dead channel
                pass
        self._channels = []
        self._thread_sftp = threading.local()
        if self._sftp is not None:
            try:
                self._sftp.close()
            except Exception:  # noqa: BLE001 - closing a dead channel
                pass
            self._sftp = None
        if self.client is not None:
            self.client.close()
            self.client = None


_SSH_FAILURE_RE = re.compile(r"^(ssh:|ssh_|mux_client|Control socket|Connection (to|closed|reset)|"
                             r"Host key verification failed|Permission denied|kex_|client_loop|"
                             r"Received disconnect|Broken pipe|banner exchange)", re.M)


def _run_openssh(target: str, argv: list[str], command: str, input: bytes | None,
                 timeout: float) -> subprocess.CompletedProcess:
    """One ``ssh`` process for ``command``, never prompting (stdin is ``input`` or nothing)."""
    try:
        return subprocess.run(argv, input=input or None, stdin=None if input else subprocess.DEVNULL,
                              capture_output=True, timeout=timeout, start_new_session=True)
    except subprocess.TimeoutExpired:
        raise RemoteTimeout(f"{target}: `{command[:120]}` still running after {timeout:.0f} s") from None


def _raise_ssh_failure(session: "SshSession", rc: int, err: str, refused: Callable[[str], CredentialError]) -> None:
    """What the OpenSSH client itself failed at (exit 255; "user@host: Permission denied (...)"):
    the credential (``refused(why)``, the caller's hint), the host key, the connection. Anything
    else is the remote command's own result."""
    if rc != 255:
        return
    if "Permission denied" in err:
        raise refused(err.strip())
    if "Host key verification failed" in err:
        raise HostKeyError(f"site {session.site_name}: {err.strip()}")
    if _SSH_FAILURE_RE.search(err):
        raise ConnectionLost(f"{session.target}: {err.strip()}", sent=True)


class _OpenSshBackend(_Backend):
    """2FA: a person answers the second factor once, in their own ``ssh -M``; we only ride it."""

    def __init__(self, session: "SshSession"):
        super().__init__(session)
        self.control_path = session.control_path

    def _argv(self, *extra: str) -> list[str]:
        st = self.settings
        argv = ["ssh", "-o", f"ControlPath={self.control_path}", "-o", "ControlMaster=no",
                "-o", "BatchMode=yes", "-o", f"ConnectTimeout={math.ceil(st.connect_timeout)}",
                "-o", "PasswordAuthentication=no", "-o", "KbdInteractiveAuthentication=no",
                "-p", str(st.port), "-l", self.s.user]
        if st.known_hosts:
            argv += ["-o", f"UserKnownHostsFile={os.path.expanduser(st.known_hosts)}",
                     "-o", "StrictHostKeyChecking=yes"]
        if st.proxy_jump:
            argv += ["-J", st.proxy_jump]
        return argv + list(extra)

    def _open_hint(self) -> str:
        st = self.settings
        return (f"after your 2FA login open one with: ssh -M -o ControlPersist=12h "
                f"-o ControlPath='{self.control_path}' -p {st.port} {self.s.user}@{st.host}")

    def connect(self) -> None:
        try:
            proc = subprocess.run(self._argv("-O", "check", self.settings.host), stdin=subprocess.DEVNULL,
                                  capture_output=True, timeout=MASTER_CHECK_TIMEOUT_S, start_new_session=True)
        except subprocess.TimeoutExpired:
            proc = None
        if proc is None or proc.returncode != 0:
            raise self.s.credential_error(f"no live SSH master session; {self._open_hint()}",
                                          os.path.expanduser(self.control_path))

    def alive(self) -> bool:
        return True     # every command finds out itself (one process per command)

    def execute(self, command: str, input: bytes | None, timeout: float) -> tuple[int, bytes, bytes]:
        proc = _run_openssh(self.s.target, self._argv("-T", self.settings.host, command), command, input, timeout)
        _raise_ssh_failure(self.s, proc.returncode, proc.stderr.decode(errors="replace"),
                           lambda why: self.s.credential_error(f"the login node refused the session ({why}); "
                                                               f"{self._open_hint()}",
                                                               os.path.expanduser(self.control_path)))
        return proc.returncode, proc.stdout, proc.stderr

    def _check(self, command: str, result: tuple[int, bytes, bytes]) -> tuple[int, bytes, bytes]:
        if result[0] != 0:
            raise RemoteCommandError(self.s.target, command,
                                     RemoteResult(result[0], result[1].decode(errors="replace"),
                                                  result[2].decode(errors="replace")))
        return result

    def put(self, remote_path: str, src: BinaryIO, mode: int | None) -> None:
        parent, tmp = _tmp_name(remote_path)
        chmod = f" && chmod {mode:o} {shell_path(tmp)}" if mode is not None else ""
        cmd = (f"mkdir -p {shell_path(parent)} && cat > {shell_path(tmp)}{chmod} && "
               f"mv -f {shell_path(tmp)} {shell_path(remote_path)}")
        self._check(cmd, self.execute(cmd, src.read(), timeout=600))

    def read_bytes(self, remote_path: str, offset: int, limit: int | None) -> bytes:
        p = shell_path(remote_path)
        cmd = f"test -e {p} || exit 44; tail -c +{offset + 1} {p}" + (f" | head -c {limit}" if limit else "")
        rc, out, err = self.execute(cmd, None, timeout=600)
        if rc == 44:
            raise FileNotFoundError(2, "No such file", remote_path)
        self._check(cmd, (rc, out, err))
        return out

    def exists(self, remote_path: str) -> bool:
        return self.execute(f"test -e {shell_path(remote_path)}", None, timeout=60)[0] == 0

    def makedirs(self, remote_path: str) -> None:
        cmd = f"mkdir -p {shell_path(remote_path)}"
        self._check(cmd, self.execute(cmd, None, timeout=60))

    def open_writer(self, remote_path: str, append: bool) -> RemoteWriter:
        cmd = f"cat {'>>' if append else '>'} {shell_path(remote_path)}"
        proc = subprocess.Popen(self._argv("-T", self.settings.host, cmd), stdin=subprocess.PIPE,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        backend = self

        class _Writer(RemoteWriter):
            def write(self, data) -> None:
                try:
                    proc.stdin.write(data)
                except BrokenPipeError:
                    self.close()
                    raise ConnectionLost(f"{backend.s.target}: writing {remote_path} failed", sent=True) from None

            def close(self) -> None:
                try:
                    proc.stdin.close()
                except BrokenPipeError:
                    pass
                rc = proc.wait(timeout=600)
                err = proc.stderr.read().decode(errors="replace")
                backend._check(cmd, (rc, b"", err.encode()))

            def abort(self) -> None:
                proc.kill()
                proc.wait()
        return _Writer()

    def rename(self, src: str, dst: str) -> None:
        cmd = f"mv -T {shell_path(src)} {shell_path(dst)}"
        self._check(cmd, self.execute(cmd, None, timeout=60))

    def stream(self, command: str, on_line: Callable[[str], None], timeout: float) -> tuple[int, bytes]:
        proc = subprocess.Popen(self._argv("-T", self.settings.host, command), stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        try:
            for raw in proc.stdout:
                on_line(raw.decode(errors="replace").rstrip("\n"))
            rc = proc.wait()
        finally:
            timer.cancel()
        err = proc.stderr.read()
        if rc == 255 and _SSH_FAILURE_RE.search(err.decode(errors="replace")):
            raise ConnectionLost(f"{self.s.target}: {err.decode(errors='replace').strip()}", sent=True)
        return rc, err

    def close(self) -> None:
        pass            # the master belongs to the operator


# ------------------------------------------------------------------------------------- SFTP wire
# ------------------------------------------------------------------------------------- session
class SshSession:
    """Commands and files on one site's login node, over one reusable connection."""

    def __init__(self, site_name: str, settings: SshSettings, *, dry_run: bool = False,
                 control_path: str | None = None):
        self.site_name = site_name
        self.settings = settings
        self.dry_run = dry_run
        self.user = settings.user or getpass.getuser()
        self.control_path = control_path or os.environ.get(CONTROL_PATH_ENV) or DEFAULT_CONTROL_PATH
        self._backend: _Backend | None = None
        self._lock = threading.RLock()

    @property
    def target(self) -> str:
        return f"{self.user}@{self.settings.host}:{self.settings.port}"

    def credential_error(self, what: str, file: str) -> CredentialError:
        return CredentialError(f"site {self.site_name}: {what} [{file}] ({self.settings.auth} auth, "
                               f"{self.target}); {self.settings.renew_hint}")

    # -- connection management ------------------------------------------------------------------
    def _connected(self) -> _Backend:
        """A live backend; setting one up is retried (nothing was sent yet), credentials never are."""
        with self._lock:
            if self._backend is not None and self._backend.alive():
                return self._backend
            self._drop()
            for attempt, delay in enumerate((*RETRY_DELAYS, None)):
                backend = (_OpenSshBackend if self.settings.auth == "2fa" else _ParamikoBackend)(self)
                try:
                    backend.connect()
                except ConnectionLost:
                    if delay is None:
                        raise
                    time.sleep(delay)
                    continue
                self._backend = backend
                return backend
            raise AssertionError("unreachable")

    def _drop(self) -> None:
        with self._lock:
            if self._backend is not None:
                self._backend.close()
                self._backend = None

    def _call(self, op: Callable[[_Backend], T], retry: bool) -> T:
        for delay in (*RETRY_DELAYS, None):
            backend = self._connected()
            try:
                return op(backend)
            except ConnectionLost as exc:
                self._drop()
                if (exc.sent and not retry) or delay is None:
                    raise
                time.sleep(delay)
        raise AssertionError("unreachable")

    def _say(self, text: str) -> None:
        print(f"[dry-run] {self.target}: {text}", file=sys.stdout, flush=True)

    # -- public API -----------------------------------------------------------------------------
    def run(self, command: str, *, input: bytes | None = None, timeout: float = 60, check: bool = True,
            retry: bool = True) -> RemoteResult:
        """Run ``command`` in the login shell. ``retry=False`` for commands that must not run twice:
        a connection lost after sending them raises ConnectionLost(sent=True) for the caller to sort out."""
        if self.dry_run:
            self._say(command)
            return RemoteResult(0, "", "")
        rc, out, err = self._call(lambda b: b.execute(command, input, timeout), retry)
        result = RemoteResult(rc, out.decode(errors="replace"), err.decode(errors="replace"))
        if check and rc != 0:
            raise RemoteCommandError(self.target, command, result)
        return result

    def run_standalone(self, command: str, *, input: bytes | None = None, timeout: float = 600) -> RemoteResult:
        """``command`` over a connection of its own made by the OpenSSH client, with the key exchange
        the wires use: 0.15 s here, where importing paramiko and its handshake take 0.25 s that a
        push would wait for before its first byte (its wires' handshakes run meanwhile). ``run``
        where there is no ``ssh`` binary, and for credentials that need the session's own checks
        (certificate expiry) or its 2FA master. Never retried: the caller's command may have run."""
        st = self.settings
        if self.dry_run or st.auth not in ("key", "agent") or not shutil.which("ssh"):
            return self.run(command, input=input, timeout=timeout, check=False)
        if st.auth == "key" and st.identity_file and not os.path.exists(os.path.expanduser(st.identity_file)):
            raise self.credential_error("private key file is missing", os.path.expanduser(st.identity_file))
        proc = _run_openssh(self.target, self.openssh_argv("-T", st.host, command), command, input, timeout)
        err = proc.stderr.decode(errors="replace")
        _raise_ssh_failure(self, proc.returncode, err,
                           lambda why: self.credential_error(f"the login node refused the key ({why})",
                                                             os.path.expanduser(st.identity_file or "~/.ssh")))
        return RemoteResult(proc.returncode, proc.stdout.decode(errors="replace"), err)

    def put_text(self, remote_path: str, text: str, mode: int | None = None) -> None:
        """Write a file so that readers see the old one or the whole new one, never a part."""
        data = text.encode()
        if self.dry_run:
            self._say(f"write {len(data)} bytes to {remote_path}" + (f" (mode {mode:o})" if mode else ""))
            return

        def op(b: _Backend) -> None:
            b.put(remote_path, io.BytesIO(data), mode)
        self._call(op, retry=True)

    def put_file(self, local: str | os.PathLike[str], remote_path: str, mode: int | None = None) -> None:
        if self.dry_run:
            self._say(f"copy {local} to {remote_path}")
            return

        def op(b: _Backend) -> None:
            with open(local, "rb") as fh:
                b.put(remote_path, fh, mode)
        self._call(op, retry=True)

    def read_bytes(self, remote_path: str, offset: int = 0, limit: int | None = None) -> bytes:
        """Bytes from ``offset`` on: how job output is tailed without reading it all again."""
        if self.dry_run:
            self._say(f"read {remote_path} from byte {offset}")
            return b""
        return self._call(lambda b: b.read_bytes(remote_path, offset, limit), retry=True)

    def exists(self, remote_path: str) -> bool:
        if self.dry_run:
            self._say(f"test -e {shell_path(remote_path)}")
            return False
        return self._call(lambda b: b.exists(remote_path), retry=True)

    def makedirs(self, remote_path: str) -> None:
        if self.dry_run:
            self._say(f"mkdir -p {shell_path(remote_path)}")
            return
        self._call(lambda b: b.makedirs(remote_path), retry=True)

    def open_writer(self, remote_path: str, append: bool = False) -> RemoteWriter:
        """A file written as a stream of chunks (``write``, then ``close`` or ``abort``), not atomically:
        the caller writes aside and ``rename``s. Each thread gets its own SFTP channel, so parallel
        writers over one connection do not wait on each other."""
        if self.dry_run:
            self._say(f"write {remote_path}" + (" (append)" if append else ""))
            return RemoteWriter()
        return self._call(lambda b: b.open_writer(remote_path, append), retry=True)

    def rename(self, src: str, dst: str) -> None:
        """Rename on the site (POSIX rename: replaces a file, fails on a non-empty folder)."""
        if self.dry_run:
            self._say(f"mv {shell_path(src)} {shell_path(dst)}")
            return
        self._call(lambda b: b.rename(src, dst), retry=True)

    def run_lines(self, command: str, on_line: Callable[[str], None], *, timeout: float = 86400,
                  check: bool = True) -> RemoteResult:
        """Run ``command`` and hand each line of its stdout to ``on_line`` as it comes (progress of a
        long remote job); stderr is returned at the end. Never retried once sent."""
        if self.dry_run:
            self._say(command)
            return RemoteResult(0, "", "")
        rc, err = self._call(lambda b: b.stream(command, on_line, timeout), retry=False)
        result = RemoteResult(rc, "", err.decode(errors="replace"))
        if check and rc != 0:
            raise RemoteCommandError(self.target, command, result)
        return result

    def openssh_argv(self, *extra: str) -> list[str]:
        """``ssh`` arguments reaching this site with the session's credential, never prompting."""
        st = self.settings
        if st.auth == "2fa":
            return _OpenSshBackend(self)._argv(*extra)
        argv = ["ssh", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={math.ceil(st.connect_timeout)}",
                "-o", "PasswordAuthentication=no", "-o", "KbdInteractiveAuthentication=no",
                "-o", "ControlMaster=no", "-o", "ControlPath=none", "-c", OPENSSH_CIPHERS,
                "-o", f"KexAlgorithms={OPENSSH_KEX}",
                "-p", str(st.port), "-l", self.user]
        if st.auth in ("key", "certificate"):
            identity = os.path.expanduser(st.identity_file) if st.identity_file else _ParamikoBackend(self)._identity()
            argv += ["-o", "IdentitiesOnly=yes", "-i", identity]
            if st.auth == "certificate":
                argv += ["-o", f"CertificateFile={os.path.expanduser(st.certificate_file or identity + '-cert.pub')}"]
        if st.known_hosts:
            argv += ["-o", f"UserKnownHostsFile={os.path.expanduser(st.known_hosts)}",
                     "-o", "GlobalKnownHostsFile=/dev/null", "-o", "StrictHostKeyChecking=yes"]
        if st.proxy_jump:
            argv += ["-J", st.proxy_jump]
        return argv + list(extra)

    def _new_wire(self, server: str | None) -> SftpWire:
        """``server``: a command on the site serving SFTP on its stdin/stdout (maelflow's own,
        ``sites/sftp_server.py``), OpenSSH's ``sftp`` subsystem where it does not start."""
        subsystem = self.openssh_argv("-s", self.settings.host, "sftp")
        if server is None:
            return SftpWire(subsystem, self.target)
        return SftpWire(self.openssh_argv(self.settings.host, server), self.target, fallback=subsystem)

    def sftp_wire(self, server: str | None = None) -> SftpWire | None:
        """This thread's SFTP-over-OpenSSH channel (see SftpWire), or None where there is no ``ssh``
        binary (callers fall back to ``open_writer``). The credential is checked first, so a bad one
        fails here with the CredentialError and renew hint, not as a dead subprocess."""
        if self.dry_run or not shutil.which("ssh"):
            return None
        local = self.__dict__.setdefault("_wires", threading.local())
        wire = getattr(local, "wire", None)
        if wire is None or not wire.alive():
            with self._lock:
                spares = self.__dict__.get("_spare_wires") or []
                wire = spares.pop() if spares else None
            if wire is not None and wire.alive():
                local.wire = wire
                return wire
            self.check()
            with self._lock:
                # sshd drops handshakes beyond MaxStartups (10 by default): open a few at a time
                gate = self.__dict__.setdefault("_handshakes", threading.BoundedSemaphore(4))
            with gate:
                wire = local.wire = self._new_wire(server)
            with self._lock:
                self.__dict__.setdefault("_all_wires", []).append(wire)
        return wire

    def prestart_wires(self, n: int, server: str | None = None) -> None:
        """Start ``n`` wires' ssh processes now, for ``sftp_wire()`` to hand out: their handshakes
        (a quarter of a second each) then overlap the caller's next steps. A bad credential still
        surfaces as the CredentialError of the caller's first command."""
        if self.dry_run or not shutil.which("ssh"):
            return
        with self._lock:
            spares = self.__dict__.setdefault("_spare_wires", [])
            for _ in range(min(n, 4) - len(spares)):     # sshd's MaxStartups: a few at a time
                wire = self._new_wire(server)
                spares.append(wire)
                self.__dict__.setdefault("_all_wires", []).append(wire)

    def idle_wire(self, server: str | None = None) -> SftpWire | None:
        """A wire for one more step once the threads that used the session's wires are done (a
        push's last steps): one of theirs, already open, else this thread's."""
        with self._lock:
            wires = [w for w in self.__dict__.get("_all_wires", []) if w.alive()]
        return wires[0] if wires else self.sftp_wire(server)

    def sync_wires(self) -> None:
        """Wait for every answer on this session's wires (after the threads using them are done):
        raises the first request the site refused."""
        with self._lock:
            wires = list(self.__dict__.get("_all_wires", []))
        for wire in wires:
            if wire.alive():
                wire.sync()

    def close_wires(self) -> None:
        with self._lock:
            wires = self.__dict__.pop("_all_wires", [])
            self.__dict__.pop("_wires", None)
            self.__dict__.pop("_spare_wires", None)
        for wire in wires:
            wire.close()

    def check(self) -> None:
        """Connect now: raises CredentialError/HostKeyError/ConnectionLost instead of at first use."""
        if not self.dry_run:
            self._connected()

    def close(self) -> None:
        self.close_wires()
        self._drop()


# ------------------------------------------------------------------------------------- reuse
_SESSIONS: dict[tuple[str, str, int, str], SshSession] = {}
_SESSIONS_LOCK = threading.Lock()


def session_for(site_name: str, settings: SshSettings, dry_run: bool = False) -> SshSession:
    """The process's session for this site and login, so its commands share one handshake."""
    if dry_run:
        return SshSession(site_name, settings, dry_run=True)
    key = (site_name, settings.host, settings.port, settings.user or getpass.getuser())
    with _SESSIONS_LOCK:
        session = _SESSIONS.get(key)
        if session is not None and session.settings != settings:
            session.close()
            session = None
        if session is None:
            session = _SESSIONS[key] = SshSession(site_name, settings)
        return session


def close_all() -> None:
    with _SESSIONS_LOCK:
        sessions = list(_SESSIONS.values())
        _SESSIONS.clear()
    for session in sessions:
        session.close()


atexit.register(close_all)

__all__ = ["CONTROL_PATH_ENV", "ConnectionLost", "CredentialError", "HostKeyError", "RemoteCommandError",
           "RemoteResult", "RemoteTimeout", "RemoteWriter", "SftpWire", "SshError", "SshSession", "certificate_validity", "close_all",
           "session_for", "shell_path"]

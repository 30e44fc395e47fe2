"""The SSH connection: the OpenSSH client, the one way maelflow reaches a site's login node.

Why the OpenSSH client and nothing else: it already reads every credential a site hands out (a key,
an agent, a short-lived certificate, a 2FA session multiplexed by a ControlMaster), honours the
user's ssh_config, and its ``ssh`` argv is what rsync needs to move data over the same connection.
So a command is an ``ssh`` argv in front of shell-quoted text (troika's shape), run by subprocess.

One handshake per login and credential, shared by this user's maelflow processes: for key, agent
and certificate sites maelflow opens a ControlMaster (BatchMode, its socket in a private 0700 folder,
named by a hash of host, port, user and credential files) on first use, and every command and rsync
stream of every maelflow process rides it. ecFlow starts one process per job command, so a suite's
submissions, polls and kills pay one handshake between them instead of one each. The master closes
itself after ``PERSIST_S`` idle (ControlPersist), or when the login node drops it; a process opens a
new one under a lock, so two processes starting together never race two masters onto one socket.
For 2FA sites a person answers the second factor once, in their own ``ssh -M``; maelflow only rides
that master and says how to open it when there is none.

These commands run inside ecFlow's job commands, where a prompt would hang the server's submission of
every later task: nothing here prompts (BatchMode, no password or keyboard-interactive auth, stdin
closed), and every failure is a ``CredentialError`` (the file named, the site's ``renew_hint``), a
``HostKeyError``, a ``RemoteTimeout`` or a ``ConnectionLost`` within seconds.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import getpass
import hashlib
import math
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import weakref
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Callable, Iterator, TypeVar

from maelflow.errors import ConnectionLost, CredentialError, HostKeyError, RemoteTimeout, SiteError
from maelflow.sites.connections import RemoteResult
from maelflow.sites.connections.local import stream_lines
from maelflow.sites.connections.shell import RemoteCommandError, shell_path

CONTROL_PATH_ENV = "MAELFLOW_SSH_CONTROL_PATH"      # 2FA: where the operator's master listens
DEFAULT_2FA_CONTROL_PATH = "~/.ssh/maelflow-%r@%h:%p"
PERSIST_S = 120            # a master (shared by this user's maelflow processes) closes after this long idle
RETRY_DELAYS = (0.5, 1.5)  # three attempts in all
MASTER_CHECK_TIMEOUT_S = 3.0
# AES-GCM first: OpenSSH's default, chacha20-poly1305, moves half as many bytes per core where the
# CPU has AES instructions; the rest of the list for servers without GCM
CIPHERS = "aes128-gcm@openssh.com,aes256-gcm@openssh.com,chacha20-poly1305@openssh.com,aes128-ctr,aes256-ctr"

T = TypeVar("T")

# what the OpenSSH client itself says when it fails (exit 255), as opposed to the remote command
_SSH_FAILURE_RE = re.compile(r"^(ssh:|ssh_|mux_client|muxclient|Control socket|Connection (to|closed|reset|timed)|"
                             r"Host key verification failed|Permission denied|kex_|client_loop|"
                             r"Received disconnect|Broken pipe|banner exchange|Timeout, server|"
                             r"Too many authentication failures)", re.M)
# ... and, of those, the ones that mean the command never left this machine
_NOT_SENT_RE = re.compile(r"ssh: connect to host|Could not resolve|Connection refused|Connection timed out|"
                          r"No route to host|kex_exchange_identification|banner exchange|Network is unreachable")


# ------------------------------------------------------------------------------------- certificates
_VALID_RE = re.compile(r"Valid:\s+(?:from\s+(\S+)\s+to\s+(\S+)|(forever)|after\s+(\S+)|before\s+(\S+))")


def _parse_cert_time(text: str) -> datetime:
    utc = text.endswith("Z")
    stamp = datetime.strptime(text.rstrip("Z"), "%Y-%m-%dT%H:%M:%S")
    return stamp.replace(tzinfo=timezone.utc) if utc else stamp.astimezone()


def certificate_validity(cert_file: str) -> tuple[datetime | None, datetime | None] | None:
    """(valid from, valid to) of an OpenSSH certificate, None for an open end; None when unknown.

    Read with ``ssh-keygen -L`` before connecting, so an expired certificate is named as such
    instead of as the login node's bare refusal."""
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


def _private_dir() -> Path:
    """A folder only this user can enter, for master sockets: $XDG_RUNTIME_DIR, else ~/.ssh."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    base = Path(runtime) / "maelflow-ssh" if runtime and os.path.isdir(runtime) else \
        Path(os.path.expanduser("~/.ssh/maelflow"))
    base.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = base.stat()
    if st.st_uid != os.getuid():
        raise SiteError(f"{base} belongs to another user: it cannot hold this user's SSH master sockets")
    if st.st_mode & 0o077:
        base.chmod(0o700)
    return base


@contextlib.contextmanager
def _master_lock(control_path: str) -> Iterator[None]:
    """Held while a master is opened on ``control_path``: a second ``ssh -M -N -f`` onto a socket
    that another process has just bound would go on without multiplexing and never exit."""
    fd = os.open(f"{control_path}.lock", os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------------- connection
class SshConnection:
    """Commands and files on one site's login node, each an ``ssh`` process riding one master."""

    local = False

    def __init__(self, site_name: str, settings, *, dry_run: bool = False, control_path: str | None = None):
        """``settings``: the site's ``SshSettings``. ``control_path``: the 2FA master's socket (default
        ``$MAELFLOW_SSH_CONTROL_PATH`` or ``~/.ssh/maelflow-%r@%h:%p``); others get a private one."""
        self.site_name = site_name
        self.settings = settings
        self.dry_run = dry_run
        self.user = settings.user or getpass.getuser()
        self.twofa = settings.auth == "2fa"
        self._control_path = control_path
        self._master_pid: int | None = None       # the process that opened our master (closes it)
        self._lock = threading.RLock()

    @classmethod
    def for_site(cls, site_name: str, site, *, dry_run: bool = False) -> "SshConnection":
        """The process's connection for this site and login, so its commands share one handshake."""
        settings = site.connection.ssh
        if dry_run:
            return cls(site_name, settings, dry_run=True)
        key = (site_name, settings.host, settings.port, settings.user or getpass.getuser())
        with _SHARED_LOCK:
            conn = _SHARED.get(key)
            if conn is not None and conn.settings != settings:
                conn.close()
                conn = None
            if conn is None:
                conn = _SHARED[key] = cls(site_name, settings)
            return conn

    @property
    def target(self) -> str:
        return f"{self.user}@{self.settings.host}:{self.settings.port}"

    @property
    def host(self) -> str:
        return self.settings.host

    @property
    def control_path(self) -> str:
        if self._control_path is None:
            if self.twofa:
                self._control_path = os.environ.get(CONTROL_PATH_ENV) or DEFAULT_2FA_CONTROL_PATH
            else:
                # per login and per credential (another key must never ride this one's master), shared
                # by this user's maelflow processes: ecFlow starts one process per job command, and
                # they all ride the handshake of the first (docs/benchmarks.md, job submission)
                st = self.settings
                ident = "\0".join(str(v) for v in (st.host, st.port, self.user, st.auth, st.identity_file,
                                                   st.certificate_file, st.known_hosts, st.proxy_jump))
                self._control_path = str(_private_dir() / f"m-{hashlib.sha256(ident.encode()).hexdigest()[:16]}")
        return self._control_path

    # -- credentials ----------------------------------------------------------------------------
    def credential_error(self, what: str, file: str, hint: str | None = None) -> CredentialError:
        hint = f"{hint}; {self.settings.renew_hint}" if hint else self.settings.renew_hint
        return CredentialError(f"site {self.site_name}: {what} [{file}] ({self.settings.auth} auth, {self.target})",
                               hint=hint)

    def _identity(self) -> str:
        st = self.settings
        if st.identity_file:
            return os.path.expanduser(st.identity_file)
        for name in ("id_ed25519", "id_ecdsa", "id_rsa"):
            candidate = os.path.expanduser(f"~/.ssh/{name}")
            if os.path.exists(candidate):
                return candidate
        raise self.credential_error("no identity_file configured and no default key found", "~/.ssh/id_*")

    def _certificate(self) -> str:
        return os.path.expanduser(self.settings.certificate_file or f"{self._identity()}-cert.pub")

    def _check_credential(self) -> None:
        """What can be known before connecting: the files are there, the certificate is valid now,
        the agent holds a key."""
        st = self.settings
        if st.known_hosts and not os.path.isfile(os.path.expanduser(st.known_hosts)):
            raise HostKeyError(f"site {self.site_name}: known_hosts file {os.path.expanduser(st.known_hosts)} "
                               "is missing")
        if st.auth == "agent":
            sock = os.environ.get("SSH_AUTH_SOCK", "")
            listed = subprocess.run(["ssh-add", "-l"], capture_output=True, stdin=subprocess.DEVNULL,
                                    timeout=10) if sock and shutil.which("ssh-add") else None
            if listed is None or listed.returncode != 0:
                raise self.credential_error("no key loaded in the SSH agent", sock or "$SSH_AUTH_SOCK unset")
            return
        if st.auth not in ("key", "certificate"):
            return
        path = self._identity()
        if not os.path.isfile(path):
            raise self.credential_error("private key file is missing", path)
        if st.auth == "certificate":
            cert = self._certificate()
            if not os.path.isfile(cert):
                raise self.credential_error("certificate file is missing", cert)
            window = certificate_validity(cert)
            now = datetime.now().astimezone()
            if window and window[1] is not None and window[1] <= now:
                raise self.credential_error(f"certificate expired at {window[1]:%Y-%m-%d %H:%M:%S %Z}", cert)
            if window and window[0] is not None and window[0] > now:
                raise self.credential_error(f"certificate is not valid before {window[0]:%Y-%m-%d %H:%M:%S %Z}", cert)

    def _refused(self, why: str) -> CredentialError:
        """The login node refused the credential: name the file, and say when it is locked."""
        st = self.settings
        if self.twofa:
            return self.credential_error(f"the login node refused the session ({why})",
                                         os.path.expanduser(self.control_path), self._open_hint())
        if st.auth == "agent":
            return self.credential_error(f"the login node refused the agent's keys ({why})",
                                         os.environ.get("SSH_AUTH_SOCK", "$SSH_AUTH_SOCK"))
        path = self._identity()
        locked = subprocess.run(["ssh-keygen", "-y", "-P", "", "-f", path], capture_output=True,
                                stdin=subprocess.DEVNULL, timeout=10)
        if locked.returncode != 0 and b"passphrase" in locked.stderr:
            return self.credential_error("private key is passphrase-protected: load it in an agent and use "
                                         "auth: agent", path)
        what = self._certificate() if st.auth == "certificate" else path
        return self.credential_error(f"the login node refused the key ({why})", what)

    def _open_hint(self) -> str:
        st = self.settings
        return (f"after your 2FA login open one with: ssh -M -o ControlPersist=12h "
                f"-o ControlPath='{self.control_path}' -p {st.port} {self.user}@{st.host}")

    # -- argv -----------------------------------------------------------------------------------
    def ssh_command(self) -> list[str]:
        """``ssh`` and its options, without the host: reaches this site over this connection's
        master, never prompting. What rsync's ``-e`` takes (the host follows in its destination)."""
        st = self.settings
        argv = ["ssh", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={math.ceil(st.connect_timeout)}",
                "-o", "PasswordAuthentication=no", "-o", "KbdInteractiveAuthentication=no",
                "-o", "StrictHostKeyChecking=yes", "-o", "ServerAliveInterval=15", "-o", "ServerAliveCountMax=4",
                "-c", CIPHERS, "-o", f"ControlPath={self.control_path}"]
        if self.twofa:
            argv += ["-o", "ControlMaster=no"]
        else:
            argv += ["-o", "ControlMaster=auto", "-o", f"ControlPersist={PERSIST_S}"]
        argv += ["-p", str(st.port), "-l", self.user]
        if st.auth in ("key", "certificate"):
            argv += ["-o", "IdentitiesOnly=yes", "-i", self._identity()]
            if st.auth == "certificate":
                argv += ["-o", f"CertificateFile={self._certificate()}"]
        if st.known_hosts:
            argv += ["-o", f"UserKnownHostsFile={os.path.expanduser(st.known_hosts)}",
                     "-o", "GlobalKnownHostsFile=/dev/null"]
        if st.proxy_jump:
            argv += ["-J", st.proxy_jump]
        return argv

    # -- the master -----------------------------------------------------------------------------
    def _connected(self) -> None:
        """The master is up (ours opened now if needed, the operator's checked); setting ours up is
        retried when the network failed (nothing was sent), never when the credential was refused."""
        with self._lock:
            if self.twofa:
                if self._master_pid is None:
                    self._check_2fa_master()
                    self._master_pid = os.getpid()
                return
            if os.path.exists(self.control_path):
                # ours, or another maelflow process's with the same login and credential: ride it (a
                # stale socket is replaced by the command's own ssh, ControlMaster=auto)
                return
            with _master_lock(self.control_path):
                if os.path.exists(self.control_path):       # another process opened it meanwhile
                    return
                self._check_credential()
                for delay in (*RETRY_DELAYS, None):
                    try:
                        self._open_master()
                        break
                    except ConnectionLost:
                        if delay is None:
                            raise
                        time.sleep(delay)
            self._master_pid = os.getpid()
            _OPEN.add(self)

    def _check_2fa_master(self) -> None:
        try:
            proc = subprocess.run([*self.ssh_command(), "-O", "check", self.host], stdin=subprocess.DEVNULL,
                                  capture_output=True, timeout=MASTER_CHECK_TIMEOUT_S, start_new_session=True)
        except subprocess.TimeoutExpired:
            proc = None
        if proc is None or proc.returncode != 0:
            raise self.credential_error("no live SSH master session", os.path.expanduser(self.control_path),
                                        self._open_hint())

    def _open_master(self) -> None:
        argv = [*self.ssh_command(), "-o", "ControlMaster=yes", "-N", "-f", self.host]
        try:
            proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True,
                                  timeout=self.settings.connect_timeout * 3 + 5, start_new_session=True)
        except subprocess.TimeoutExpired:
            raise ConnectionLost(f"{self.target}: no answer within {self.settings.connect_timeout:.0f} s",
                                 sent=False) from None
        if proc.returncode != 0:
            err = proc.stderr.decode(errors="replace").strip()
            self._raise_failure(255, err, sent=False)
            raise ConnectionLost(f"{self.target}: cannot connect: {err or f'ssh exited with {proc.returncode}'}",
                                 sent=False)

    def _raise_failure(self, rc: int, err: str, sent: bool | None = None) -> None:
        """What the OpenSSH client itself failed at (exit 255): the credential, the host key, the
        connection. Anything else is the remote command's own result."""
        if rc != 255:
            return
        if "Permission denied" in err or "Too many authentication failures" in err:
            raise self._refused(err.strip().splitlines()[-1])
        if "Host key verification failed" in err or "HOST IDENTIFICATION HAS CHANGED" in err:
            kh = self.settings.known_hosts or "~/.ssh/known_hosts"
            raise HostKeyError(f"site {self.site_name}: the host key of {self.target} is unknown or changed "
                               f"({err.strip().splitlines()[-1]})",
                               hint=f"add the login node's host key to {kh} (ssh-keyscan, checked against "
                               "the site's published fingerprint), or check with the site if it changed")
        if _SSH_FAILURE_RE.search(err):
            raise ConnectionLost(f"{self.target}: {err.strip()}",
                                 sent=bool(sent if sent is not None else not _NOT_SENT_RE.search(err)))
        if not self._master_alive():
            # a client of a master that died exits 255 and says nothing: the connection, not the command
            raise ConnectionLost(f"{self.target}: the connection closed while a command ran", sent=True)

    def _master_alive(self) -> bool:
        try:
            return subprocess.run([*self.ssh_command(), "-O", "check", self.host], stdin=subprocess.DEVNULL,
                                  capture_output=True, timeout=MASTER_CHECK_TIMEOUT_S).returncode == 0
        except subprocess.TimeoutExpired:
            return False

    # -- commands -------------------------------------------------------------------------------
    def _exec(self, command: str, input: bytes | None, timeout: float, stdin=None) -> tuple[int, bytes, bytes]:
        """One ``ssh`` process for ``command`` over the master; its stdin is ``input``, or the open
        file ``stdin``, or nothing."""
        argv = [*self.ssh_command(), "-T", self.host, command]
        try:
            proc = subprocess.run(argv, input=input, stdin=stdin if stdin is not None else
                                  (None if input is not None else subprocess.DEVNULL),
                                  capture_output=True, timeout=timeout, start_new_session=True)
        except subprocess.TimeoutExpired:
            raise RemoteTimeout(f"{self.target}: `{command[:120]}` still running after {timeout:.0f} s") from None
        self._raise_failure(proc.returncode, proc.stderr.decode(errors="replace"))
        return proc.returncode, proc.stdout, proc.stderr

    def _call(self, op: Callable[[], T], retry: bool) -> T:
        for delay in (*RETRY_DELAYS, None):
            self._connected()
            try:
                return op()
            except ConnectionLost as exc:
                if (exc.sent and not retry) or delay is None:
                    raise
                time.sleep(delay)
        raise AssertionError("unreachable")

    def _say(self, text: str) -> None:
        print(f"[dry-run] {self.target}: {text}", file=sys.stdout, flush=True)

    def run(self, command: str, *, input: bytes | None = None, timeout: float = 60, check: bool = True,
            retry: bool = True) -> RemoteResult:
        """Run ``command`` in the login shell. ``retry=False`` for commands that must not run twice:
        a connection lost after sending them raises ConnectionLost(sent=True) for the caller to sort out."""
        if self.dry_run:
            self._say(command)
            return RemoteResult(0, "", "")
        rc, out, err = self._call(lambda: self._exec(command, input, timeout), retry)
        result = RemoteResult(rc, out.decode(errors="replace"), err.decode(errors="replace"))
        if check and rc != 0:
            raise RemoteCommandError(self.target, command, result)
        return result

    def run_lines(self, command: str, on_line: Callable[[str], None], *, timeout: float = 86400,
                  check: bool = True) -> RemoteResult:
        """Run ``command`` and hand each line of its stdout to ``on_line`` as it comes (progress of a
        long remote job); stderr is returned at the end. Never retried once sent."""
        if self.dry_run:
            self._say(command)
            return RemoteResult(0, "", "")
        self._connected()
        result = stream_lines([*self.ssh_command(), "-T", self.host, command], command, on_line, timeout,
                              False, self.target)
        self._raise_failure(result.rc, result.stderr, sent=True)
        if check and result.rc != 0:
            raise RemoteCommandError(self.target, command, result)
        return result

    def _checked(self, command: str, input: bytes | None = None, stdin=None, timeout: float = 600) -> bytes:
        def op() -> bytes:
            rc, out, err = self._exec(command, input, timeout, stdin)
            if rc != 0:
                raise RemoteCommandError(self.target, command, RemoteResult(rc, out.decode(errors="replace"),
                                                                            err.decode(errors="replace")))
            return out
        return self._call(op, retry=True)

    # -- files ----------------------------------------------------------------------------------
    def _write_aside(self, remote_path: str, mode: int | None) -> str:
        """A command writing its stdin to ``remote_path`` so that readers see the old file or the whole
        new one, never a part."""
        p = PurePosixPath(remote_path)
        tmp = str(p.parent / f".{p.name}.tmp")
        chmod = f" && chmod {mode:o} {shell_path(tmp)}" if mode is not None else ""
        return (f"mkdir -p {shell_path(str(p.parent))} && cat > {shell_path(tmp)}{chmod} && "
                f"mv -f {shell_path(tmp)} {shell_path(remote_path)}")

    def put_text(self, remote_path: str, text: str, mode: int | None = None) -> None:
        data = text.encode()
        if self.dry_run:
            self._say(f"write {len(data)} bytes to {remote_path}" + (f" (mode {mode:o})" if mode else ""))
            return
        self._checked(self._write_aside(remote_path, mode), input=data)

    def put_file(self, local: str | os.PathLike[str], remote_path: str, mode: int | None = None) -> None:
        if self.dry_run:
            self._say(f"copy {local} to {remote_path}")
            return
        command = self._write_aside(remote_path, mode)

        def op() -> None:
            with open(local, "rb") as fh:
                rc, out, err = self._exec(command, None, 600, stdin=fh)
            if rc != 0:
                raise RemoteCommandError(self.target, command, RemoteResult(rc, out.decode(errors="replace"),
                                                                            err.decode(errors="replace")))
        self._call(op, retry=True)

    def read_bytes(self, remote_path: str, offset: int = 0, limit: int | None = None) -> bytes:
        """Bytes from ``offset`` on: how job output is tailed without reading it all again."""
        if self.dry_run:
            self._say(f"read {remote_path} from byte {offset}")
            return b""
        p = shell_path(remote_path)
        command = f"test -e {p} || exit 44; tail -c +{offset + 1} {p}" + (f" | head -c {limit}" if limit else "")
        rc, out, err = self._call(lambda: self._exec(command, None, 600), retry=True)
        if rc == 44:
            raise FileNotFoundError(2, "No such file", remote_path)
        if rc != 0:
            raise RemoteCommandError(self.target, command, RemoteResult(rc, "", err.decode(errors="replace")))
        return out

    def exists(self, remote_path: str) -> bool:
        command = f"test -e {shell_path(remote_path)}"
        if self.dry_run:
            self._say(command)
            return False
        return self._call(lambda: self._exec(command, None, 60), retry=True)[0] == 0

    def makedirs(self, remote_path: str) -> None:
        command = f"mkdir -p {shell_path(remote_path)}"
        if self.dry_run:
            self._say(command)
            return
        self._checked(command, timeout=60)

    def rename(self, src: str, dst: str) -> None:
        """Rename on the site (POSIX rename: replaces a file, fails on a non-empty folder)."""
        command = f"mv -f -T {shell_path(src)} {shell_path(dst)}"
        if self.dry_run:
            self._say(command)
            return
        self._checked(command, timeout=60)

    def check(self) -> None:
        """Connect now: raises CredentialError/HostKeyError/ConnectionLost instead of at first use."""
        if not self.dry_run:
            self._connected()

    def close(self, stop: bool = False) -> None:
        """Forget the master; ``stop``: also tell it to exit. It is shared by this user's maelflow
        processes (another may be riding it now), so by default it is left to close itself after
        ``PERSIST_S`` idle. A 2FA master is the operator's: never stopped."""
        with self._lock:
            self._master_pid = None
            if stop and not self.twofa and not self.dry_run and os.path.exists(self.control_path):
                subprocess.run([*self.ssh_command(), "-O", "exit", self.host], stdin=subprocess.DEVNULL,
                               capture_output=True, timeout=10)


# ------------------------------------------------------------------------------------- reuse
_SHARED: dict[tuple[str, str, int, str], SshConnection] = {}
_SHARED_LOCK = threading.Lock()
_OPEN: "weakref.WeakSet[SshConnection]" = weakref.WeakSet()    # every connection that opened a master


def close_all(stop: bool = False) -> None:
    """Forget every connection of this process (at exit); ``stop``: also stop the masters it opened."""
    with _SHARED_LOCK:
        conns = {*_SHARED.values(), *_OPEN}
        _SHARED.clear()
    for conn in conns:
        try:
            conn.close(stop=stop)
        except Exception:  # noqa: BLE001 - closing at exit: nothing left to tell
            pass


atexit.register(close_all)

__all__ = ["CONTROL_PATH_ENV", "SshConnection", "certificate_validity", "close_all", "shell_path"]

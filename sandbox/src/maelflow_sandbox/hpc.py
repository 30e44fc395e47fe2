"""The loopback HPC site: sshd + a small SLURM cluster (munged, slurmctld, one slurmd per node) on 127.0.0.1.

It stands in for a EuroHPC login node and its batch system. The rest of maelflow must not know it
is local: it reaches the site the way it reaches LUMI or Leonardo, through SSH (host 127.0.0.1, a
non-default port, a dedicated unprivileged user with its own key, a pinned host key) and SLURM
commands run over that SSH connection. The user's home directory on this machine plays the site's
shared filesystem.

Layout, for a workspace ``ws``::

    <ws>/hpc/site.json                  user, site id, node names, runtime dir (fixed at first ``up``)
    <ws>/hpc/id_ed25519{,.pub}          the client key (mode 600), installed in ~user/.ssh/authorized_keys
    <ws>/hpc/known_hosts                pins the host key for [127.0.0.1]:PORT
    <ws>/hpc/ssh_config                 ``ssh -F <ws>/hpc/ssh_config maelflow-hpc`` reaches the site
    <ws>/hpc/<daemon>/                  pid, log and state.json of munge, slurmctld, slurmd (the
                                        first node; slurmd-2, ... the others), sshd
    <ws>/hpc/sshd/sshd_config           and the host key
    <ws>/hpc/slurmctld/state/           StateSaveLocation
    /run/maelflow/hpc-<id>/             what the site's user must read: slurm.conf, the munge socket,
                                        the slurmd spools (``slurmd/<node>``: batch scripts run
                                        from there) and the job-completion log. The workspace usually sits under a 0700
                                        directory (/root, pytest's tmp), which the user cannot traverse.

The key line in authorized_keys carries ``environment="SLURM_CONF=..."`` (sshd_config has
``PermitUserEnvironment SLURM_CONF``), so every SSH session opened with this workspace's key talks to
this workspace's cluster, and two workspaces sharing the user never mix up their clusters.

The cluster has ``MAELFLOW_HPC_NODES`` nodes (2 by default, fixed at the first ``up``), so that a job
of several nodes (``srun`` across them, DDP) runs here as on a EuroHPC machine: each node is a
slurmd of its own on this machine (``slurmd -N <node>``), with its own port (``Port=`` on its
``NodeName`` line), spool and pid file (``%n`` in slurm.conf), all nodes declaring this machine's
CPUs. The first node is named after the host, the others ``<host>-2``, ``<host>-3``...

Everything listens on 127.0.0.1 only: sshd by ``ListenAddress``, slurmctld and the slurmds (which
have no bind option) through the LD_PRELOAD helper of :mod:`maelflow.services.loopback`, munged on
a unix socket. ``srun`` inside a job listens too (for its tasks' I/O and messages): the site's
``srun`` runs under the same helper, see :func:`LoopbackHpc.launch_environment`. We stop only
processes we started, by PID.

The site user controls its home: ``up`` runs as root, so what it does there (``~/.ssh``, its lock
and ``authorized_keys``) goes through directory file descriptors opened without following
symlinks, and refuses a symlink or a hard-linked file instead of acting on what it points to.

maelflow finds :class:`LoopbackHpc` as the service ``hpc`` of the ``maelflow.services`` entry-point
group, and the site's ``{hpc_*}`` placeholders through :mod:`maelflow_sandbox.placeholders`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

from maelflow.services.base import (
    LOOPBACK, ManagedService, ServiceError, ServiceInfo, pid_alive, wait_until)
from maelflow.workspace import Workspace
from maelflow.services.loopback import preload_env

DEFAULT_USER = "maelhpc"
USER_ENV = "MAELFLOW_HPC_USER"
NODES_ENV = "MAELFLOW_HPC_NODES"
DEFAULT_NODES = 2
RUNTIME_ENV = "MAELFLOW_HPC_RUNTIME"
DEFAULT_RUNTIME_ROOT = "/run/maelflow"
CLUSTER = "maelflow"
PARTITIONS = ("debug", "batch")
DEFAULT_PARTITION = "debug"
HOST_ALIAS = "maelflow-hpc"
MUNGE_KEY = Path("/etc/munge/munge.key")
MARKER_ENV = "MAELFLOW_HPC_SITE"   # set in every daemon we start, so strays can be found by PID
MIN_JOB_AGE = 300                  # seconds a finished job stays visible to squeue/scontrol
KILL_WAIT = 5

# binary -> Debian package that ships it
_PACKAGES = {
    "/usr/sbin/sshd": "openssh-server",
    "ssh": "openssh-client",
    "ssh-keygen": "openssh-client",
    "/usr/sbin/munged": "munge",
    "munge": "munge",
    "unmunge": "munge",
    "/usr/sbin/slurmctld": "slurm-wlm",
    "/usr/sbin/slurmd": "slurm-wlm",
    "sbatch": "slurm-wlm",
    "squeue": "slurm-wlm",
    "scontrol": "slurm-wlm",
    "scancel": "slurm-wlm",
    "sinfo": "slurm-wlm",
    "setpriv": "util-linux",
    "useradd": "passwd",
    "usermod": "passwd",
}


def _which(binary: str) -> str | None:
    if binary.startswith("/"):
        return binary if os.access(binary, os.X_OK) else None
    return shutil.which(binary) or next(
        (p for p in (f"/usr/sbin/{binary}", f"/usr/bin/{binary}", f"/sbin/{binary}")
         if os.access(p, os.X_OK)), None)


def _require(*binaries: str) -> None:
    missing = [b for b in binaries if not _which(b)]
    if missing:
        pkgs = sorted({_PACKAGES.get(b, b) for b in missing})
        raise ServiceError(f"the loopback HPC site needs {', '.join(missing)}: "
                           f"apt-get install {' '.join(pkgs)} (or run scripts/install.sh)")


def _run(argv: Sequence[str], *, env: dict[str, str] | None = None, timeout: float = 15.0,
         input: bytes | None = None, check: bool = False) -> subprocess.CompletedProcess:
    full_env = dict(os.environ)
    if env:
        full_env.update(env)
    proc = subprocess.run(list(argv), env=full_env, input=input, capture_output=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise ServiceError(f"{' '.join(argv)} failed ({proc.returncode}): "
                           f"{proc.stderr.decode(errors='replace').strip()}")
    return proc


def _write_if_changed(path: Path, text: str, mode: int = 0o644) -> bool:
    """Write atomically when the content differs; return whether it changed."""
    try:
        if path.read_text() == text:
            os.chmod(path, mode)
            return False
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.chmod(tmp, mode)
    os.replace(tmp, path)
    return True


def _memory_mb() -> int:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) // 1024
    except OSError:
        pass
    return 1024


# ---------------------------------------------------------------------------------------------
# one ManagedService per daemon
# ---------------------------------------------------------------------------------------------
class _HpcDaemon(ManagedService):
    daemon = "daemon"

    def __init__(self, site: "LoopbackHpc"):
        super().__init__(site.ws)
        self.site = site
        self.dir = site.root / self.daemon

    # state lives beside the pid file in <ws>/hpc/<daemon>/, not in <ws>/<name>/
    def state(self) -> dict[str, Any]:
        return self.ws.read_json(*self.dir.relative_to(self.ws.root).parts, "state.json",
                                 default={}) or {}

    def save_state(self, **values: Any) -> None:
        data = self.state()
        data.update(values)
        self.ws.write_json(data, *self.dir.relative_to(self.ws.root).parts, "state.json")

    def current_port(self) -> int | None:
        return self.state().get("port")

    def planned_port(self) -> int:
        """The port to write into configs: the live one when running, else a free persistent one."""
        if self.running() and self.current_port():
            return int(self.current_port())
        return self.port()

    def daemon_env(self) -> dict[str, str]:
        return {MARKER_ENV: self.site.site_id, "SLURM_CONF": str(self.site.slurm_conf),
                "LANG": "C", "TZ": os.environ.get("TZ", "UTC")}

    def slurm_env(self) -> dict[str, str]:
        return {"SLURM_CONF": str(self.site.slurm_conf)}


class MungeService(_HpcDaemon):
    """munged as user munge, on a private socket in the site's runtime dir."""

    name = "hpc-munge"
    daemon = "munge"
    start_timeout = 20.0

    def port(self) -> int:       # a unix socket, no TCP port
        return 0

    def url(self) -> str | None:
        return f"unix://{self.site.munge_socket}"

    def check_available(self) -> None:
        _require("/usr/sbin/munged", "munge", "unmunge", "setpriv")
        try:
            pwd.getpwnam("munge")
        except KeyError:
            raise ServiceError("user 'munge' is missing: apt-get install --reinstall munge") from None

    def command(self, port: int) -> tuple[Sequence[str], dict[str, str]]:
        ensure_munge_key()
        mw = pwd.getpwnam("munge")
        d = self.site.munge_socket.parent
        d.mkdir(parents=True, exist_ok=True)
        os.chown(d, mw.pw_uid, mw.pw_gid)
        os.chmod(d, 0o755)
        argv = [_which("setpriv"), "--reuid", "munge", "--regid", "munge", "--init-groups", "--",
                "/usr/sbin/munged", "--foreground", "--force",
                f"--socket={self.site.munge_socket}",
                f"--pid-file={d / 'munged.pid'}",
                f"--seed-file={d / 'munged.seed'}",
                "--log-file=/dev/null",          # in the foreground it logs to stderr: our log
                f"--key-file={MUNGE_KEY}"]
        return argv, {MARKER_ENV: self.site.site_id}

    def healthy(self) -> bool:
        sock = str(self.site.munge_socket)
        cred = _run(["munge", "-n", "-S", sock], timeout=5)
        if cred.returncode != 0:
            return False
        return _run(["unmunge", "-S", sock], input=cred.stdout, timeout=5).returncode == 0

    def extra(self) -> dict[str, Any]:
        return {"socket": str(self.site.munge_socket)}


class SlurmctldService(_HpcDaemon):
    name = "hpc-slurmctld"
    daemon = "slurmctld"
    start_timeout = 30.0

    def url(self) -> str | None:
        port = self.current_port()
        return f"slurm://{LOOPBACK}:{port}" if port else None

    def check_available(self) -> None:
        _require("/usr/sbin/slurmctld", "scontrol")

    def command(self, port: int) -> tuple[Sequence[str], dict[str, str]]:
        self.site.state_dir.mkdir(parents=True, exist_ok=True)
        env = self.daemon_env()
        env.update(preload_env())
        return ["/usr/sbin/slurmctld", "-D", "-f", str(self.site.slurm_conf)], env

    def after_start(self) -> None:
        # slurmctld's jobcomp/filetxt resets JobCompLoc to 0644 when it opens it: hand the group
        # write bit back, so `sacct --completion` works for the site user (see ensure_runtime)
        try:
            os.chmod(self.site.jobcomp_file, 0o664)
        except FileNotFoundError:
            pass

    def healthy(self) -> bool:
        proc = _run(["scontrol", "ping"], env=self.slurm_env(), timeout=10)
        return proc.returncode == 0 and b"is UP" in proc.stdout

    def extra(self) -> dict[str, Any]:
        return {"port": self.current_port(), "slurm_conf": str(self.site.slurm_conf),
                "cluster": CLUSTER}


class SlurmdService(_HpcDaemon):
    """The slurmd of one node (``index`` 0 is the first: ``hpc-slurmd`` in ``<ws>/hpc/slurmd/``; the
    others ``hpc-slurmd-2`` ... in ``<ws>/hpc/slurmd-2/`` ...)."""

    name = "hpc-slurmd"
    daemon = "slurmd"
    start_timeout = 30.0
    READY = {"idle", "mixed", "allocated", "completing", "mix", "alloc", "comp"}

    def __init__(self, site: "LoopbackHpc", node: str | None = None, index: int = 0):
        if index:
            self.name, self.daemon = f"hpc-slurmd-{index + 1}", f"slurmd-{index + 1}"
        super().__init__(site)
        self.node = node or site.node

    def url(self) -> str | None:
        port = self.current_port()
        return f"slurm://{LOOPBACK}:{port}" if port else None

    def check_available(self) -> None:
        _require("/usr/sbin/slurmd", "sinfo")

    def command(self, port: int) -> tuple[Sequence[str], dict[str, str]]:
        for spool in (self.site.spool_dir, self.site.spool_dir / self.node):
            spool.mkdir(parents=True, exist_ok=True)
            os.chmod(spool, 0o755)
        self.resume_if_down()
        env = self.daemon_env()
        env.update(preload_env())
        return ["/usr/sbin/slurmd", "-D", "-f", str(self.site.slurm_conf), "-N", self.node], env

    def node_state(self) -> str:
        proc = _run(["sinfo", "-h", "-N", "-n", self.node, "-o", "%T"],
                    env=self.slurm_env(), timeout=10)
        lines = proc.stdout.decode().split()
        return lines[0] if proc.returncode == 0 and lines else "unknown"

    def resume_if_down(self) -> None:
        """A node left DOWN/DRAIN by an earlier run is put back in service before slurmd registers."""
        try:
            state = self.node_state().rstrip("*~#!%$@^-").lower()
        except Exception:
            return
        if state.startswith(("down", "drain", "fail")):
            _run(["scontrol", "update", f"nodename={self.node}", "state=resume"],
                 env=self.slurm_env(), timeout=10)

    def healthy(self) -> bool:
        state = self.node_state().lower()
        return state in self.READY      # a trailing '*' (not responding) does not count

    def extra(self) -> dict[str, Any]:
        try:
            state = self.node_state()
        except Exception:
            state = "unknown"
        return {"port": self.current_port(), "node": self.node, "node_state": state}


class SshdService(_HpcDaemon):
    name = "hpc-sshd"
    daemon = "sshd"
    start_timeout = 20.0

    @property
    def config_file(self) -> Path:
        return self.dir / "sshd_config"

    @property
    def host_key(self) -> Path:
        return self.dir / "ssh_host_ed25519_key"

    def url(self) -> str | None:
        port = self.current_port()
        return f"ssh://{self.site.user}@{LOOPBACK}:{port}" if port else None

    def check_available(self) -> None:
        _require("/usr/sbin/sshd", "ssh", "ssh-keygen")

    def command(self, port: int) -> tuple[Sequence[str], dict[str, str]]:
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)   # privilege separation dir
        self.site.write_sshd_config(port)
        check = _run(["/usr/sbin/sshd", "-t", "-f", str(self.config_file)], timeout=10)
        if check.returncode != 0:
            raise ServiceError(f"sshd rejects {self.config_file}: "
                               f"{check.stderr.decode(errors='replace').strip()}")
        return (["/usr/sbin/sshd", "-D", "-f", str(self.config_file), "-E", str(self.log_file)],
                {MARKER_ENV: self.site.site_id})

    def healthy(self) -> bool:
        port = self.current_port()
        if not port:
            return False
        with socket.create_connection((LOOPBACK, int(port)), timeout=2) as s:
            s.settimeout(2)
            return s.recv(64).startswith(b"SSH-2.0-")

    def extra(self) -> dict[str, Any]:
        return {"port": self.current_port(), "user": self.site.user,
                "identity_file": str(self.site.identity_file),
                "known_hosts": str(self.site.known_hosts), "ssh_config": str(self.site.ssh_config)}


# ---------------------------------------------------------------------------------------------
# the site
# ---------------------------------------------------------------------------------------------
class LoopbackHpc:
    """The four daemons, their shared configuration and the dedicated user, for one workspace."""

    optional = True  # started by `maelflow services up --with-hpc`, not by default

    def __init__(self, ws: Workspace, user: str | None = None):
        self.ws = ws
        self.root = ws.path("hpc")
        recorded = ws.read_json("hpc", "site.json", default={}) or {}
        self.site_id = recorded.get("site_id") or hashlib.sha256(
            str(ws.root).encode()).hexdigest()[:12]
        self.user = user or recorded.get("user") or os.environ.get(USER_ENV) or DEFAULT_USER
        self.node = recorded.get("node") or socket.gethostname().split(".")[0]
        self.nodes: list[str] = list(recorded.get("nodes") or node_names(self.node, _node_count()))
        runtime_root = os.environ.get(RUNTIME_ENV) or DEFAULT_RUNTIME_ROOT
        self.runtime = Path(recorded.get("runtime") or Path(runtime_root) / f"hpc-{self.site_id}")
        self.munge = MungeService(self)
        self.slurmctld = SlurmctldService(self)
        self.slurmds = [SlurmdService(self, node, i) for i, node in enumerate(self.nodes)]
        self.slurmd = self.slurmds[0]
        self.sshd = SshdService(self)

    # -- paths ------------------------------------------------------------------------------------
    @property
    def services(self) -> list[_HpcDaemon]:
        """In start order; stopped in reverse."""
        return [self.munge, self.slurmctld, *self.slurmds, self.sshd]

    @property
    def identity_file(self) -> Path:
        return self.root / "id_ed25519"

    @property
    def known_hosts(self) -> Path:
        return self.root / "known_hosts"

    @property
    def ssh_config(self) -> Path:
        return self.root / "ssh_config"

    @property
    def slurm_conf(self) -> Path:
        return self.runtime / "slurm.conf"

    @property
    def munge_socket(self) -> Path:
        return self.runtime / "munge" / "munge.socket.2"

    @property
    def spool_dir(self) -> Path:
        return self.runtime / "slurmd"

    @property
    def jobcomp_file(self) -> Path:
        return self.runtime / "jobcomp.txt"

    @property
    def task_prolog(self) -> Path:
        return self.runtime / "task_prolog.sh"

    @property
    def state_dir(self) -> Path:
        return self.root / "slurmctld" / "state"

    def passwd(self) -> pwd.struct_passwd | None:
        try:
            return pwd.getpwnam(self.user)
        except KeyError:
            return None

    def home(self) -> Path | None:
        pw = self.passwd()
        return Path(pw.pw_dir) if pw else None

    # -- availability -------------------------------------------------------------------------
    def check_available(self) -> None:
        if os.geteuid() != 0:
            raise ServiceError("the loopback HPC site needs root: it creates the site user "
                               f"'{self.user}' and runs sshd, munged and slurmd")
        _require("useradd", "usermod")
        for svc in self.services:
            svc.check_available()

    # -- preparation --------------------------------------------------------------------------
    def ensure_user(self) -> pwd.struct_passwd:
        try:
            pw = pwd.getpwnam(self.user)
        except KeyError:
            made = _run(["useradd", "--create-home", "--shell", "/bin/bash", "--user-group",
                         "--comment", "maelflow loopback HPC site", self.user])
            try:            # exit 9: another site on this machine made the user at the same moment
                pw = pwd.getpwnam(self.user)
            except KeyError:
                raise ServiceError(f"useradd {self.user} failed ({made.returncode}): "
                                   f"{made.stderr.decode(errors='replace').strip()}") from None
        # useradd leaves the password '!' (locked); sshd with UsePAM no refuses locked accounts
        # even for key logins. '*' means "no password can match" but is not locked.
        if _shadow_password(self.user).startswith("!"):
            _run(["usermod", "-p", "*", self.user], check=True)
        home = Path(pw.pw_dir)
        if not home.is_dir():
            home.mkdir(mode=0o755, parents=True)
            os.chown(home, pw.pw_uid, pw.pw_gid)
        return pw

    def ensure_keys(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        if not self.identity_file.exists():
            _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C",
                  f"maelflow-hpc-{self.site_id}", "-f", str(self.identity_file)], check=True)
        os.chmod(self.identity_file, 0o600)
        host_key = self.sshd.host_key
        if not host_key.exists():
            host_key.parent.mkdir(parents=True, exist_ok=True)
            _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C",
                  f"maelflow-hpc-host-{self.site_id}", "-f", str(host_key)], check=True)
        os.chmod(host_key, 0o600)

    def install_key(self, pw: pwd.struct_passwd) -> bool:
        """Put this workspace's key in the user's authorized_keys once, carrying SLURM_CONF."""
        ktype, blob = Path(f"{self.identity_file}.pub").read_text().split()[:2]
        line = (f'environment="SLURM_CONF={self.slurm_conf}" {ktype} {blob} '
                f"maelflow-hpc-{self.site_id}")
        with _SshDir.locked(pw, create=True) as ssh_dir:
            assert ssh_dir is not None  # made when missing
            old = ssh_dir.read_lines("authorized_keys")
            if [ln for ln in old if f" {blob}" in ln] == [line]:
                return False
            ssh_dir.write_lines("authorized_keys", [ln for ln in old if f" {blob}" not in ln] + [line])
        return True

    def ensure_runtime(self, pw: pwd.struct_passwd) -> None:
        for d in (self.runtime.parent, self.runtime):
            d.mkdir(parents=True, exist_ok=True)
            os.chmod(d, 0o755)
        # sacct --completion opens JobCompLoc for appending (the jobcomp/filetxt plugin's init does)
        # even to read it, so the site user's group must be able to write it.
        self.jobcomp_file.touch(exist_ok=True)
        os.chown(self.jobcomp_file, 0, pw.pw_gid)
        os.chmod(self.jobcomp_file, 0o664)
        _write_if_changed(self.task_prolog, self.task_prolog_text(), 0o755)

    def launch_environment(self) -> dict[str, str]:
        """What every task of a job gets on this site (slurm.conf's ``TaskProlog`` exports it): the
        bind helper, so ``srun`` and a training's rendezvous (torch's TCPStore) listen on 127.0.0.1
        like the daemons; the main address of a multi-node training (Lightning reads MASTER_ADDR,
        else it resolves the first node's name, this machine's address on its network); gloo's
        interface (it listens on the address of the interface it picks, by default the host
        name's). A EuroHPC site sets the like for its fabric (docs/training.md, GPU sites).

        MASTER_ADDR is ::1 where this machine has IPv6: torch's TCPStore listens on the IPv6
        wildcard there, which the helper turns into ::1 (not 127.0.0.1)."""
        return {**preload_env(), "MASTER_ADDR": "::1" if _ipv6_loopback() else LOOPBACK,
                "GLOO_SOCKET_IFNAME": "lo"}

    def task_prolog_text(self) -> str:
        lines = ["#!/bin/sh", f"# Generated by maelflow for workspace {self.ws.root}: SLURM's TaskProlog. Each",
                 "# 'export NAME=value' line it prints is set in the environment of every task of a job."]
        lines += [f"echo 'export {k}={v}'" for k, v in self.launch_environment().items()]
        return "\n".join(lines) + "\n"

    def slurm_conf_text(self, ctld_port: int, slurmd_ports: int | Sequence[int]) -> str:
        """slurm.conf for the cluster; ``slurmd_ports``: one per node (an int: the first node's)."""
        ports = [slurmd_ports] if isinstance(slurmd_ports, int) else list(slurmd_ports)
        if len(ports) != len(self.nodes):
            raise ValueError(f"{len(self.nodes)} nodes need as many slurmd ports, got {ports}")
        cpus = os.cpu_count() or 1
        mem = max(256, int(_memory_mb() * 0.9))
        nodes = ",".join(self.nodes)
        lines = [
            f"# Generated by maelflow for workspace {self.ws.root} -- rewritten at every 'up'.",
            f"ClusterName={CLUSTER}",
            f"SlurmctldHost={self.node}({LOOPBACK})",
            f"SlurmctldPort={ctld_port}",
            f"SlurmdPort={ports[0]}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket}",
            f"StateSaveLocation={self.state_dir}",
            # one slurmd per node on this machine: %n (the node name) keeps their files apart
            f"SlurmdSpoolDir={self.spool_dir}/%n",
            f"SlurmctldPidFile={self.slurmctld.dir / 'slurmctld.pid'}",
            f"SlurmdPidFile={self.spool_dir}/%n.pid",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "MpiDefault=none",
            "MailProg=/bin/true",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "SchedulerType=sched/backfill",
            # batch jobs start at submit time instead of up to 3 s later (the default delay)
            "SchedulerParameters=batch_sched_delay=0",
            "SlurmdParameters=config_overrides",
            "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none",
            "JobCompType=jobcomp/filetxt",
            # every task (a batch script, each srun task) gets the loopback environment
            f"TaskProlog={self.task_prolog}",
            f"JobCompLoc={self.jobcomp_file}",
            f"MinJobAge={MIN_JOB_AGE}",
            f"KillWait={KILL_WAIT}",
            "ReturnToService=2",
            "InactiveLimit=0",
            "Waittime=0",
            "MessageTimeout=10",
            "SlurmctldTimeout=120",
            "SlurmdTimeout=300",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
        ]
        host = socket.gethostname().split(".")[0]
        for node, port in zip(self.nodes, ports):
            lines.append(f"NodeName={node} NodeAddr={LOOPBACK} NodeHostname={host} Port={port} CPUs={cpus} "
                         f"RealMemory={mem} State=UNKNOWN")
        for part in PARTITIONS:
            default = "YES" if part == DEFAULT_PARTITION else "NO"
            lines.append(f"PartitionName={part} Nodes={nodes} Default={default} "
                         "MaxTime=INFINITE State=UP")
        return "\n".join(lines) + "\n"

    def write_sshd_config(self, port: int) -> bool:
        text = "\n".join([
            f"# Generated by maelflow for workspace {self.ws.root}",
            f"Port {port}",
            f"ListenAddress {LOOPBACK}",
            "AddressFamily inet",
            f"HostKey {self.sshd.host_key}",
            f"PidFile {self.sshd.dir / 'sshd.pid'}",
            "AuthorizedKeysFile .ssh/authorized_keys",
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "PermitEmptyPasswords no",
            "PermitRootLogin no",
            f"AllowUsers {self.user}",
            "UsePAM no",
            "PermitUserEnvironment SLURM_CONF",
            "X11Forwarding no",
            "PrintMotd no",
            "MaxStartups 64:30:128",
            "MaxSessions 64",
            "Subsystem sftp internal-sftp",
            "",
        ])
        return _write_if_changed(self.sshd.config_file, text, 0o600)

    def write_client_files(self, port: int) -> None:
        ktype, blob = Path(f"{self.sshd.host_key}.pub").read_text().split()[:2]
        _write_if_changed(self.known_hosts, f"[{LOOPBACK}]:{port} {ktype} {blob}\n", 0o644)
        _write_if_changed(self.ssh_config, "\n".join([
            f"# maelflow loopback HPC site of workspace {self.ws.root}",
            f"# use: ssh -F {self.ssh_config} {HOST_ALIAS}",
            f"Host {HOST_ALIAS}",
            f"  HostName {LOOPBACK}",
            f"  Port {port}",
            f"  User {self.user}",
            f"  IdentityFile {self.identity_file}",
            "  IdentitiesOnly yes",
            f"  UserKnownHostsFile {self.known_hosts}",
            "  GlobalKnownHostsFile /dev/null",
            "  StrictHostKeyChecking yes",
            "  BatchMode yes",
            "  ConnectTimeout 10",
            "",
        ]), 0o644)

    def _record(self) -> None:
        data = {"site_id": self.site_id, "user": self.user, "node": self.node, "nodes": self.nodes,
                "runtime": str(self.runtime), "cluster": CLUSTER}
        if (self.ws.read_json("hpc", "site.json", default={}) or {}) != data:
            self.ws.write_json(data, "hpc", "site.json")

    # -- lifecycle ----------------------------------------------------------------------------
    def up(self) -> dict[str, ServiceInfo]:
        """Bring the site up (idempotent): user, keys, configs, then munge → slurmctld → slurmd → sshd."""
        self.check_available()
        self.root.mkdir(parents=True, exist_ok=True)
        self._record()
        pw = self.ensure_user()
        self.ensure_keys()
        self.ensure_runtime(pw)

        ctld_port = self.slurmctld.planned_port()
        slurmd_ports = [svc.planned_port() for svc in self.slurmds]
        conf = self.slurm_conf_text(ctld_port, slurmd_ports)
        try:
            conf_changed = self.slurm_conf.read_text() != conf
        except FileNotFoundError:
            conf_changed = True
        if conf_changed:
            # a running daemon would keep the old ports/paths: restart the SLURM side with the new file
            for svc in self.slurmds:
                svc.down()
            self.slurmctld.down()
            _write_if_changed(self.slurm_conf, conf, 0o644)
        ssh_port = self.sshd.planned_port()
        if self.write_sshd_config(ssh_port) and self.sshd.running():
            self.sshd.down()
        self.write_client_files(ssh_port)
        self.install_key(pw)

        infos: dict[str, ServiceInfo] = {}
        for svc in self.services:
            infos[svc.name] = svc.up()
        return infos

    def status(self) -> dict[str, ServiceInfo]:
        return {svc.name: svc.status() for svc in self.services}

    def down(self, cancel_jobs: bool = True) -> dict[str, ServiceInfo]:
        """Stop sshd → slurmd → slurmctld → munge. Jobs still queued or running are cancelled first
        (their slurmstepd would otherwise outlive slurmd)."""
        if cancel_jobs and self.slurmctld.running() and self.munge.running():
            self._cancel_all_jobs()
        infos: dict[str, ServiceInfo] = {}
        for svc in reversed(self.services):
            infos[svc.name] = svc.down()
        self._sweep_strays()
        return {svc.name: infos[svc.name] for svc in self.services}

    def site_root(self) -> Path | None:
        """This workspace's folder on the site (its jobs, datasets and outputs): the site user is
        shared by workspaces, each gets its own folder in the user's home."""
        home = self.home()
        return home / f"maelflow-{self.site_id}" if home is not None else None

    def forget(self) -> dict[str, ServiceInfo]:
        """``down``, then undo what ``up`` and the work since put outside the workspace: this
        workspace's line in the user's authorized_keys, the runtime dir and its folder on the site.
        The user and its home stay (shared by workspaces)."""
        infos = self.down()
        self.remove_key()
        shutil.rmtree(self.runtime, ignore_errors=True)
        root = self.site_root()
        if root is not None:
            shutil.rmtree(root, ignore_errors=True)
        return infos

    def remove_key(self) -> bool:
        pub = Path(f"{self.identity_file}.pub")
        pw = self.passwd()
        if not pub.exists() or pw is None:
            return False
        blob = pub.read_text().split()[1]
        with _SshDir.locked(pw, create=False) as ssh_dir:
            if ssh_dir is None:
                return False
            old = ssh_dir.read_lines("authorized_keys")
            new = [ln for ln in old if f" {blob}" not in ln]
            if new == old:
                return False
            ssh_dir.write_lines("authorized_keys", new)
        return True

    def _cancel_all_jobs(self, timeout: float = KILL_WAIT + 10.0) -> None:
        env = {"SLURM_CONF": str(self.slurm_conf)}
        try:
            _run(["scancel", "--full", f"--user={self.user}"], env=env, timeout=15)

            def drained() -> bool:
                proc = _run(["squeue", "-h", "-o", "%i", "-t", "PD,R,CG,S,CF,RQ,SE"],
                            env=env, timeout=10)
                return proc.returncode == 0 and not proc.stdout.strip()

            wait_until(drained, timeout, interval=0.3)
        except (subprocess.TimeoutExpired, OSError):
            pass

    def _sweep_strays(self, grace: float = 5.0) -> list[int]:
        """Processes started by our daemons that outlived them (an orphaned slurmstepd, an sshd
        connection handler) carry our marker in their environment: stop those, by PID."""
        marker = f"{MARKER_ENV}={self.site_id}".encode()
        me = os.getpid()
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == me:
                continue
            try:
                with open(f"/proc/{entry}/environ", "rb") as fh:
                    env = fh.read().split(b"\0")
            except OSError:
                continue
            if marker in env:
                found.append(int(entry))
        for pid in found:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        for pid in found:
            while pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if pid_alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        return found

    def connection_info(self) -> dict[str, Any]:
        """How to reach the site, for site configs and tests (the port is None before the first up)."""
        home = self.home()
        port = self.sshd.current_port()
        return {
            "host": LOOPBACK,
            "port": int(port) if port else None,
            "user": self.user,
            "identity_file": str(self.identity_file),
            "known_hosts": str(self.known_hosts),
            "ssh_config": str(self.ssh_config),
            "host_alias": HOST_ALIAS,
            "slurm_conf": str(self.slurm_conf),
            "home": str(home) if home else None,
            "cluster": CLUSTER,
            "partition": DEFAULT_PARTITION,
            "partitions": list(PARTITIONS),
            "node": self.node,
            "nodes": list(self.nodes),
            "jobcomp_file": str(self.jobcomp_file),
            "ssh_options": self.ssh_options(),
        }

    def ssh_options(self) -> list[str]:
        port = self.sshd.current_port()
        opts = ["-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes",
                "-o", f"UserKnownHostsFile={self.known_hosts}",
                "-o", "GlobalKnownHostsFile=/dev/null",
                "-o", "StrictHostKeyChecking=yes",
                "-i", str(self.identity_file)]
        if port:
            opts += ["-p", str(port)]
        return opts

    def ssh_argv(self, *remote: str) -> list[str]:
        """``ssh ... user@127.0.0.1 REMOTE...`` as an argv list."""
        return ["ssh", *self.ssh_options(), f"{self.user}@{LOOPBACK}", *remote]


class _SshDir:
    """The site user's ``~/.ssh``, as root may touch it: through directory file descriptors opened
    with O_NOFOLLOW, files checked to be plain and singly linked, everything written handed to the
    user by fchown. A symlink planted by the user (or any job on the site) is refused, never followed.
    """

    LOCK = ".maelflow.lock"  # held while authorized_keys is read and replaced: workspaces share it

    def __init__(self, fd: int, path: Path, pw: pwd.struct_passwd):
        self.fd, self.path, self.pw = fd, path, pw

    @classmethod
    @contextlib.contextmanager
    def locked(cls, pw: pwd.struct_passwd, create: bool) -> Iterator["_SshDir | None"]:
        """``~/.ssh`` (made when ``create``, else None when missing) with its lock held."""
        home = Path(pw.pw_dir)
        path = home / ".ssh"
        home_fd = os.open(home, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            if create:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(".ssh", 0o700, dir_fd=home_fd)
            try:
                fd = _open_plain(".ssh", os.O_RDONLY | os.O_DIRECTORY, home_fd, path, stat.S_ISDIR)
            except FileNotFoundError:
                if create:
                    raise
                fd = None
        finally:
            os.close(home_fd)
        if fd is None:
            yield None
            return
        try:
            if create:
                os.fchown(fd, pw.pw_uid, pw.pw_gid)
                os.fchmod(fd, 0o700)
            lock = _open_plain(cls.LOCK, os.O_WRONLY | os.O_CREAT | os.O_APPEND, fd, path / cls.LOCK,
                               stat.S_ISREG)
            try:
                os.fchown(lock, pw.pw_uid, pw.pw_gid)
                fcntl.flock(lock, fcntl.LOCK_EX)
                yield cls(fd, path, pw)
            finally:
                os.close(lock)  # drops the lock
        finally:
            os.close(fd)

    def read_lines(self, name: str) -> list[str]:
        try:
            fd = _open_plain(name, os.O_RDONLY, self.fd, self.path / name, stat.S_ISREG)
        except FileNotFoundError:
            return []
        with os.fdopen(fd, "r") as fh:
            return fh.read().splitlines()

    def write_lines(self, name: str, lines: list[str]) -> None:
        """Replace ``name`` atomically (a rename replaces a symlink there, it does not follow it)."""
        tmp = f".{name}.{os.getpid()}.{time.monotonic_ns()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                     dir_fd=self.fd)
        try:
            with os.fdopen(fd, "w") as fh:
                os.fchown(fh.fileno(), self.pw.pw_uid, self.pw.pw_gid)
                fh.write("".join(ln + "\n" for ln in lines))
            os.replace(tmp, name, src_dir_fd=self.fd, dst_dir_fd=self.fd)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp, dir_fd=self.fd)
            raise


def _open_plain(name: str, flags: int, dir_fd: int, path: Path, is_kind) -> int:
    """Open ``name`` in ``dir_fd`` without following a symlink, and only if it is of the expected
    kind (``stat.S_ISDIR``/``S_ISREG``) and, for a file, has one link (a hard link to a file of root's
    would pass O_NOFOLLOW). O_NONBLOCK: a FIFO planted there must not hang ``up``."""
    try:
        fd = os.open(name, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno not in (errno.ELOOP, errno.ENOTDIR, errno.ENXIO):
            raise
        fd = None
    if fd is not None:
        st = os.fstat(fd)
        if is_kind(st.st_mode) and (stat.S_ISDIR(st.st_mode) or st.st_nlink == 1):
            os.set_blocking(fd, True)
            return fd
        os.close(fd)
    kind = "directory" if is_kind is stat.S_ISDIR else "file"
    raise ServiceError(f"{path} is a symlink, a hard link or not a plain {kind}: "
                       "refusing to touch it as root",
                       hint="find out who planted it, remove it, and run 'maelflow services up --with-hpc'")


def _ipv6_loopback() -> bool:
    """Whether a socket can listen on ::1 here (IPv6 may be off in a container)."""
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def _node_count() -> int:
    value = os.environ.get(NODES_ENV, "")
    if not value:
        return DEFAULT_NODES
    if not value.isdigit() or not 1 <= int(value) <= 16:
        raise ServiceError(f"{NODES_ENV}={value!r}: the loopback site's node count must be 1 to 16")
    return int(value)


def node_names(first: str, count: int) -> list[str]:
    """``first`` (the host's name), then ``first-2``, ``first-3``..."""
    return [first] + [f"{first}-{i}" for i in range(2, count + 1)]


def _shadow_password(user: str) -> str:
    try:
        with open("/etc/shadow") as fh:
            for line in fh:
                parts = line.split(":")
                if parts[0] == user:
                    return parts[1]
    except OSError:
        pass
    return ""


def ensure_munge_key() -> None:
    """/etc/munge/munge.key must exist, owned by munge, mode 0400/0600."""
    if MUNGE_KEY.exists():
        return
    MUNGE_KEY.parent.mkdir(parents=True, exist_ok=True)
    if _which("mungekey"):
        _run([_which("mungekey"), "--create", f"--keyfile={MUNGE_KEY}"], check=True)
    else:
        with open("/dev/urandom", "rb") as src:
            fd = os.open(MUNGE_KEY, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as dst:
                dst.write(src.read(1024))
    mw = pwd.getpwnam("munge")
    os.chown(MUNGE_KEY.parent, mw.pw_uid, mw.pw_gid)
    os.chmod(MUNGE_KEY.parent, 0o700)
    os.chown(MUNGE_KEY, mw.pw_uid, mw.pw_gid)
    os.chmod(MUNGE_KEY, 0o600)


# ---------------------------------------------------------------------------------------------
# module-level entry points (what `maelflow services up --with-hpc` calls)
# ---------------------------------------------------------------------------------------------
def check_available(ws: Workspace | None = None) -> None:
    LoopbackHpc(ws or Workspace.resolve()).check_available()


def up(ws: Workspace, user: str | None = None) -> dict[str, ServiceInfo]:
    return LoopbackHpc(ws, user).up()


def status(ws: Workspace) -> dict[str, ServiceInfo]:
    return LoopbackHpc(ws).status()


def down(ws: Workspace, cancel_jobs: bool = True) -> dict[str, ServiceInfo]:
    return LoopbackHpc(ws).down(cancel_jobs=cancel_jobs)


def forget(ws: Workspace) -> dict[str, ServiceInfo]:
    return LoopbackHpc(ws).forget()


def connection_info(ws: Workspace) -> dict[str, Any]:
    return LoopbackHpc(ws).connection_info()

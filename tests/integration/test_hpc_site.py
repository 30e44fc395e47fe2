"""The loopback HPC site: sshd + single-node SLURM on 127.0.0.1, reached only through SSH.

Needs root and the Debian packages openssh-server, munge and slurm-wlm (scripts/install.sh).
One site is brought up for the whole module; the last test takes it down.
"""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from maelflow.services.base import pid_alive, port_is_free
from maelflow.workspace import Workspace
from maelflow_sandbox import hpc

pytestmark = pytest.mark.integration

DAEMONS = ("hpc-munge", "hpc-slurmctld", "hpc-slurmd", "hpc-slurmd-2", "hpc-sshd")   # two nodes by default


@pytest.fixture(scope="module")
def hpc_site(tmp_path_factory):
    # needs root and the Debian packages (scripts/install.sh): a missing one fails here, loudly
    ws = Workspace.resolve(tmp_path_factory.mktemp("hpc-ws"))
    hpc.check_available(ws)
    t0 = time.monotonic()
    infos = hpc.up(ws)
    up_seconds = time.monotonic() - t0
    info = hpc.connection_info(ws)
    jobdir = f"maelflow-test-{uuid.uuid4().hex[:8]}"
    try:
        yield {"ws": ws, "infos": infos, "info": info, "up_seconds": up_seconds, "jobdir": jobdir}
    finally:
        if hpc.status(ws)["hpc-sshd"].healthy:
            subprocess.run(ssh_argv(info, f"rm -rf {jobdir}"), capture_output=True, timeout=30)
        hpc.forget(ws)      # down, and drop this workspace's key line and /run/maelflow/hpc-<id>


def ssh_argv(info: dict, command: str, *extra: str) -> list[str]:
    return ["ssh", "-o", "BatchMode=yes", "-o", f"UserKnownHostsFile={info['known_hosts']}",
            "-o", "StrictHostKeyChecking=yes", "-o", "GlobalKnownHostsFile=/dev/null",
            "-o", "IdentitiesOnly=yes", "-i", info["identity_file"], "-p", str(info["port"]),
            *extra, f"{info['user']}@{info['host']}", command]


def remote(info: dict, command: str, input: str | None = None, check: bool = True) -> str:
    proc = subprocess.run(ssh_argv(info, command), input=input, capture_output=True, text=True,
                          timeout=60)
    if check and proc.returncode != 0:
        raise AssertionError(f"ssh {command!r} failed ({proc.returncode}): {proc.stderr}")
    return proc.stdout


def job_state(info: dict, job_id: str) -> str:
    # finished jobs stay in slurmctld's memory for MinJobAge seconds: `-t all` shows them
    return remote(info, f"squeue -h -t all -j {job_id} -o %T").strip()


def wait_state(info: dict, job_id: str, wanted: set[str], timeout: float = 60.0) -> str:
    deadline = time.monotonic() + timeout
    state = ""
    while time.monotonic() < deadline:
        state = job_state(info, job_id)
        if state in wanted:
            return state
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} is {state!r} after {timeout:.0f} s, wanted {wanted}")


def listening_sockets(pid: int) -> list[tuple[str, int]]:
    """(address, port) of every TCP socket in LISTEN state held by pid, from /proc/net/tcp{,6}."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = []
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            cols = line.split()
            if cols[3] != "0A" or cols[9] not in inodes:
                continue
            addr_hex, port_hex = cols[1].split(":")
            if width == 8:
                addr = ".".join(str(int(addr_hex[i:i + 2], 16)) for i in (6, 4, 2, 0))
            else:
                addr = "::1" if addr_hex == "00000000000000000000000001000000" else addr_hex
            found.append((addr, int(port_hex, 16)))
    return found


def test_up_gives_healthy_daemons_on_loopback_only(hpc_site):
    infos = hpc_site["infos"]
    assert list(infos) == list(DAEMONS)
    for name, svc in infos.items():
        assert svc.running and svc.healthy, (name, svc.detail, svc.log)
    for name in ("hpc-slurmd", "hpc-slurmd-2"):
        assert infos[name].extra["node_state"] in {"idle", "mixed"}
    assert [infos[n].extra["node"] for n in ("hpc-slurmd", "hpc-slurmd-2")] == hpc_site["info"]["nodes"]
    for name in ("hpc-slurmctld", "hpc-slurmd", "hpc-slurmd-2", "hpc-sshd"):
        socks = listening_sockets(infos[name].pid)
        assert socks, f"{name} listens on nothing"
        assert all(addr in {"127.0.0.1", "::1"} for addr, _ in socks), (name, socks)
        assert infos[name].extra["port"] in {port for _, port in socks}
    assert not listening_sockets(infos["hpc-munge"].pid)      # a unix socket only
    info = hpc_site["info"]
    assert info["host"] == "127.0.0.1" and info["port"] != 22
    assert oct(os.stat(info["identity_file"]).st_mode & 0o777) == "0o600"
    assert f"[127.0.0.1]:{info['port']} ssh-ed25519 " in Path(info["known_hosts"]).read_text()
    assert hpc_site["up_seconds"] < 30


def test_ssh_key_login_as_site_user_and_password_refused(hpc_site):
    info = hpc_site["info"]
    out = remote(info, "whoami; echo $HOME; echo $SLURM_CONF")
    assert out.split() == [info["user"], info["home"], info["slurm_conf"]]
    # the ssh_config written for humans reaches the same place
    alias = subprocess.run(["ssh", "-F", info["ssh_config"], info["host_alias"], "whoami"],
                           capture_output=True, text=True, timeout=30)
    assert alias.stdout.strip() == info["user"], alias.stderr
    refused = subprocess.run(
        ssh_argv(info, "true", "-o", "PubkeyAuthentication=no",
                 "-o", "PreferredAuthentications=password,keyboard-interactive"),
        capture_output=True, text=True, timeout=30)
    assert refused.returncode == 255
    assert "Permission denied" in refused.stderr


def test_sbatch_over_ssh_completes_and_writes_in_home(hpc_site):
    info, jobdir = hpc_site["info"], hpc_site["jobdir"]
    script = "#!/bin/bash\n#SBATCH --job-name=mf-hello\n#SBATCH --time=00:05:00\n" \
             "echo hello from $(whoami) job $SLURM_JOB_ID\n"
    remote(info, f"mkdir -p {jobdir} && cat > {jobdir}/hello.sh", input=script)
    job_id = remote(info, f"cd {jobdir} && sbatch --parsable -o hello-%j.out hello.sh").strip()
    assert job_id.isdigit()
    assert wait_state(info, job_id, {"COMPLETED", "FAILED"}) == "COMPLETED"
    out = Path(info["home"]) / jobdir / f"hello-{job_id}.out"
    assert wait_until_exists(out)
    assert out.read_text().strip() == f"hello from {info['user']} job {job_id}"
    assert remote(info, f"cat {jobdir}/hello-{job_id}.out").strip() == out.read_text().strip()
    # no slurmdbd: plain sacct says so; the job-completion log answers `sacct --completion`
    plain = subprocess.run(ssh_argv(info, f"sacct -j {job_id}"), capture_output=True, text=True,
                           timeout=30)
    assert "accounting storage is disabled" in (plain.stdout + plain.stderr)
    assert sacct_completion_state(info, job_id) == "COMPLETED"


def test_scancel_over_ssh_cancels_running_job(hpc_site):
    info, jobdir = hpc_site["info"], hpc_site["jobdir"]
    job_id = remote(info, f"mkdir -p {jobdir} && cd {jobdir} && "
                          "sbatch --parsable -o sleep-%j.out --wrap 'sleep 300'").strip()
    wait_state(info, job_id, {"RUNNING"}, timeout=30)
    remote(info, f"scancel {job_id}")
    assert wait_state(info, job_id, {"CANCELLED"}, timeout=30) == "CANCELLED"
    assert remote(info, f"squeue -h -j {job_id} -o %i").strip() == ""     # gone from the queue
    assert sacct_completion_state(info, job_id) == "CANCELLED"


def test_up_twice_is_idempotent(hpc_site):
    ws, first = hpc_site["ws"], hpc_site["infos"]
    again = hpc.up(ws)
    assert {n: s.pid for n, s in again.items()} == {n: s.pid for n, s in first.items()}
    assert all(s.healthy for s in again.values())
    info = hpc.connection_info(ws)
    assert info == hpc_site["info"]
    blob = Path(info["identity_file"] + ".pub").read_text().split()[1]
    keys = (Path(info["home"]) / ".ssh" / "authorized_keys").read_text().splitlines()
    mine = [line for line in keys if blob in line]
    assert len(mine) == 1 and f'environment="SLURM_CONF={info["slurm_conf"]}"' in mine[0]


def test_down_stops_every_pid(hpc_site):
    ws, infos = hpc_site["ws"], hpc_site["infos"]
    info = hpc_site["info"]
    remote(info, f"rm -rf {hpc_site['jobdir']}")
    # a job still running at `down` is cancelled, so no slurmstepd outlives slurmd
    remote(info, "sbatch --parsable -o /dev/null --wrap 'sleep 300'")
    ports = [infos[n].extra["port"] for n in ("hpc-slurmctld", "hpc-slurmd", "hpc-slurmd-2", "hpc-sshd")]
    stopped = hpc.down(ws)
    assert all(not s.running for s in stopped.values())
    for svc in infos.values():
        assert not pid_alive(svc.pid), svc.name
    assert all(port_is_free(p) for p in ports)
    leftovers = [pid for pid in os.listdir("/proc") if pid.isdigit() and has_marker(int(pid), ws)]
    assert leftovers == []
    assert all(not s.running for s in hpc.status(ws).values())
    assert hpc.down(ws)["hpc-sshd"].running is False                   # down twice is fine


def has_marker(pid: int, ws: Workspace) -> bool:
    site = hpc.LoopbackHpc(ws)
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False
    return f"{hpc.MARKER_ENV}={site.site_id}".encode() in env


def sacct_completion_state(info: dict, job_id: str, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    state = ""
    while time.monotonic() < deadline:
        state = remote(info, f"sacct --completion -n -P -j {job_id} -o State", check=False).strip()
        if state:
            return state.split()[0]
        time.sleep(0.3)
    return state


def wait_until_exists(path: Path, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.stat().st_size:
            return True
        time.sleep(0.1)
    return False


def test_forget_leaves_nothing_of_the_workspace_on_the_site(hpc_site):
    """Runs after the others (file order): ``forget`` removes the workspace's folder on the site,
    its key line and its runtime folder; the shared site user and its home stay."""
    ws, info = hpc_site["ws"], hpc_site["info"]
    site = hpc.LoopbackHpc(ws)
    root = site.site_root()
    assert root == Path(info["home"]) / f"maelflow-{site.site_id}"
    (root / "datasets").mkdir(parents=True, exist_ok=True)      # what stages and jobs leave there
    (root / "datasets" / "x").write_text("x")
    blob = Path(f"{info['identity_file']}.pub").read_text().split()[1]
    hpc.forget(ws)
    assert not root.exists() and not site.runtime.exists() and Path(info["home"]).is_dir()
    assert blob not in (Path(info["home"]) / ".ssh" / "authorized_keys").read_text()

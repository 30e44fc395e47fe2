"""SSH sessions and SLURM jobs against the loopback HPC site (real sshd, real single-node SLURM).

Needs root and openssh-server, munge, slurm-wlm (scripts/install.sh). One site for the module.
Credential failures must be CredentialErrors ending with the renew hint within seconds, and a
connection dropped right after sbatch must never leave two jobs.
"""

from __future__ import annotations

import fcntl
import os
import re
import shlex
import shutil
import subprocess
import tempfile
import threading
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest

from maelflow.config.loader import compose_file
from maelflow.config.models import Site, SitePaths, SshSettings

from maelflow.sites.connections import ssh as ssh_mod
from maelflow.errors import ConnectionLost, SubmitError
from maelflow.sites.connections.ssh import SshConnection
from maelflow.sites.runner import BatchRunner, JobHandle, submission_token
from maelflow.sites.schedulers import scheduler_named
from maelflow.errors import CredentialError, HostKeyError
from maelflow.workspace import Workspace
from maelflow_sandbox import hpc
from tests.conftest import REPO

pytestmark = pytest.mark.integration

HINT = "run 'maelflow services up --with-hpc' to start the loopback site and (re)install its key"


def _fill(value, placeholders):
    if isinstance(value, str):
        for k, v in placeholders.items():
            value = value.replace("{" + k + "}", v)
        return value
    if isinstance(value, dict):
        return {k: _fill(v, placeholders) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill(v, placeholders) for v in value]
    return value


@pytest.fixture(scope="module")
def hpcsite(tmp_path_factory):
    # needs root and the Debian packages (scripts/install.sh): a missing one fails here, loudly
    ws = Workspace.resolve(tmp_path_factory.mktemp("ssh-slurm-ws"))
    hpc.check_available(ws)
    root = None
    try:
        hpc.up(ws)
        info = hpc.connection_info(ws)
        root = f"{info['home']}/maelflow-test-{uuid.uuid4().hex[:8]}"
        placeholders = {"hpc_port": str(info["port"]), "hpc_user": info["user"],
                        "hpc_identity": info["identity_file"], "hpc_known_hosts": info["known_hosts"],
                        "hpc_home": info["home"], "maelflow": "maelflow"}
        site = Site.model_validate(_fill(compose_file(REPO / "configs" / "sites" / "localhpc.yaml", []),
                                         placeholders))
        site = site.model_copy(update={"paths": SitePaths(root=root, datasets=f"{root}/datasets",
                                                          outputs=f"{root}/outputs")})
        yield SimpleNamespace(ws=ws, info=info, site=site, settings=site.connection.ssh, root=root)
    finally:
        try:
            if root:
                SshConnection("cleanup", site.connection.ssh).run(f"rm -rf {root}", check=False, timeout=30)
        except Exception:  # noqa: BLE001 - the site may be the thing that failed
            pass
        ssh_mod.close_all()
        hpc.down(ws)
        hpc.forget(ws)


def settings_with(base: SshSettings, **changes) -> SshSettings:
    return base.model_copy(update=changes)


def expect_credential_error(settings: SshSettings, *must_name: str, site: str = "localhpc") -> str:
    t0 = time.monotonic()
    with pytest.raises(CredentialError) as info:
        SshConnection(site, settings).run("true")
    elapsed = time.monotonic() - t0
    msg = str(info.value)
    assert elapsed < 10, f"credential failure took {elapsed:.1f} s"
    assert msg.endswith(settings.renew_hint), msg
    assert f"site {site}" in msg
    for text in must_name:
        assert text in msg, msg
    return msg


# ------------------------------------------------------------------------------------- sessions
def master_pid(conn: SshConnection) -> int | None:
    check = subprocess.run([*conn.ssh_command(), "-O", "check", conn.host], capture_output=True, text=True)
    m = re.search(r"pid=(\d+)", check.stderr + check.stdout)
    return int(m.group(1)) if m else None


def drop_master(conn: SshConnection, after: float = 0.0) -> threading.Thread:
    """The connection dies (its master is told to exit), ``after`` seconds from now."""
    def drop() -> None:
        time.sleep(after)
        subprocess.run([*conn.ssh_command(), "-O", "exit", conn.host], capture_output=True)
    t = threading.Thread(target=drop)
    t.start()
    return t


def test_run_as_site_user_reuses_one_connection(hpcsite):
    s = SshConnection.for_site("localhpc", hpcsite.site)
    assert SshConnection.for_site("localhpc", hpcsite.site) is s
    r = s.run("whoami; echo $SLURM_CONF; echo oops >&2; exit 3", check=False)
    assert (r.rc, r.stdout.split(), r.stderr) == (3, [hpcsite.info["user"], hpcsite.info["slurm_conf"]], "oops\n")
    pid = master_pid(s)
    assert s.run("cat | wc -c", input=b"x" * 300_000).stdout.strip() == "300000"
    assert pid and master_pid(s) == pid                     # one handshake: every command rides the master
    drop_master(s).join()                                   # a dead master is replaced transparently
    assert s.run("echo again").stdout == "again\n" and master_pid(s) not in (None, pid)


def test_drop_during_idempotent_run_is_retried(hpcsite):
    s = SshConnection("localhpc", hpcsite.settings)
    s.check()
    dropper = drop_master(s, after=0.5)
    assert s.run("sleep 1.5; echo retried").stdout == "retried\n"       # the drop, then a second try
    dropper.join()
    dropper = drop_master(s, after=0.5)
    with pytest.raises(ssh_mod.ConnectionLost) as info:
        s.run("sleep 1.5; echo not-idempotent", retry=False)
    dropper.join()
    assert info.value.sent
    s.close()


def test_put_text_is_atomic_and_readable_by_offset(hpcsite):
    s = SshConnection.for_site("localhpc", hpcsite.site)
    path = f"{hpcsite.root}/files/deep/note.txt"
    s.put_text(path, "first version\n", mode=0o640)
    inode1 = s.run(f"stat -c '%i %a' {path}").stdout.split()
    s.put_text(path, "second version\n")
    inode2 = s.run(f"stat -c '%i' {path}").stdout.split()
    assert inode1[1] == "640" and inode1[0] != inode2[0]        # replaced by rename, not rewritten
    assert s.run(f"ls -A {hpcsite.root}/files/deep").stdout.split() == ["note.txt"]   # no .tmp left
    assert s.read_bytes(path) == b"second version\n"
    assert s.read_bytes(path, offset=7) == b"version\n"
    assert s.exists(path) and not s.exists(f"{path}.nope")
    with pytest.raises(FileNotFoundError):
        s.read_bytes(f"{path}.nope")
    local = Path(tempfile.mkdtemp()) / "blob"
    local.write_bytes(os.urandom(200_000))
    s.put_file(local, f"{hpcsite.root}/files/blob", mode=0o600)
    assert s.read_bytes(f"{hpcsite.root}/files/blob") == local.read_bytes()
    shutil.rmtree(local.parent)


def test_key_not_authorized_is_a_credential_error(hpcsite, tmp_path):
    key = tmp_path / "stranger"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    expect_credential_error(settings_with(hpcsite.settings, identity_file=str(key)), str(key), "refused")


def test_missing_key_file_is_a_credential_error(hpcsite, tmp_path):
    missing = str(tmp_path / "no-such-key")
    expect_credential_error(settings_with(hpcsite.settings, identity_file=missing), missing, "missing")


def test_passphrase_key_is_a_credential_error_not_a_prompt(hpcsite, tmp_path):
    key = tmp_path / "locked"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "secret", "-f", str(key)], check=True)
    expect_credential_error(settings_with(hpcsite.settings, identity_file=str(key)), str(key), "passphrase")


def test_agent_auth(hpcsite, tmp_path, monkeypatch):
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    settings = settings_with(hpcsite.settings, auth="agent", identity_file=None)
    expect_credential_error(settings, "SSH_AUTH_SOCK")
    sock = tmp_path / "agent.sock"
    agent = subprocess.Popen(["ssh-agent", "-D", "-a", str(sock)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 5
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        monkeypatch.setenv("SSH_AUTH_SOCK", str(sock))
        subprocess.run(["ssh-add", "-q", hpcsite.info["identity_file"]], check=True, capture_output=True)
        assert SshConnection("agentsite", settings).run("whoami").stdout.strip() == hpcsite.info["user"]
    finally:
        agent.terminate()
        agent.wait(timeout=5)


def _sign(tmp_path: Path, validity: str | None) -> tuple[Path, Path, Path]:
    ca, user = tmp_path / "ca", tmp_path / "user"
    for key in (ca, user):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    argv = ["ssh-keygen", "-q", "-s", str(ca), "-I", "maelflow-test", "-n", "maelhpc"]
    if validity:
        argv += ["-V", validity]
    subprocess.run(argv + [f"{user}.pub"], check=True)
    return ca, user, Path(f"{user}-cert.pub")


def test_expired_certificate_is_a_credential_error(hpcsite, tmp_path):
    _, key, cert = _sign(tmp_path, "-2h:-1h")
    expect_credential_error(settings_with(hpcsite.settings, auth="certificate", identity_file=str(key),
                                          certificate_file=str(cert)), str(cert), "expired at")


def test_valid_certificate_logs_in(hpcsite, tmp_path):
    """The site trusts a CA (a cert-authority line for the site user), and ssh presents the cert."""
    ca, key, cert = _sign(tmp_path, "-5m:+1h")
    ak = Path(hpcsite.info["home"]) / ".ssh" / "authorized_keys"
    tag = f"maelflow-test-ca-{uuid.uuid4().hex[:8]}"
    line = f'cert-authority,principals="maelhpc" {" ".join(Path(f"{ca}.pub").read_text().split()[:2])} {tag}'
    edit_authorized_keys(ak, lambda lines: lines + [line])
    try:
        settings = settings_with(hpcsite.settings, auth="certificate", identity_file=str(key),
                                 certificate_file=str(cert))
        assert SshConnection("certsite", settings).run("whoami").stdout.strip() == "maelhpc"
    finally:
        edit_authorized_keys(ak, lambda lines: [ln for ln in lines if not ln.endswith(tag)])


def edit_authorized_keys(ak: Path, change) -> None:
    """Same lock as maelflow_sandbox/hpc.py uses, so concurrent workspaces never lose each other's lines."""
    with open(ak.parent / ".maelflow.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        st = ak.stat()
        new = change(ak.read_text().splitlines())
        tmp = ak.with_name(f".authorized_keys.{uuid.uuid4().hex}")
        tmp.write_text("".join(ln + "\n" for ln in new))
        os.chmod(tmp, 0o600)
        os.chown(tmp, st.st_uid, st.st_gid)
        os.replace(tmp, ak)


def test_unknown_host_key_is_refused(hpcsite, tmp_path):
    other = tmp_path / "other_host"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    kh = tmp_path / "known_hosts"
    kh.write_text(f"[127.0.0.1]:{hpcsite.info['port']} {' '.join(Path(f'{other}.pub').read_text().split()[:2])}\n")
    t0 = time.monotonic()
    with pytest.raises(HostKeyError):
        SshConnection("localhpc", settings_with(hpcsite.settings, known_hosts=str(kh))).run("true")
    assert time.monotonic() - t0 < 10


def test_2fa_without_live_master_fails_fast(hpcsite):
    cm = tempfile.mkdtemp(prefix="mfcm", dir="/tmp")
    try:
        settings = settings_with(hpcsite.settings, auth="2fa", renew_hint="log in with 2FA and retry")
        t0 = time.monotonic()
        with pytest.raises(CredentialError) as info:
            SshConnection("twofa", settings, control_path=f"{cm}/%r@%h:%p").run("true")
        assert time.monotonic() - t0 < 5
        msg = str(info.value)
        assert msg.endswith("log in with 2FA and retry") and "ssh -M -o ControlPersist=12h" in msg
        assert f"{cm}/%r@%h:%p" in msg and "site twofa" in msg
    finally:
        shutil.rmtree(cm)


def test_2fa_rides_a_live_master(hpcsite):
    """The operator's master (here opened with the key, standing in for a 2FA login) carries it all."""
    info = hpcsite.info
    cm = tempfile.mkdtemp(prefix="mfcm", dir="/tmp")
    cp = f"{cm}/%r@%h:%p"
    base = ["ssh", "-o", f"ControlPath={cp}", "-p", str(info["port"]), "-l", info["user"]]
    subprocess.run(["ssh", "-M", "-N", "-f", "-o", "ControlPersist=60", "-o", f"ControlPath={cp}",
                    *info["ssh_options"], f"{info['user']}@{info['host']}"], check=True, timeout=30,
                   stdin=subprocess.DEVNULL)
    check = subprocess.run([*base, "-O", "check", info["host"]], capture_output=True, text=True)
    pid = int(re.search(r"pid=(\d+)", check.stderr + check.stdout).group(1))
    try:
        s = SshConnection("twofa", settings_with(hpcsite.settings, auth="2fa", identity_file=None),
                       control_path=cp)
        assert s.run("whoami").stdout.strip() == info["user"]
        path = f"{hpcsite.root}/twofa/x.txt"
        s.put_text(path, "over the master\n", mode=0o600)
        assert s.read_bytes(path, offset=5) == b"the master\n"
        assert s.exists(path) and not s.exists(path + "x")
        with pytest.raises(FileNotFoundError):
            s.read_bytes(path + "x")
    finally:
        subprocess.run([*base, "-O", "exit", info["host"]], capture_output=True, timeout=10)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and os.path.exists(f"/proc/{pid}"):
            time.sleep(0.05)
        if os.path.exists(f"/proc/{pid}"):
            os.kill(pid, 9)
        shutil.rmtree(cm, ignore_errors=True)


# ------------------------------------------------------------------------------------- SLURM jobs
def make_job(tmp_path: Path, name: str, body: str) -> tuple[Path, Path]:
    d = tmp_path / "suite" / "jobs" / "demo" / "fam"
    d.mkdir(parents=True, exist_ok=True)
    job = d / f"{name}.job1"
    job.write_text(f"#!/bin/bash\n# ECF_PASS={uuid.uuid4().hex}\n{body}\n")
    return job, d / f"{name}.1"


def slurm_runner(site: Site, connection: SshConnection | None = None, dry_run: bool = False) -> BatchRunner:
    """ssh x slurm, as ``runner_for`` composes it for the localhpc site."""
    conn = connection or SshConnection.for_site("localhpc", site, dry_run=dry_run)
    return BatchRunner(conn, scheduler_named("slurm"), site_name="localhpc", site=site, relay=True)


def wait_for(runner: BatchRunner, handle: JobHandle, done, timeout: float = 30.0) -> tuple[bool, str]:
    deadline = time.monotonic() + timeout
    while True:
        alive, text = runner.status(handle, None)
        if done(alive, text) or time.monotonic() > deadline:
            return alive, text
        time.sleep(0.2)


def test_job_completes_and_output_comes_back(hpcsite, tmp_path):
    runner = slurm_runner(hpcsite.site)
    job, jobout = make_job(tmp_path, "hello", 'echo "hello from $SLURM_JOB_ID in $(basename $PWD)"; sleep 1; echo done')
    handle = runner.submit(job, jobout)
    assert handle.kind == "slurm" and handle.job_id.isdigit()
    assert handle.remote_job == f"{hpcsite.root}/jobs/demo/fam/hello.job1"
    assert handle.remote_out == f"{hpcsite.root}/jobs/demo/fam/hello.1"
    alive, text = wait_for(runner, handle, lambda alive, text: not alive)
    assert not alive and "COMPLETED" in text, text
    assert runner.fetch_output(handle, jobout) > 0
    assert jobout.read_text() == f"hello from {handle.job_id} in fam\ndone\n"
    assert runner.fetch_output(handle, jobout) == 0
    # once squeue has forgotten the job (MinJobAge), the status falls back to sacct
    no_squeue = runner.connection.run("squeue() { :; }; " + runner.scheduler.poll_command(handle.job_id))
    assert no_squeue.stdout.split()[:2] == [handle.job_id, "COMPLETED"], no_squeue
    remote = runner.connection.read_bytes(handle.remote_job).decode()
    assert remote.startswith("#!/bin/bash\n#SBATCH --job-name=demo.fam.hello\n")
    assert "#SBATCH --partition=debug" in remote and "#SBATCH --comment=maelflow:" in remote


def test_kill_running_job_cancels_it(hpcsite, tmp_path):
    runner = slurm_runner(hpcsite.site)
    job, jobout = make_job(tmp_path, "long", "echo started; sleep 60")
    handle = runner.submit(job, jobout)
    alive, text = wait_for(runner, handle, lambda alive, text: "RUNNING" in text)
    assert alive and "RUNNING" in text, text
    t0 = time.monotonic()
    said = runner.kill(handle, None, {})
    assert "was RUNNING" in said and "aborted" not in said
    alive, text = wait_for(runner, handle, lambda alive, text: not alive, timeout=15)
    assert not alive and "CANCELLED" in text, text
    assert time.monotonic() - t0 < 10


def test_kill_pending_job_aborts_on_its_behalf(hpcsite, tmp_path):
    runner = slurm_runner(hpcsite.site)
    job, jobout = make_job(tmp_path, "held", "#SBATCH --hold\necho never")
    handle = runner.submit(job, jobout)
    assert runner.status(handle, None)[0]
    said = runner.kill(handle, None, {})        # no ECF_NAME: child_abort has nothing to tell
    assert "was PENDING" in said and "on its behalf" in said
    alive, text = wait_for(runner, handle, lambda alive, text: not alive, timeout=15)
    assert "CANCELLED" in text


def test_sbatch_refusal_is_reported_and_can_be_retried(hpcsite, tmp_path):
    slurm = hpcsite.site.slurm.model_copy(update={"partition": "nosuchpartition"})
    runner = slurm_runner(hpcsite.site.model_copy(update={"slurm": slurm}))
    job, jobout = make_job(tmp_path, "refused", "echo never")
    with pytest.raises(SubmitError, match="invalid partition"):
        runner.submit(job, jobout)
    left = runner.connection.run(f"ls -A {hpcsite.root}/jobs/demo/fam").stdout.split()
    assert "refused.job1" in left and not [n for n in left if n.startswith(".refused.job1.")], left
    with pytest.raises(SubmitError, match="invalid partition"):    # so sbatch runs again, not a replay
        runner.submit(job, jobout)


def test_unknown_job_is_not_alive(hpcsite):
    runner = slurm_runner(hpcsite.site)
    alive, text = runner.status(JobHandle("localhpc", "987654", "slurm"), None)
    assert not alive and "UNKNOWN" in text


class DropAfterSbatch(SshConnection):
    """The connection dies after the login node started the guarded sbatch and before its answer came
    back: at once (sbatch may still be running when we look again) or after ``delay`` seconds."""

    def __init__(self, site_name, settings, delay: float):
        super().__init__(site_name, settings)
        self.delay = delay
        self.dropped: list[str] = []

    def run(self, command, **kwargs):
        if "sbatch" in command and ".submit" in command and not self.dropped:
            self.dropped.append(command)
            # the command reaches the site (detached, so our side can lose it) and we never hear back;
            # its stdin (the job file, sent with the submission) is kept for it first
            data = kwargs.get("input")
            keep = "f=$(mktemp); cat >$f; " if data is not None else "f=/dev/null; "
            super().run(f"{keep}(nohup bash -c {shlex.quote(command)} <$f; [ $f = /dev/null ] || rm -f $f) "
                        ">/dev/null 2>&1 &", input=data,
                        check=False)
            time.sleep(self.delay)
            raise ConnectionLost("connection dropped after sending sbatch", sent=True)
        return super().run(command, **kwargs)


@pytest.mark.parametrize("delay", [0.0, 1.0], ids=["drop-at-once", "drop-then-wait"])
def test_drop_during_sbatch_never_submits_twice(hpcsite, tmp_path, monkeypatch, delay):
    """A lost answer: the job is found in squeue by its comment token when sbatch had finished, else
    the repeated guarded command waits for the first one's answer; never a second job."""
    conn = DropAfterSbatch("localhpc", hpcsite.settings, delay)
    runner = slurm_runner(hpcsite.site, conn)
    found = []
    real_find = runner.find
    monkeypatch.setattr(runner, "find", lambda token: found.append(real_find(token)) or found[-1])
    job, jobout = make_job(tmp_path, f"drop{int(delay)}", "echo once; sleep 2")
    handle = runner.submit(job, jobout)
    assert conn.dropped, "the connection was never dropped"
    token = submission_token("demo/fam/" + job.name, job.read_text())
    listing = conn.run("squeue -h -t all -o '%i %k'").stdout
    ids = [ln.split()[0] for ln in listing.splitlines() if ln.split()[1:] == [f"maelflow:{token}"]]
    assert ids == [handle.job_id], listing
    assert len(found) == 1                          # the recovery looked before submitting again
    if delay:
        assert found == [handle.job_id]             # sbatch had finished: squeue knew the token
    runner.kill(handle, None, {})


def test_repeated_guarded_sbatch_reports_the_first_job(hpcsite, tmp_path):
    """The retry after a drop re-sends the same command: it must answer, not submit again."""
    runner = slurm_runner(hpcsite.site)
    job, jobout = make_job(tmp_path, "again", "echo once")
    handle = runner.submit(job, jobout)
    token = submission_token("demo/fam/" + job.name, job.read_text())
    cmd = runner.guarded_submit(str(Path(handle.remote_job).parent), job.name, token,
                                runner.scheduler.submit_command(job.name, handle.remote_out, token))
    again = runner.connection.run(cmd)
    assert runner.scheduler.parse_job_id(again.stdout) == handle.job_id
    listing = runner.connection.run("squeue -h -t all -o '%i %k'").stdout
    assert [ln.split()[0] for ln in listing.splitlines() if f"maelflow:{token}" in ln] == [handle.job_id]


def test_login_node_process_runs_beside_slurm(hpcsite, tmp_path):
    """ssh x local processes: today's login-node runner is the same BatchRunner with another scheduler."""
    runner = BatchRunner(SshConnection.for_site("localhpc", hpcsite.site), scheduler_named("local"),
                         site_name="localhpc", site=hpcsite.site, relay=True)
    job, jobout = make_job(tmp_path, "login", 'echo "on $(hostname) as $(whoami)"; echo ${SLURM_JOB_ID:-no slurm}')
    handle = runner.submit(job, jobout)
    assert handle.kind == "local" and handle.remote_out == f"{hpcsite.root}/jobs/demo/fam/login.1"
    alive, text = wait_for(runner, handle, lambda alive, text: not alive)
    assert not alive, text
    runner.fetch_output(handle, jobout)
    assert jobout.read_text().endswith("no slurm\n") and hpcsite.info["user"] in jobout.read_text()


def test_dry_run_touches_nothing(hpcsite, tmp_path, capsys):
    runner = slurm_runner(hpcsite.site, dry_run=True)
    job, jobout = make_job(tmp_path, "dry", "echo dry")
    handle = runner.submit(job, jobout)
    out = capsys.readouterr().out
    assert f"cd {hpcsite.root}/jobs/demo/fam && sbatch dry.job1" in out and "#SBATCH --partition=debug" in out
    assert not SshConnection.for_site("localhpc", hpcsite.site).exists(handle.remote_job)

"""The production layout of docs/deployment.md on this machine, and the demo run through its profile.

What runs here is what that page says, read from it: its systemd units (``unit=`` blocks: their
Environment, EnvironmentFile, ExecStartPre and ExecStart, as systemd would run them), its
PostgreSQL set-up (``setup=postgres``), its profiles (``profile=``) and its commands (``check=``),
with the page's host names, ports and folders replaced by this machine's (127.0.0.1, free ports, a
temporary folder). Beside them stand what the page takes as given: a PostgreSQL server (the
``postgres`` service of a separate "database host" workspace) and the EWC's object store, here
rclone's S3 server behind HTTPS with a self-signed CA.

The user's workspace only gets ``maelflow services use`` and then ``maelflow demo``: every service
is external, nothing is started in it, and the demo completes through the external ecflow_server,
S3 over HTTPS, MLflow with basic authentication on PostgreSQL and the catalogue on PostgreSQL with
two workers. A second workspace whose profile is wrong in four ways shows ``services status``
naming each problem (bad certificate, refused credentials, unreachable) and exiting 1.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import secrets
import shlex
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests

from maelflow.services.base import free_port, port_accepts, wait_until
from maelflow.workspace import Workspace, write_secret

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "deployment.md"
BIN = Path(sys.executable).parent
BLOCK = re.compile(r"```(\w+) (unit|profile|check|config|setup)=([\w-]+)\n(.*?)```", re.S)


def doc_blocks(text: str) -> dict[str, str]:
    return {f"{kind}={name}": body for _, kind, name, body in BLOCK.findall(text)}


@dataclass
class Unit:
    """What systemd takes from a unit to run it."""

    env: dict[str, str] = field(default_factory=dict)
    env_files: list[str] = field(default_factory=list)
    pre: list[str] = field(default_factory=list)
    start: str = ""
    stop: list[str] = field(default_factory=list)


def parse_unit(text: str) -> Unit:
    unit = Unit()
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if not sep or line.startswith("#"):
            continue
        if key == "Environment":
            for item in shlex.split(value):
                k, _, v = item.partition("=")
                unit.env[k] = v
        elif key == "EnvironmentFile":
            unit.env_files.append(value)
        elif key == "ExecStartPre":
            unit.pre.append(value)
        elif key == "ExecStart":
            unit.start = value
        elif key == "ExecStop":
            unit.stop.append(value)
    return unit


def expand(command: str, env: dict[str, str]) -> list[str]:
    return shlex.split(re.sub(r"\$\{(\w+)\}", lambda m: env[m.group(1)], command))


@dataclass
class Site:
    """The 'production' machines of the page, on this one."""

    root: Path
    user: str = field(default_factory=lambda: pwd.getpwuid(os.getuid()).pw_name)
    ports: dict[str, int] = field(default_factory=dict)
    procs: list[subprocess.Popen] = field(default_factory=list)
    db: object = None
    blocks: dict[str, str] = field(default_factory=dict)
    pg_password: str = field(default_factory=lambda: secrets.token_urlsafe(18))
    stop_commands: dict[int, tuple] = field(default_factory=dict)

    @property
    def etc(self) -> Path:
        return self.root / "etc"

    @property
    def var(self) -> Path:
        return self.root / "var"

    def substitute(self, text: str) -> str:
        """The page's hosts, ports and folders -> this machine's."""
        p = self.ports
        for old, new in (
                ("/opt/maelflow/.venv/bin/", f"{BIN}/"), ("/etc/maelflow", str(self.etc)),
                ("/var/lib/maelflow", str(self.var)), ("databridge.example.int", "127.0.0.1"),
                ("3141", str(p["ecflow"])), ("https://s3.waw3-1.cloudferro.com", f"https://127.0.0.1:{p['s3']}"),
                ("https://mlflow.example.int", f"http://127.0.0.1:{p['mlflow']}"),
                ("https://catalogue.example.int", f"http://127.0.0.1:{p['catalogue']}"),
                ("db.example.int:5432", f"127.0.0.1:{p['postgres']}"), ("&sslmode=verify-full", ""),
                ("MLFLOW_PORT=5000", f"MLFLOW_PORT={p['mlflow']}"),
                ("CATALOGUE_PORT=8300", f"CATALOGUE_PORT={p['catalogue']}"), ("CHANGE-ME", self.pg_password)):
            text = text.replace(old, new)
        return text

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MAELFLOW_", "MLFLOW_", "ECF_", "AWS_"))}
        env["PATH"] = f"{BIN}:{env.get('PATH', '/usr/bin:/bin')}"
        env.update(extra or {})
        return env

    def start_unit(self, name: str, extra_env: dict[str, str] | None = None) -> subprocess.Popen:
        unit = parse_unit(self.blocks[f"unit={name}"])
        env = dict(unit.env)
        for path in unit.env_files:
            for line in Path(path).read_text().splitlines():
                k, sep, v = line.partition("=")
                if sep and not line.startswith("#"):
                    env[k.strip()] = v.strip()
        full = self.env({**env, **(extra_env or {})})
        cwd = env.get("ECF_HOME") or str(self.root)
        for command in unit.pre:
            done = subprocess.run(expand(command, full), env=full, cwd=cwd, capture_output=True, text=True, timeout=120)
            assert done.returncode == 0, f"{name} ExecStartPre {command}:\n{done.stdout}\n{done.stderr}"
        log = open(self.root / f"{name}.log", "ab")
        proc = subprocess.Popen(expand(unit.start, full), env=full, cwd=cwd, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        if unit.stop:
            self.stop_commands[proc.pid] = ([expand(c, full) for c in unit.stop], full, cwd)
        return proc

    def run_check(self, name: str, timeout: float = 120, env: dict[str, str] | None = None) -> list[subprocess.CompletedProcess]:
        """Each command of a ``check=`` block through bash, its ``export`` lines as the environment."""
        results = []
        block_env = dict(env or {})
        lines = [ln for ln in self.blocks[f"check={name}"].replace("\\\n", " ").splitlines()
                 if ln.strip() and not ln.startswith("#")]
        for line in lines:
            line = line.split("  #", 1)[0].strip()
            if line.startswith("export "):
                k, _, v = line[len("export "):].partition("=")
                block_env[k] = v
                continue
            done = subprocess.run(["bash", "-c", line], env=self.env(block_env), cwd=REPO, capture_output=True,
                                  text=True, timeout=timeout)
            assert done.returncode == 0, f"{line}\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
            results.append(done)
        return results

    def log(self, name: str) -> str:
        try:
            return (self.root / f"{name}.log").read_text(errors="replace")[-3000:]
        except FileNotFoundError:
            return ""

    def stop(self) -> None:
        """Each unit's ExecStop (as systemd would), then SIGTERM to what is left, then SIGKILL: only
        the processes this test started, by PID (each leads its own process group)."""
        for proc in reversed(self.procs):
            commands, env, cwd = self.stop_commands.get(proc.pid, ([], None, None))
            for command in commands if proc.poll() is None else []:
                subprocess.run(command, env=env, cwd=cwd, capture_output=True, timeout=30)
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        wait_until(lambda: all(p.poll() is not None for p in self.procs), 15)
        for proc in self.procs:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            if proc.poll() is None:
                proc.wait(10)


def make_ca(folder: Path) -> tuple[Path, Path, Path]:
    """A self-signed CA and a server certificate it signed for 127.0.0.1 (openssl)."""
    folder.mkdir(parents=True, exist_ok=True)
    ca_key, ca, key, csr, cert = (folder / n for n in ("ca.key", "ca.pem", "server.key", "server.csr", "server.pem"))
    ext = folder / "ext.cnf"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n"
                   "extendedKeyUsage=serverAuth\n")
    for argv in (["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", ca_key, "-out", ca,
                  "-days", "2", "-subj", "/CN=maelflow test CA"],
                 ["openssl", "req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr, "-subj", "/CN=127.0.0.1"],
                 ["openssl", "x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial", "-out", cert,
                  "-days", "2", "-extfile", ext]):
        subprocess.run([str(a) for a in argv], check=True, capture_output=True, timeout=60)
    return ca, cert, key


def ecflow_port() -> int:
    for port in range(24000, 32000, 7):  # ecflow_server refuses ports above 49151
        if free_port(port) == port:
            return port
    raise RuntimeError("no free port for ecflow_server")


@pytest.fixture(scope="module")
def production(tmp_path_factory):
    """Every unit of docs/deployment.md started, the operator's files written; stopped at the end."""
    import psycopg

    from maelflow.services.loopback import preload_env
    from maelflow.services.postgres import PostgresService

    site = Site(tmp_path_factory.mktemp("production"))
    site.etc.mkdir()
    site.var.mkdir()
    db = PostgresService(Workspace(site.root / "dbhost"))   # the database host (not the user's workspace)
    site.db = db
    try:
        db.up()
        site.ports = {"ecflow": ecflow_port(), "s3": free_port(), "mlflow": free_port(), "catalogue": free_port(),
                      "postgres": db.state()["port"]}
        site.blocks = {k: site.substitute(v) for k, v in doc_blocks(DOC.read_text()).items()}

        # PostgreSQL: the page's roles and databases, and the passfile the services use
        with psycopg.connect(db.dsn("postgres"), autocommit=True) as conn:
            for statement in site.blocks["setup=postgres"].split(";"):
                if statement.strip():
                    conn.execute(statement)
        write_secret(site.etc / "pgpass", "".join(f"127.0.0.1:{site.ports['postgres']}:*:{role}:{site.pg_password}\n"
                                                  for role in ("mlflow", "mlflow_auth", "catalogue")))

        # the EWC VM: MLflow (basic auth, PostgreSQL) first, as its first start migrates two databases;
        # its user for maelflow is made once it answers
        (site.etc / "mlflow-auth.ini").write_text(site.blocks["config=mlflow-auth"])
        admin_pw = secrets.token_urlsafe(18)
        write_secret(site.etc / "mlflow.env", f"MLFLOW_AUTH_ADMIN_PASSWORD={admin_pw}\n"
                                              f"MLFLOW_FLASK_SERVER_SECRET_KEY={secrets.token_hex(24)}\n")
        write_secret(site.etc / "mlflow.password", secrets.token_urlsafe(18) + "\n")
        (site.var / "mlflow-artifacts").mkdir()
        mlflow_proc = site.start_unit("maelflow-mlflow")

        # the EWC: S3 over HTTPS with a certificate of a private CA, its buckets made by their owners
        ca, cert, key = make_ca(site.root / "tls")
        (site.etc / "ewc-ca.pem").write_bytes(ca.read_bytes())
        access, secret = "EWC" + secrets.token_hex(6).upper(), secrets.token_urlsafe(24)
        write_secret(site.etc / "ewc-keys.json", json.dumps({"access_key": access, "secret_key": secret}))
        for bucket in ("ewc", "catalogue"):
            (site.root / "ewc-data" / bucket).mkdir(parents=True)
        log = open(site.root / "ewc-s3.log", "ab")
        site.procs.append(subprocess.Popen(
            [str(BIN / "rclone"), "serve", "s3", "--config", "", "--cert", str(cert), "--key", str(key),
             "--addr", f"127.0.0.1:{site.ports['s3']}", str(site.root / "ewc-data")],
            env=site.env({"RCLONE_AUTH_KEY": f'"{access},{secret}"'}), stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True))

        # the data bridge: ecflow_server with its white list and password file
        (site.var / "ecflow").mkdir()
        write_secret(site.etc / "ecf.lists", f"4.4.14\n{site.user}\n")
        ecf_pw = secrets.token_hex(16)
        write_secret(site.etc / "ecf.passwd", "4.5.0\n" + "".join(
            f"{site.user} {host} {site.ports['ecflow']} {ecf_pw}\n" for host in dict.fromkeys(("127.0.0.1", "localhost", socket.gethostname()))))
        site.start_unit("maelflow-ecflow", preload_env())  # the bind helper keeps it on 127.0.0.1 here
        assert wait_until(lambda: port_accepts(site.ports["ecflow"]), 30), site.log("maelflow-ecflow")
        site.run_check("ecflow-restart")


        # ... and the catalogue (PostgreSQL index, two workers) in its own workspace
        (site.etc / "catalogue-host.yaml").write_text(site.blocks["profile=catalogue-host"])
        site.start_unit("maelflow-catalogue")
        url = f"http://127.0.0.1:{site.ports['catalogue']}"

        def answers(u: str) -> bool:
            try:
                return requests.get(u + "/health", timeout=2).status_code == 200
            except requests.RequestException:
                return False

        assert wait_until(lambda: answers(url), 60), site.log("maelflow-catalogue")
        site.run_check("catalogue-host")
        assert wait_until(lambda: answers(f"http://127.0.0.1:{site.ports['mlflow']}") or mlflow_proc.poll() is not None,
                          240), site.log("maelflow-mlflow")
        assert mlflow_proc.poll() is None, site.log("maelflow-mlflow")
        site.run_check("mlflow-user", env={"ADMIN_PASSWORD": admin_pw})
        (site.etc / "services.yaml").write_text(site.blocks["profile=production"])
        yield site
    finally:
        site.stop()
        db.forget()


def test_the_demo_runs_through_the_production_profile_and_starts_nothing(production):
    site = production
    ws = site.var / "ws"
    # the relay of the data bridge (its unit), then the page's checks on the deploy host
    results = site.run_check("deploy-host", timeout=900)
    relay = site.start_unit("maelflow-relay")
    assert wait_until(lambda: (ws / "relay" / "heartbeat").is_file(), 60), site.log("maelflow-relay")
    assert relay.poll() is None, site.log("maelflow-relay")
    assert "complete" in results[-1].stdout, results[-1].stdout[-3000:]

    status = subprocess.run([str(BIN / "maelflow"), "services", "status", "--json"], env=site.env(
        {"MAELFLOW_WORKSPACE": str(ws)}), capture_output=True, text=True, timeout=120)
    assert status.returncode == 0, status.stdout + status.stderr
    infos = json.loads(status.stdout)
    for name in ("ecflow", "s3", "mlflow", "catalogue"):
        assert infos[name]["mode"] == "external" and infos[name]["healthy"], infos[name]
    # nothing was started in the workspace: no service folder, no PID file
    assert not list(ws.glob("*/*.pid")), list(ws.glob("*/*.pid"))
    assert not any((ws / name).exists() for name in ("ecflow", "s3", "mlflow", "catalogue", "postgres"))

    # the external services hold the demo's traces: the suite on the data bridge's server ...
    from maelflow.ecf import client_at

    ci = client_at("127.0.0.1", site.ports["ecflow"], site.etc / "ecf.passwd")
    ci.sync_local()
    assert str(ci.get_defs().find_suite("demo").get_state()) == "complete"
    # ... the dataset in the EWC bucket (over HTTPS), the run in MLflow (as the maelflow user) ...
    assert list((site.root / "ewc-data" / "ewc" / "datasets").glob("*.zarr/*"))
    auth = ("maelflow", (site.etc / "mlflow.password").read_text().strip())
    mlflow_url = f"http://127.0.0.1:{site.ports['mlflow']}"
    found = requests.post(f"{mlflow_url}/api/2.0/mlflow/runs/search", json={"experiment_ids": _experiments(
        mlflow_url, auth), "max_results": 10}, auth=auth, timeout=10)
    assert found.status_code == 200 and found.json().get("runs"), found.text[:500]
    assert requests.get(f"{mlflow_url}/api/2.0/mlflow/experiments/search?max_results=1", timeout=10).status_code == 401
    # ... and the training with its checkpoints in the catalogue, whose index is PostgreSQL
    from maelflow_registry.client import CatalogueClient

    catalogue = CatalogueClient(f"http://127.0.0.1:{site.ports['catalogue']}",
                                (site.etc / "catalogue.token").read_text().strip())
    trainings = [t["name"] for t in catalogue.list("trainings")]
    assert any(t.startswith("demo-tiny-") for t in trainings), trainings
    assert catalogue.list("weights")
    assert requests.get(f"http://127.0.0.1:{site.ports['catalogue']}/api/v1/trainings", timeout=10).status_code == 401
    import psycopg

    with psycopg.connect(site.db.dsn("catalogue")) as conn:
        assert conn.execute("SELECT COUNT(*) FROM entries WHERE collection = 'trainings'").fetchone()[0] >= 1


def _experiments(url: str, auth) -> list[str]:
    resp = requests.get(f"{url}/api/2.0/mlflow/experiments/search?max_results=100", auth=auth, timeout=10)
    return [e["experiment_id"] for e in resp.json().get("experiments", [])]


def test_services_status_names_what_is_wrong_with_an_external_service(production, tmp_path):
    import yaml

    site = production
    profile = yaml.safe_load(site.blocks["profile=production"])
    profile["s3"].pop("ca_bundle")                       # the EWC's private CA not given: bad certificate
    wrong = tmp_path / "wrong.password"
    write_secret(wrong, "not-the-password\n")
    profile["mlflow"]["password_file"] = str(wrong)     # MLflow refuses the password
    profile["catalogue"]["token_file"] = str(wrong)     # the catalogue refuses the token
    closed = free_port()
    profile["ecflow"]["port"] = closed                  # nothing listens there
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(profile))
    env = site.env({"MAELFLOW_WORKSPACE": str(tmp_path / "ws")})
    used = subprocess.run([str(BIN / "maelflow"), "services", "use", str(path)], env=env, capture_output=True,
                          text=True, timeout=60)
    assert used.returncode == 0, used.stdout + used.stderr
    status = subprocess.run([str(BIN / "maelflow"), "services", "status"], env=env, capture_output=True,
                            text=True, timeout=120)
    assert status.returncode == 1, status.stdout + status.stderr
    problems = dict(line.split(": ", 1) for line in status.stderr.splitlines() if ": " in line)
    assert problems["s3"].startswith("bad certificate"), problems
    assert problems["mlflow"].startswith("credentials refused"), problems
    assert problems["catalogue"].startswith("credentials refused"), problems
    assert problems["ecflow"].startswith("unreachable"), problems
    # and 'services up' starts nothing in its place: it fails on the first external one that is wrong
    up = subprocess.run([str(BIN / "maelflow"), "services", "up"], env=env, capture_output=True, text=True, timeout=120)
    assert up.returncode != 0 and "external" in up.stderr, up.stdout + up.stderr
    assert not list((tmp_path / "ws").glob("*/*.pid"))

"""``maelflow site check``: what a site lacks before a suite can run there, item by item, with the fix.

A first deploy to a real site otherwise fails far from its cause: a job queued for an hour aborts
because a folder is not writable, a stage stalls because the login node cannot reach the EWC. So
the check connects the way the suite will (the same connection, scheduler, environment lines and
container) and asks, in order: can we log in (and how to renew the credential if not), are the
scheduler's commands and the configured partition/account there, are the site's paths writable (and
how much room they have), is the maelflow the jobs run this one (version and code), is the S3 store
reachable from where stage runs, and, in a tiny job on a compute node, is the shared filesystem
shared, does the site part run there, is the network as the profile says, and (``--gpu``) is a GPU
visible on the GPU partition. Each item is ``ok``, ``failed`` (needed: the check exits non-zero)
or ``warning`` (could not be verified, or not needed).
"""

from __future__ import annotations

import json
import shlex
import socket
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlsplit

from maelflow.errors import SiteError

OK, FAILED, WARNING = "ok", "failed", "warning"
PROBE_TIMEOUT_S = 5


@dataclass
class Item:
    name: str
    status: str
    detail: str
    fix: str | None = None

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


def _tcp_command(host: str, port: int) -> str:
    """A shell test that ``host:port`` accepts a TCP connection (bash's /dev/tcp: nothing to install)."""
    return f"timeout {PROBE_TIMEOUT_S} bash -c {shlex.quote(f'</dev/tcp/{host}/{port}')} 2>/dev/null"


def _endpoint(url: str) -> tuple[str, int]:
    u = urlsplit(url)
    return u.hostname or "", u.port or (443 if u.scheme == "https" else 80)


def reachable_here(url: str) -> str | None:
    """None when ``url``'s host and port accept a TCP connection from this machine, else why not."""
    host, port = _endpoint(url)
    try:
        socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S).close()
        return None
    except OSError as exc:
        return str(exc)


class SiteCheck:
    def __init__(self, ws, name: str, site, *, job: bool = True, gpu: bool = False, job_timeout: float = 300):
        from maelflow.sites.connections import connect, is_local

        self.ws, self.name, self.site = ws, name, site
        self.local = is_local(site)
        self.conn = connect(name, site)
        self.job, self.gpu, self.job_timeout = job, gpu, job_timeout
        self.items: list[Item] = []
        # the maelflow the site's jobs run, as the site part item found it
        from maelflow.sites.site_part import site_part_command

        self.command = site.maelflow_command or site_part_command(site)

    def add(self, name: str, status: str, detail: str, fix: str | None = None) -> Item:
        item = Item(name, status, detail, fix)
        self.items.append(item)
        return item

    def run(self) -> list[Item]:
        if not self.login():
            return self.items
        self.scheduler()
        writable = self.paths()
        self.site_part()
        self.s3()
        if self.job and writable:
            self.compute_job()
        if self.gpu and writable:
            self.gpu_job()
        return self.items

    @property
    def ok(self) -> bool:
        return all(i.status != FAILED for i in self.items)

    # -- login --------------------------------------------------------------------------------
    def login(self) -> bool:
        if self.local:
            self.add("login", OK, "this machine (connection: local)")
            return True
        ssh = self.site.connection.ssh
        how = f"{ssh.auth} auth, {self.conn.target}"
        try:
            self.conn.check()
            self.conn.run("true", timeout=30)
        except SiteError as exc:
            self.add("login", FAILED, f"{how}: {getattr(exc, 'message', None) or exc}",
                     getattr(exc, "hint", None) or ssh.renew_hint)
            return False
        detail = how + (": rides the live 2FA master session" if ssh.auth == "2fa" else "")
        self.add("login", OK, detail)
        return True

    # -- scheduler ----------------------------------------------------------------------------
    def scheduler(self) -> None:
        from maelflow.sites.schedulers import scheduler_for, scheduler_named

        sched = scheduler_for(self.name, self.site)
        words = set()
        for s in (sched, scheduler_named("local")):          # jobs, and login-node tasks (stage)
            for tmpl in (s.SUBMIT_CMD_TMPL, s.KILL_CMD_TMPL, s.POLL_CMD_TMPL):
                first = tmpl.split()[0] if tmpl else ""
                if first and not first.startswith(("out=", "(")):
                    words.add(first)
        if sched.name == "slurm":
            words |= {"sbatch", "squeue", "scancel", "sinfo"}
        test = "; ".join(f"command -v {shlex.quote(w)} >/dev/null || echo {shlex.quote(w)}" for w in sorted(words))
        res = self.conn.run("\n".join([*self.site.environment, test]), check=False, timeout=60)
        missing = res.stdout.split()
        if missing:
            self.add("scheduler", FAILED, f"{sched.name}: not found on the login node: {', '.join(missing)}",
                     "load the scheduler's module in the profile's 'environment' lines, or fix 'scheduler'")
            return
        if sched.name != "slurm" or self.site.slurm is None:
            self.add("scheduler", OK, f"{sched.name}: {', '.join(sorted(words))} found")
            return
        slurm = self.site.slurm
        res = self.conn.run("sinfo -h -o '%P %a %l'", check=False, timeout=60)
        parts = {ln.split()[0].rstrip("*"): ln.split()[1:] for ln in res.stdout.splitlines() if ln.split()}
        wanted = [p for p in dict.fromkeys([slurm.partition, slurm.gpu_partition]) if p]
        bad = [p for p in wanted if p not in parts]
        down = [p for p in wanted if p in parts and parts[p][:1] != ["up"]]
        if bad:
            self.add("scheduler", FAILED, f"slurm: partition {', '.join(bad)} unknown (the site has: "
                     f"{', '.join(sorted(parts)) or 'none'})",
                     f"set slurm.partition/gpu_partition in configs/sites/{self.name}.yaml to one of those")
            return
        detail = f"slurm: sbatch, squeue, scancel found; partitions {', '.join(wanted) or '(default)'}"
        if down:
            self.add("scheduler", WARNING, f"{detail}; not up: {', '.join(down)}", "jobs wait until it is up")
        else:
            self.add("scheduler", OK, detail)
        if slurm.account:
            q = shlex.quote(slurm.account)
            res = self.conn.run(f"sacctmgr -n -P show assoc where user=$USER account={q} format=Account",
                                check=False, timeout=60)
            if res.rc != 0:
                self.add("account", WARNING, f"could not verify account {slurm.account} (sacctmgr: "
                         f"{(res.stderr or res.stdout).strip()[-160:]})")
            elif not res.stdout.strip():
                self.add("account", FAILED, f"your user has no association with account {slurm.account}",
                         "set slurm.account to a project you belong to (sacctmgr show assoc user=$USER)")
            else:
                self.add("account", OK, f"account {slurm.account}")

    # -- paths --------------------------------------------------------------------------------
    def paths(self) -> bool:
        """Each path: created if missing, a file written and removed there; free space from df."""
        p = self.site.paths
        named = {"root": p.root, "datasets": p.datasets, "outputs": p.outputs}
        lines = []
        for key, path in named.items():
            q = shlex.quote(path)
            lines.append(f"if mkdir -p {q} 2>/dev/null && f=$(mktemp {q}/.maelflow-check.XXXXXX 2>/dev/null); "
                         f"then rm -f \"$f\"; echo \"{key} ok $(df -Pk {q} | awk 'NR==2{{print $4}}')\"; "
                         f"else echo '{key} fail'; fi")
        res = self.conn.run("\n".join(lines), check=False, timeout=120)
        seen = {ln.split()[0]: ln.split()[1:] for ln in res.stdout.splitlines() if ln.split()}
        all_ok = True
        for key, path in named.items():
            words = seen.get(key, ["fail"])
            if words[0] != "ok":
                all_ok = False
                self.add(f"paths.{key}", FAILED, f"{path} is not writable by {self._who()}",
                         f"set paths.{key} in configs/sites/{self.name}.yaml to a folder of your project there "
                         "(scratch or project space), or ask the site for write access to it")
                continue
            free = int(words[1]) * 1024 if len(words) > 1 and words[1].isdigit() else None
            room = f", {free / 2**30:.1f} GiB free" if free is not None else ""
            status = WARNING if free is not None and free < 2**30 else OK
            self.add(f"paths.{key}", status, f"{path} writable{room}",
                     "free some space or move the path: less than 1 GiB left" if status == WARNING else None)
        return all_ok

    def _who(self) -> str:
        return "this user" if self.local else self.conn.target.split("@")[0]

    # -- maelflow on the site -----------------------------------------------------------------
    def site_part(self) -> None:
        from maelflow.errors import ConfigurationError
        from maelflow.sites.container import in_container, maelflow_of
        from maelflow.sites.setup import describe, remote_info, resolve_command, same_installation, venv_path

        if self.local:
            self.add("site part", OK, "the local site runs this installation")
            return
        try:
            maelflow_of(self.site)      # the words the job header will carry
            command, why = resolve_command(self.conn, self.site)
        except (SiteError, ConfigurationError) as exc:
            self.add("site part", FAILED, str(getattr(exc, "message", None) or exc), getattr(exc, "hint", None))
            return
        self.command = command
        shown = f"{in_container(self.site, command)} ({why})"
        ours = describe()
        info = remote_info(self.conn, self.site, command)
        fix = f"maelflow site setup {self.name}"
        pinned = (f"; or remove maelflow_command from configs/sites/{self.name}.yaml so jobs use it"
                  if self.site.maelflow_command else "")
        if info is None:
            self.add("site part", FAILED, f"{shown} does not run on the site",
                     f"run '{fix}' (it installs into {venv_path(self.site)}{pinned})")
            return
        diff = same_installation(info, ours)
        if diff:
            self.add("site part", FAILED, f"{shown}: {', '.join(diff)}", f"run '{fix}'{pinned}")
            return
        detail = (f"{shown}: maelflow {info['maelflow']}, code {info['digest']}, python {info['python']} "
                  f"{info['arch']}, torch {info.get('torch') or 'not installed'}")
        self.add("site part", OK, detail)

    # -- S3 -----------------------------------------------------------------------------------
    def s3(self) -> None:
        from maelflow import ewc
        from maelflow.services.base import ServiceError
        from maelflow.services.stack import s3_settings

        settings = None
        where_from = "the workspace's S3 service"
        if self.site.internet.login and not self.local:
            path = ewc.site_credentials_path(self.site.paths.root)
            try:
                settings = json.loads(self.conn.read_bytes(path))
                where_from = path
            except (FileNotFoundError, ValueError, SiteError):
                settings = None
        if settings is None:
            try:
                settings = s3_settings(self.ws, ewc.SITE_ROLE)
            except (ServiceError, KeyError, OSError) as exc:
                self.add("s3", FAILED, f"no EWC endpoint configured here: {exc}",
                         "run 'maelflow services up' (or set the services profile's external S3)")
                return
        url = settings.get("endpoint_url", "")
        if self.site.internet.login and not self.local:
            host, port = _endpoint(url)
            res = self.conn.run(_tcp_command(host, port), check=False, timeout=PROBE_TIMEOUT_S + 30)
            if res.rc == 0:
                self.add("s3", OK, f"{url} reachable from the login node (stage pulls there; endpoint from {where_from})")
            else:
                self.add("s3", FAILED, f"{url} is not reachable from the login node of {self.name} "
                         f"(endpoint from {where_from})",
                         f"check the endpoint ({where_from}: 'maelflow deploy' rewrites it from the workspace), ask the "
                         f"site whether login nodes may reach it, or set internet.login: false in "
                         f"configs/sites/{self.name}.yaml so datasets are pushed from here over SSH")
            return
        why = reachable_here(url)
        if why is None:
            self.add("s3", OK, f"{url} reachable from here (stage pushes to the site over SSH)")
        else:
            self.add("s3", FAILED, f"{url} is not reachable from here ({why}), where stage runs for {self.name}",
                     "start the workspace's S3 service ('maelflow services up') or fix the external S3 endpoint "
                     "of the services profile")

    # -- jobs on a compute node ---------------------------------------------------------------
    def _targets(self) -> dict[str, str]:
        """Servers a compute node talks to when the profile says it can: ecFlow (direct reporting)
        and MLflow (online runs)."""
        from maelflow.services.base import ServiceError
        from maelflow.services.stack import discover

        out = {}
        for name in ("ecflow", "mlflow"):
            try:
                info = discover(self.ws, name)
            except (ServiceError, KeyError, OSError):
                continue
            url = info.url or ""
            if "://" not in url and info.extra.get("port"):
                url = f"tcp://{info.extra.get('host', '127.0.0.1')}:{info.extra['port']}"
            if url:
                out[name] = url
        return out

    def _job(self, kind: str, body: list[str], resources: list[str]) -> tuple[str | None, str]:
        """Run a tiny batch job through the site's runner; (its output, '') or (None, why not)."""
        from maelflow.sites.runner import BatchRunner
        from maelflow.sites.schedulers import scheduler_for

        runner = BatchRunner(self.conn, scheduler_for(self.name, self.site), site_name=self.name, site=self.site,
                             relay=True)
        with tempfile.TemporaryDirectory(prefix="maelflow-check-") as tmp:
            job = Path(tmp, "jobs", "maelflow-check", f"{kind}.job")
            job.parent.mkdir(parents=True)
            out = job.with_suffix(".out")
            job.write_text("\n".join(["#!/bin/bash", *resources, f"# maelflow site check {uuid.uuid4().hex}",
                                      *self.site.environment, *body, "echo 'maelflow-check done'", ""]))
            try:
                handle = runner.submit(job, out)
            except SiteError as exc:
                return None, f"submission failed: {getattr(exc, 'message', None) or exc}"
            deadline = time.monotonic() + self.job_timeout
            alive, text = True, ""
            while time.monotonic() < deadline:
                alive, text = runner.status(handle, None)
                if not alive:
                    break
                time.sleep(1.0)
            if alive:
                runner.kill(handle, None, {})
                return None, (f"job {handle.job_id} did not end within {self.job_timeout:.0f} s "
                              f"({text.strip()[:120]}); cancelled")
            for _ in range(10):     # the output file may be flushed just after the job's end
                runner.fetch_output(handle, out)
                if out.exists() and "maelflow-check done" in out.read_text(errors="replace"):
                    break
                time.sleep(0.5)
            return (out.read_text() if out.exists() else ""), ""

    def compute_job(self) -> None:
        from maelflow.sites.container import site_command
        from maelflow.sites.setup import same_installation

        targets = self._targets()
        probe = f"{self.site.paths.root.rstrip('/')}/spool/.maelflow-check-$$"
        body = [f"mkdir -p {shlex.quote(str(Path(probe).parent))} && echo ok > {probe} && "
                f"echo \"maelflow-check shared $(cat {probe})\"; rm -f {probe}",
                f"echo \"maelflow-check info $({site_command(self.site)} site info --json 2>/dev/null | tail -1)\""]
        for name, url in targets.items():
            host, port = _endpoint(url)
            body.append(f"if {_tcp_command(host, port)}; then echo 'maelflow-check reach {name} yes'; "
                        f"else echo 'maelflow-check reach {name} no'; fi")
        output, why = self._job("compute", body, ["# maelflow time=00:05:00"])
        if output is None:
            self.add("compute node", WARNING, f"tiny job: {why}", "rerun with a longer --job-timeout, or --no-job")
            return
        lines: dict[str, str] = {}
        reach: dict[str, str] = {}
        for ln in output.splitlines():
            words = ln.split(" ", 2)
            if words[0] != "maelflow-check" or len(words) < 2:
                continue
            lines[words[1]] = words[2] if len(words) > 2 else ""
            if words[1] == "reach" and len(words) > 2 and len(words[2].split()) == 2:
                reach[words[2].split()[0]] = words[2].split()[1]
        if "done" not in lines:
            self.add("compute node", FAILED, f"the tiny job did not run to its end: {output.strip()[-400:]}",
                     "look at the environment lines of the profile: they run at the start of every job")
            return
        if lines.get("shared", "").strip() != "ok":
            self.add("compute node", FAILED, f"the job could not write to {self.site.paths.root} on the compute node",
                     "paths.root must be on a filesystem shared by login and compute nodes (scratch or project)")
            return
        try:
            info = json.loads(lines.get("info", "") or "null")
        except ValueError:
            info = None
        if not isinstance(info, dict) or same_installation(info):
            self.add("compute node", FAILED, "the site part does not run on the compute node"
                     + (f" ({', '.join(same_installation(info))})" if isinstance(info, dict) else ""),
                     f"run 'maelflow site setup {self.name}' (check accelerator.arch if the nodes differ from "
                     "the login node)")
        else:
            self.add("compute node", OK, f"shared filesystem and the site part work in a job ({info['arch']})")
        self._network(reach, targets)

    def _network(self, reach: dict[str, str], targets: dict[str, str]) -> None:
        compute = self.site.internet.compute
        if not targets:
            self.add("compute network", WARNING, "no ecFlow or MLflow service known in this workspace to try")
            return
        for name, url in targets.items():
            yes = reach.get(name) == "yes"
            needed = (name == "ecflow" and self.site.reporting == "direct") or (name == "mlflow" and compute)
            if yes:
                note = "" if compute or needed else (" (the profile says compute nodes have no internet: relay "
                                                     "and offline MLflow are used anyway)")
                self.add(f"compute network: {name}", OK, f"{url} reachable from a compute node{note}")
            elif needed:
                fix = ("set reporting: relay (jobs then report through the shared filesystem)" if name == "ecflow"
                       else "set internet.compute: false (MLflow runs are then logged offline and synced)")
                self.add(f"compute network: {name}", FAILED, f"{url} is not reachable from a compute node", fix)
            else:
                self.add(f"compute network: {name}", OK, f"{url} not reachable from a compute node, as configured")

    def gpu_job(self) -> None:
        if self.site.gpus.per_node == 0 or self.site.gpus.vendor == "none":
            self.add("gpu", WARNING, "the profile lists no GPUs (gpus.per_node: 0): nothing to check")
            return
        from maelflow.sites.container import in_container

        python = in_container(self.site, str(Path(self.command.split()[0]).with_name("python")))
        code = "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)"
        body = ["(nvidia-smi -L || rocm-smi --showproductname) 2>/dev/null | head -8 | sed 's/^/maelflow-check smi /'",
                f"echo \"maelflow-check torch $({python} -c {shlex.quote(code)} 2>&1 | tail -1)\""]
        output, why = self._job("gpu", body, ["# maelflow time=00:05:00", "# maelflow gpus_per_node=1"])
        if output is None:
            self.add("gpu", WARNING, f"tiny GPU job: {why}", "rerun with a longer --job-timeout")
            return
        count = next((ln.split()[2] for ln in output.splitlines() if ln.startswith("maelflow-check torch ")
                      and len(ln.split()) >= 3), "")
        if count.isdigit() and int(count) > 0:
            self.add("gpu", OK, f"torch sees {count} GPU(s) in a job on the GPU partition")
        else:
            self.add("gpu", FAILED, "no GPU visible to torch in a job on the GPU partition "
                     f"({count or output.strip()[-200:]})",
                     f"check accelerator.torch_variant ({self.site.accelerator.torch_variant}) and the container's "
                     "--nv/--rocm, then 'maelflow site setup --force'")


def check_site(ws, name: str, site, **kwargs) -> tuple[bool, list[Item]]:
    check = SiteCheck(ws, name, site, **kwargs)
    items = check.run()
    return check.ok, items

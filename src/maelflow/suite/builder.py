"""Turn a resolved experiment into an ecFlow suite on disk: the .def, includes and task scripts.

Built with the ecFlow Python API itself rather than pyflow: Debian's ecflow 5.9.2 lacks attributes
pyflow 3.6 generates, and we want head.h/tail.h includes an operator can read and edit. The same
config always gives byte-identical files, so a build can be diffed and reviewed before deploy.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import ecflow

from maelflow.config.ecftime import parse_cron, parse_late
from maelflow.config.loader import ResolvedExperiment
from maelflow.errors import MaelflowError
from maelflow.installation import maelflow_command
from maelflow.sites.connections import is_local
from maelflow.sites.schedulers import job_variables, scheduler_for, scheduler_named
from maelflow.suite.layout import FamilySpec, SuiteSpec, TaskSpec, suite_layout
from maelflow.workspace import Workspace, write_atomic

TEMPLATES_ENV = "MAELFLOW_SUITES_DIR"
CONFIG_FILE = "experiment.json"


class BuildError(MaelflowError):
    pass


@dataclass(frozen=True)
class BuiltSuite:
    name: str
    out_dir: Path
    def_file: Path
    defs: ecflow.Defs


def templates_dir() -> Path:
    env = os.environ.get(TEMPLATES_ENV)
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[3] / "suites"


def site_command(rx: ResolvedExperiment, site: str) -> str:
    s = rx.sites[site]
    if is_local(s):
        return maelflow_command()
    from maelflow.sites.container import site_command as through_container

    return through_container(s)   # the site's own installation, in its container when it has one


def site_config_path(rx: ResolvedExperiment, site: str) -> str:
    return f"{rx.sites[site].paths.root.rstrip('/')}/suites/{rx.name}/{CONFIG_FILE}"


def spool_dir(rx: ResolvedExperiment, site: str) -> str:
    return f"{rx.sites[site].paths.root.rstrip('/')}/spool/{rx.name}"


def suite_variables(rx: ResolvedExperiment, ws: Workspace, out_dir: Path, ecf_host: str) -> dict[str, str]:
    mf = maelflow_command()
    return {
        "ECF_HOME": str(out_dir / "jobs"),
        "ECF_FILES": str(out_dir / "tasks"),
        "ECF_INCLUDE": str(out_dir / "include"),
        "ECF_TRIES": "1",
        "ECF_JOB_CMD": (f"{mf} job submit --site %SITE:local% --runner %MAELFLOW_RUNNER:site% "
                        "--config %MAELFLOW_SUITE_CONFIG% --ecf-name %ECF_NAME% --ecf-pass %ECF_PASS% "
                        "--ecf-tryno %ECF_TRYNO% --ecf-port %ECF_PORT% %ECF_JOB% %ECF_JOBOUT%"),
        "ECF_KILL_CMD": (f"{mf} job kill --site %SITE:local% --runner %MAELFLOW_RUNNER:site% "
                         "--config %MAELFLOW_SUITE_CONFIG% --ecf-name %ECF_NAME% --ecf-pass %ECF_PASS% "
                         "--ecf-tryno %ECF_TRYNO% --ecf-port %ECF_PORT% %ECF_JOB% %ECF_RID%"),
        "ECF_STATUS_CMD": (f"{mf} job status --site %SITE:local% --runner %MAELFLOW_RUNNER:site% "
                           "--config %MAELFLOW_SUITE_CONFIG% %ECF_JOB% %ECF_RID%"),
        "MAELFLOW": mf,
        "MAELFLOW_SITE_CMD": mf,
        "MAELFLOW_SUITE_CONFIG": str(out_dir / CONFIG_FILE),
        "MAELFLOW_CONFIG": str(out_dir / CONFIG_FILE),
        "MAELFLOW_WORKSPACE": str(ws.root),
        "MAELFLOW_ECF_HOST": ecf_host,
        "MAELFLOW_REPORT": "direct",
        "MAELFLOW_RUNNER": "local",  # tasks outside a site family run beside the server ...
        **job_variables(scheduler_named("local")),  # ... as plain processes
        "SUITE": rx.name,
    }


def _add_attrs(node, spec) -> None:
    for k, v in spec.variables.items():
        node.add_variable(k, v)
    for name, value in spec.labels:
        node.add_label(name, value)
    for name, lo, hi in getattr(spec, "meters", []):
        node.add_meter(name, lo, hi)
    for name in getattr(spec, "events", []):
        node.add_event(name)
    if spec.trigger:
        node.add_trigger(spec.trigger)
    if getattr(spec, "complete", None):
        node.add_complete(spec.complete)
    if getattr(spec, "cron", None):
        node.add_cron(parse_cron(spec.cron))
    if getattr(spec, "repeat", None):
        node.add_repeat(ecflow.RepeatDate(*spec.repeat))
    if getattr(spec, "late", None):
        node.add_late(parse_late(spec.late))


def server_task_variables(suite_vars: dict[str, str]) -> dict[str, str]:
    """A server-side task inside a site family runs here as a plain process, reports directly,
    reads the local config."""
    return {"MAELFLOW_RUNNER": "local", "MAELFLOW_REPORT": "direct",
            "MAELFLOW_CONFIG": suite_vars["MAELFLOW_SUITE_CONFIG"], "MAELFLOW_SITE_CMD": suite_vars["MAELFLOW"],
            "ECF_INCLUDE": suite_vars["ECF_INCLUDE"], **job_variables(scheduler_named("local"))}


def login_task_variables() -> dict[str, str]:
    """A task on a site's login node runs there as a plain process, whatever the site's scheduler."""
    return {"MAELFLOW_RUNNER": "login", **job_variables(scheduler_named("local"))}


def _add_children(parent, children, suite_name: str, server_vars: dict[str, str]) -> None:
    for child in children:
        if isinstance(child, TaskSpec):
            node = parent.add_task(child.name)
            if child.runs_on == "server":
                for k, v in server_vars.items():
                    node.add_variable(k, v)
            elif child.runs_on == "login":
                for k, v in login_task_variables().items():
                    node.add_variable(k, v)
        else:
            node = parent.add_family(child.name)
        _add_attrs(node, child)
        for limit in child.inlimits:
            node.add_inlimit(limit, f"/{suite_name}")
        if isinstance(child, FamilySpec):
            _add_children(node, child.children, suite_name, server_vars)


def make_defs(spec: SuiteSpec) -> ecflow.Defs:
    defs = ecflow.Defs()
    suite = defs.add_suite(spec.name)
    for k, v in spec.variables.items():
        suite.add_variable(k, v)
    for name, value in spec.labels:
        suite.add_label(name, value)
    for name, n in spec.limits:
        suite.add_limit(name, n)
    _add_children(suite, spec.children, spec.name, server_task_variables(spec.variables))
    return defs


def site_header(rx: ResolvedExperiment, site: str) -> str:
    s = rx.sites[site]
    lines = [f"# ---- site {site} (generated by maelflow build from configs/sites/{site}.yaml) ----"]
    lines += s.environment or ["# no site environment lines"]
    from maelflow.sites.container import job_environment

    lines += job_environment(s)   # the accelerator's variables (NCCL/RCCL, MIOpen cache ...)
    return "\n".join(lines) + "\n"


def build_suite(rx: ResolvedExperiment, out_dir: Path, ws: Workspace, ecf_host: str = "127.0.0.1") -> BuiltSuite:
    """Write the suite to ``out_dir`` atomically: a failed build leaves the previous one intact."""
    out_dir = out_dir.resolve()
    spec = suite_layout(rx, suite_variables(rx, ws, out_dir, ecf_host))
    site_families = [c for c in spec.children if isinstance(c, FamilySpec) and c.variables.get("SITE")]
    for bench in (c for c in spec.children if isinstance(c, FamilySpec) and c.name == "benchmark"):
        site_families += [c for c in bench.children if isinstance(c, FamilySpec) and c.variables.get("SITE")]
    for fam in site_families:
        site = fam.variables["SITE"]
        fam.variables["ECF_INCLUDE"] = f"{out_dir / 'include' / site}:{out_dir / 'include'}"
        fam.variables["MAELFLOW_SITE_CMD"] = site_command(rx, site)
        fam.variables["MAELFLOW_REPORT"] = rx.sites[site].reporting
        fam.variables["MAELFLOW_RUNNER"] = "site"
        fam.variables.update(job_variables(scheduler_for(site, rx.sites[site])))
        if not is_local(rx.sites[site]):
            # the job reads the config where the runner copies it on the site
            fam.variables["MAELFLOW_CONFIG"] = site_config_path(rx, site)
        if rx.sites[site].reporting == "relay":
            fam.variables["MAELFLOW_SPOOL"] = spool_dir(rx, site)
    defs = make_defs(spec)
    problems = defs.check()
    if problems:
        raise BuildError(f"ecFlow rejected the suite definition:\n{problems}")

    stage = out_dir.with_name(f".{out_dir.name}.building")
    try:
        _write_files(rx, spec, defs, stage, out_dir)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    if out_dir.exists():
        jobs = out_dir / "jobs"
        if jobs.exists():  # keep the job files and outputs of earlier runs
            jobs.rename(stage / "jobs")
        old = out_dir.with_name(f".{out_dir.name}.old")
        if old.exists():
            shutil.rmtree(old)
        out_dir.rename(old)
        stage.rename(out_dir)
        shutil.rmtree(old)
    else:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        stage.rename(out_dir)
    return BuiltSuite(spec.name, out_dir, out_dir / f"{spec.name}.def", defs)


def _write_files(rx: ResolvedExperiment, spec: SuiteSpec, defs: ecflow.Defs, stage: Path, out_dir: Path) -> None:
    templates = templates_dir()
    if not (templates / "include" / "head.h").is_file():
        raise BuildError(f"suite templates not found in {templates} (set {TEMPLATES_ENV})")
    if stage.exists():
        shutil.rmtree(stage)
    (stage / "include").mkdir(parents=True)
    (stage / "tasks").mkdir()
    for f in sorted((templates / "include").glob("*.h")):
        shutil.copyfile(f, stage / "include" / f.name)
    (stage / "include" / "site.h").write_text("# ---- no site environment (tasks outside a site family) ----\n")
    for site in rx.experiment.sites:
        (stage / "include" / site).mkdir()
        (stage / "include" / site / "site.h").write_text(site_header(rx, site))
    for f in sorted((templates / "tasks").glob("*.ecf")):
        shutil.copyfile(f, stage / "tasks" / f.name)
    write_atomic(stage / CONFIG_FILE, json.dumps(rx.to_json(), indent=2, sort_keys=True) + "\n")
    def_file = stage / f"{spec.name}.def"
    defs.save_as_defs(str(def_file))

    # job-creation check against the staged files, pointed at the final paths
    _check_job_creation(spec, stage, out_dir)


def _check_job_creation(spec: SuiteSpec, stage: Path, final: Path) -> None:
    """Let ecFlow pre-process the tasks (includes, %VARIABLES%) without a server.

    The check runs on a pruned copy of the suite holding one task per (site, script): tasks that
    share both are pre-processed from the same files with the same variable names, so checking one
    checks them all, and a build of a hundred experiments stays fast.
    """
    staged_vars = dict(spec.variables)
    for key in ("ECF_FILES", "ECF_INCLUDE", "ECF_HOME"):
        staged_vars[key] = staged_vars[key].replace(str(final), str(stage))
    check_spec = SuiteSpec(spec.name, staged_vars, spec.limits, _pruned(spec.children, "", set()), spec.labels)
    defs = make_defs(check_spec)
    for node in defs.get_all_nodes():
        inc = node.find_variable("ECF_INCLUDE")
        if not inc.empty() and not isinstance(node, ecflow.Suite):
            node.delete_variable("ECF_INCLUDE")
            node.add_variable("ECF_INCLUDE", inc.value().replace(str(final), str(stage)))
    for node in defs.get_all_nodes():  # triggers may name tasks pruned away
        if node.get_trigger() is not None:
            node.delete_trigger()
    keep = bool(os.environ.get("MAELFLOW_KEEP_JOBCHECK"))
    # the job files are thrown away: write them to memory where there is a tmpfs
    shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    jobs_dir = stage / ".jobcheck" if keep else Path(tempfile.mkdtemp(prefix="maelflow-jobcheck-", dir=shm))
    ctrl = ecflow.JobCreationCtrl()
    ctrl.set_dir_for_job_creation(str(jobs_dir))
    try:
        defs.check_job_creation(ctrl)
    finally:
        if not keep:
            shutil.rmtree(jobs_dir, ignore_errors=True)
    if ctrl.get_error_msg():
        raise BuildError(f"ecFlow could not create the job scripts:\n{ctrl.get_error_msg()}")


def _pruned(children, site: str, seen: set[tuple[str, str]]) -> list:
    kept = []
    for child in children:
        if isinstance(child, TaskSpec):
            if (site, child.script) not in seen:
                seen.add((site, child.script))
                kept.append(child)
        else:
            sub = _pruned(child.children, child.variables.get("SITE", site), seen)
            if sub:
                kept.append(FamilySpec(child.name, child.variables, sub, None, child.inlimits, child.labels,
                                       repeat=child.repeat))
    return kept

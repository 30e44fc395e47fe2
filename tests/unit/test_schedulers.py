"""Schedulers as plugins: the loader, the local processes, the test package's third scheduler, and
the batch runner's submit-once guard, on this machine through the local connection.

The local scheduler and the plugin start real (short) background processes; nothing else runs.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from maelflow.config.errors import ConfigError
from maelflow.config.loader import load_experiment
from maelflow.errors import ConfigurationError, ConnectionLost
from maelflow.sites.connections.local import LocalConnection
from maelflow.sites.runner import BatchRunner, JobHandle, submission_token
from maelflow.sites.schedulers import (ALIVE, COMPLETED, PENDING, RUNNING, UNKNOWN, CommandScheduler,
                                       JobEnvironment, Scheduler, job_variables, known, scheduler_for,
                                       scheduler_named)
from tests.conftest import write_yaml

pytestmark = pytest.mark.unit


# ------------------------------------------------------------------------------------- loader
def test_the_three_schedulers_are_found_by_name():
    assert {"local", "slurm", "testsched"} <= set(known())
    for name in ("local", "slurm", "testsched"):
        s = scheduler_named(name)
        assert isinstance(s, Scheduler) and s.name == name


def test_unknown_scheduler_names_the_site_and_the_known_ones():
    with pytest.raises(ConfigurationError) as err:
        scheduler_named("pbs", site="marenostrum5")
    text = str(err.value)
    assert "site 'marenostrum5'" in text and "'pbs'" in text and "local, slurm" in text
    assert err.value.hint and "install" in err.value.hint


def _paths(root) -> dict[str, str]:
    return {"root": str(root), "datasets": str(root / "d"), "outputs": str(root / "o")}


def test_site_config_with_an_unknown_scheduler_is_a_config_error(config_root, tmp_path):
    write_yaml(config_root / "sites" / "odd.yaml", {
        "name": "odd", "scheduler": "pbs", "connection": {"type": "local"}, "paths": _paths(tmp_path)})
    with pytest.raises(ConfigError) as err:
        load_experiment("demo", ["sites=[odd]", "datasets=[]", "trainings=[]"], config_root=config_root)
    (problem,) = [p for p in err.value.problems if p.field.endswith("scheduler")]
    assert problem.file.endswith("odd.yaml") and problem.value == "pbs"
    assert "no scheduler 'pbs'" in problem.reason and "slurm" in problem.reason


def test_a_plugin_scheduler_is_a_valid_site_scheduler(config_root, tmp_path):
    write_yaml(config_root / "sites" / "atsite.yaml", {
        "name": "atsite", "scheduler": "testsched", "connection": {"type": "local"}, "paths": _paths(tmp_path)})
    rx = load_experiment("demo", ["sites=[atsite]", "datasets=[]", "trainings=[]"], config_root=config_root)
    assert scheduler_for("atsite", rx.sites["atsite"]).name == "testsched"


def test_job_variables_tell_the_header_what_to_read():
    assert job_variables(scheduler_named("slurm")) == {
        "MAELFLOW_SCHEDULER": "slurm", "MAELFLOW_JOB_ID": "${SLURM_JOB_ID:-$$}",
        "MAELFLOW_WARNING_SIGNAL": "USR1", "MAELFLOW_LAUNCH": "srun --kill-on-bad-exit=1",
        "MAELFLOW_RANK_VAR": "SLURM_PROCID"}
    assert job_variables(scheduler_named("local")) == {
        "MAELFLOW_SCHEDULER": "local", "MAELFLOW_JOB_ID": "$$", "MAELFLOW_WARNING_SIGNAL": "", "MAELFLOW_LAUNCH": "",
        "MAELFLOW_RANK_VAR": ""}
    assert job_variables(scheduler_named("testsched"))["MAELFLOW_JOB_ID"] == "${TESTSCHED_JOB_ID:-$$}"


def test_a_declarative_scheduler_in_a_few_lines():
    class Pbs(CommandScheduler):
        name = "pbs"
        SUBMIT_CMD_TMPL = "qsub %(job)s"
        KILL_CMD_TMPL = "qdel %(job_id)s"
        POLL_CMD_TMPL = "qstat -f %(job_id)s"
        REC_ID_FROM_SUBMIT_OUT = __import__("re").compile(r"^(\d+\S*)", __import__("re").M)
        JOB_ID_RE = __import__("re").compile(r"\d+(\.\S+)?")
        STATES = {"Q": PENDING, "R": RUNNING, "F": COMPLETED}
        ENV = JobEnvironment(job_id="PBS_JOBID")

    p = Pbs()
    assert p.parse_job_id("4711.pbs01\n") == "4711.pbs01"
    assert p.kill_command("4711.pbs01") == "qdel 4711.pbs01"
    assert p.parse_state("job_state = R") == RUNNING and p.parse_state("nothing") == UNKNOWN
    assert p.find_command() is None and p.directives(None, None, job_name="x", output=None, token="t") == []
    with pytest.raises(ValueError):
        p.poll_command("1; reboot")


def test_local_processes_read_ps():
    s = scheduler_named("local")
    assert s.parse_state("  4242 Ss   00:01 bash fit.job1\n 4250 S 00:01 sleep 5") == RUNNING
    assert s.parse_state(" 4242 Z 00:01 [bash] <defunct>") == UNKNOWN
    assert s.parse_state("no process in group 4242") == UNKNOWN
    assert s.kill_command("4242") == "kill -TERM -- -4242 2>/dev/null || true"
    assert s.hard_kill_command("4242").startswith("kill -KILL -- -4242")
    assert s.valid_job_id("4242") and not s.valid_job_id("0") and not s.valid_job_id("-1")


# ------------------------------------------------------------------------------- batch runner
def _job(tmp_path: Path, name: str, body: str) -> tuple[Path, Path]:
    d = tmp_path / "suite" / "jobs" / "demo" / "fam"
    d.mkdir(parents=True, exist_ok=True)
    (tmp_path / "suite" / "tasks").mkdir(exist_ok=True)
    job = d / f"{name}.job1"
    job.write_text(f"#!/bin/bash\n# ECF_PASS={time.time_ns()}\n{body}\n")
    return job, d / f"{name}.1"


def _wait(runner: BatchRunner, handle: JobHandle, done, timeout: float = 20.0) -> tuple[bool, str]:
    deadline = time.monotonic() + timeout
    while True:
        alive, text = runner.status(handle, None)
        if done(alive, text) or time.monotonic() > deadline:
            return alive, text
        time.sleep(0.1)


def _local(scheduler: str) -> BatchRunner:
    return BatchRunner(LocalConnection("here"), scheduler_named(scheduler), site_name="here")


@pytest.mark.parametrize("scheduler", ["local", "testsched"])
def test_job_runs_in_place_and_writes_its_output_into_jobout(tmp_path, scheduler):
    runner = _local(scheduler)
    job, jobout = _job(tmp_path, "hello", 'echo "hello from ${TESTSCHED_JOB_ID:-$$} in $(basename $PWD)"')
    handle = runner.submit(job, jobout)
    assert handle.kind == scheduler and handle.remote_job == str(job) and handle.remote_out is None
    alive, text = _wait(runner, handle, lambda alive, text: not alive)
    assert not alive, text
    assert jobout.read_text() == f"hello from {handle.job_id} in fam\n"
    assert runner.fetch_output(handle, jobout) == 0          # nothing to tail: it is already there
    if scheduler == "testsched":
        assert scheduler_named(scheduler).parse_state(text) == COMPLETED, text


@pytest.mark.parametrize("scheduler", ["local", "testsched"])
def test_kill_stops_a_running_job(tmp_path, scheduler):
    runner = _local(scheduler)
    job, jobout = _job(tmp_path, "long", "trap 'echo got TERM; exit 143' TERM; echo started; sleep 60 & wait")
    handle = runner.submit(job, jobout)
    alive, text = _wait(runner, handle, lambda alive, text: runner.scheduler.parse_state(text) == RUNNING
                        and jobout.exists() and "started" in jobout.read_text())
    assert alive, text
    t0 = time.monotonic()
    said = runner.kill(handle, None, {})
    assert "was RUNNING" in said and "behalf" not in said, said
    alive, text = _wait(runner, handle, lambda alive, text: not alive, timeout=10)
    assert not alive and time.monotonic() - t0 < 8, text
    assert "got TERM" in jobout.read_text()


def test_kill_of_a_queued_job_aborts_it_on_its_behalf(tmp_path):
    runner = _local("testsched")
    job, jobout = _job(tmp_path, "queued", "echo never")
    handle = runner.submit(job, jobout)            # at-style: it waits a moment before it starts
    said = runner.kill(handle, None, {})
    assert "was PENDING" in said and "no ECF_NAME was given to abort the task on its behalf" in said
    time.sleep(1)
    assert not jobout.exists()


def test_kill_of_a_job_that_died_unseen_aborts_it_on_its_behalf(tmp_path):
    runner = _local("local")
    job, jobout = _job(tmp_path, "gone", "exit 0")
    handle = runner.submit(job, jobout)
    _wait(runner, handle, lambda alive, text: not alive)
    assert "already ended" in runner.kill(handle, None, {})
    relayed = BatchRunner(LocalConnection("here"), scheduler_named("local"), site_name="here", relay=True)
    assert "behalf" not in relayed.kill(handle, None, {})   # its end may sit in the spool, unreplayed


class DropsAfterSending(LocalConnection):
    """Runs the first submission, then loses its answer, as a connection dropped after sending would."""

    def __init__(self):
        super().__init__("here")
        self.dropped = 0

    def run(self, command, **kwargs):
        result = super().run(command, **kwargs)
        if "mkdir" in command and ".submit" in command and not self.dropped:
            self.dropped += 1
            raise ConnectionLost("lost", sent=True)
        return result


@pytest.mark.parametrize("scheduler", ["local", "testsched"])
def test_a_lost_answer_never_submits_twice(tmp_path, scheduler):
    """local: the marker replays the first answer; testsched: its queue listing knows the token."""
    conn = DropsAfterSending()
    runner = BatchRunner(conn, scheduler_named(scheduler), site_name="here")
    job, jobout = _job(tmp_path, "once", f"echo ran >> {tmp_path}/count")
    handle = runner.submit(job, jobout)
    assert conn.dropped == 1
    _wait(runner, handle, lambda alive, text: not alive)
    assert (tmp_path / "count").read_text() == "ran\n"
    again = runner.submit(job, jobout)               # ecFlow re-running the same ECF_JOB_CMD
    assert again.job_id == handle.job_id
    time.sleep(1)
    assert (tmp_path / "count").read_text() == "ran\n"
    token = submission_token("demo/fam/" + job.name, job.read_text())
    assert (job.parent / f".{job.name}.{token}.submit").is_dir()


def test_a_refused_submission_drops_its_marker_so_a_retry_submits(tmp_path):
    class Refuses(CommandScheduler):
        name = "refuses"
        SUBMIT_CMD_TMPL = "echo 'no such queue' >&2; exit 1"

    runner = BatchRunner(LocalConnection("here"), Refuses(), site_name="here")
    job, jobout = _job(tmp_path, "refused", "echo never")
    from maelflow.errors import SubmitError

    for _ in range(2):                                # the second try really runs the command again
        with pytest.raises(SubmitError, match="no such queue"):
            runner.submit(job, jobout)
    assert not [p for p in job.parent.iterdir() if p.name.endswith(".submit")]


def test_remote_sites_get_a_copy_with_directives_and_their_output_is_tailed(tmp_path, config_root):
    """A site reached through a connection that does not share our files (a login node): modelled with
    the local connection told not to share them, so the copy, the job folder and the tail are real."""
    ElsewhereConnection = LocalConnection

    rx = load_experiment("demo", ["sites=[localhpc]", "datasets=[]", "trainings=[]"], config_root=config_root,
                         placeholders={"hpc_port": "2222", "hpc_user": "u", "hpc_identity": "/k",
                                       "hpc_known_hosts": "/kh", "hpc_home": "/h", "hpc_root": str(tmp_path / "site"),
                                       "maelflow": "maelflow", "workspace": str(tmp_path / "ws")})
    site = rx.sites["localhpc"]
    runner = BatchRunner(ElsewhereConnection("localhpc"), scheduler_named("local"), site_name="localhpc", site=site,
                         shares_files=False)
    assert not runner.shares_files
    job, jobout = _job(tmp_path, "far", "echo far away; echo done")
    handle = runner.submit(job, jobout)
    assert handle.remote_job == f"{tmp_path}/site/jobs/demo/fam/far.job1"
    assert handle.remote_out == f"{tmp_path}/site/jobs/demo/fam/far.1"
    _wait(runner, handle, lambda alive, text: not alive)
    assert runner.fetch_output(handle, jobout) > 0 and jobout.read_text() == "far away\ndone\n"
    assert runner.fetch_output(handle, jobout) == 0
    # the same site's scheduler (slurm) would have put its directives in the copy, after the shebang
    slurm = BatchRunner(ElsewhereConnection("localhpc", dry_run=True), scheduler_named("slurm"),
                        site_name="localhpc", site=site, shares_files=False)
    job2, jobout2 = _job(tmp_path, "dry", "echo dry")
    assert slurm.submit(job2, jobout2).remote_job == f"{tmp_path}/site/jobs/demo/fam/dry.job1"


def test_alive_states():
    assert ALIVE == {PENDING, RUNNING}


# ------------------------------------------------------------------------------ the job side
def test_the_job_header_asks_the_sites_scheduler(config_root, tmp_path, monkeypatch):
    """The builder renders each scheduler's variables into its site's jobs: job id, warning trap,
    launcher; tasks on a login node or beside the server are plain processes whatever the site."""
    from maelflow.suite.builder import build_suite
    from maelflow.workspace import Workspace

    monkeypatch.setenv("MAELFLOW_KEEP_JOBCHECK", "1")
    write_yaml(config_root / "sites" / "atsite.yaml", {
        "name": "atsite", "scheduler": "testsched", "connection": {"type": "local"},
        "paths": {"root": str(tmp_path / "at"), "datasets": str(tmp_path / "at/d"), "outputs": str(tmp_path / "at/o")}})
    ws = Workspace(tmp_path / "ws")
    rx = load_experiment("demo", ["sites=[lumi,atsite]", "training.tiny.nodes=2"], config_root=config_root,
                         placeholders={"workspace": str(ws.root)})
    built = build_suite(rx, tmp_path / "out", ws)
    jobs = {str(p.relative_to(built.out_dir / ".jobcheck")): p.read_text()
            for p in (built.out_dir / ".jobcheck").rglob("*.job*")}

    def job(site: str, task: str) -> str:
        return next(text for path, text in jobs.items() if f"/{site}/" in path and path.split("/")[-1].startswith(task))

    lumi_train, at_train = job("lumi", "train.job"), job("atsite", "train.job")
    assert "ECF_RID=${SLURM_JOB_ID:-$$}" in lumi_train and "MAELFLOW_SCHEDULER=slurm" in lumi_train
    assert 'MAELFLOW_WARNING_SIGNAL="USR1"' in lumi_train and 'launch="srun --kill-on-bad-exit=1"' in lumi_train
    assert "ECF_RID=${TESTSCHED_JOB_ID:-$$}" in at_train and "MAELFLOW_SCHEDULER=testsched" in at_train
    assert 'MAELFLOW_WARNING_SIGNAL=""' in at_train and 'launch=""' in at_train
    for plain in (job("lumi", "stage.job"), job("lumi", "sync.job"), jobs[next(p for p in jobs if "provenance" in p)]):
        assert "ECF_RID=$$" in plain and "MAELFLOW_SCHEDULER=local" in plain
    # SLURM is named only by the scheduler's own lines, and by what the site's profile itself exports
    # (LUMI's accelerator environment keys the MIOpen cache by the job id)
    profile = {f'export {k}="{v}"' for k, v in rx.sites["lumi"].accelerator.environment.items()}
    code = [ln for text in jobs.values() for ln in text.splitlines()
            if not ln.lstrip().startswith("#") and ln.strip() not in profile]
    assert [ln for ln in code if "SLURM" in ln or "srun" in ln] == [ln for ln in code if "${SLURM_JOB_ID:-$$}" in ln
                                                                   or "srun --kill-on-bad-exit=1" in ln
                                                                   or "MAELFLOW_RANK_VAR=SLURM_PROCID" in ln]


def test_tasks_outside_site_families_run_beside_the_server(config_root):
    rx = load_experiment("demo", ["sites=[lumi]"], config_root=config_root)
    from maelflow.sites.runner import runner_for

    runner = runner_for(rx, "local", where="local")      # %SITE:local%: no site of the experiment
    assert runner.scheduler.name == "local" and runner.shares_files and runner.site is None


def test_inside_a_job_the_header_names_the_scheduler():
    from maelflow.sites.schedulers import current

    inside = {"MAELFLOW_SCHEDULER": "slurm", "SLURM_JOB_ID": "42", "SLURM_PROCID": "1"}
    assert current(inside).name == "slurm" and current(inside).rank_in(inside) == 1
    assert current({}).name == "local" and current({}).job_id_in({}) is None
    assert scheduler_named("local").lightning_environment() is None

"""SLURM as data: #SBATCH lines per site, state parsing, job ids; and the batch runner's dry run.

No SSH and no SLURM here: the runner's dry run must print the commands without connecting.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from maelflow.config.loader import compose_file, load_experiment
from maelflow.config.models import Site
from maelflow.sites.runner import BatchRunner, JobHandle, local_ecf_home, runner_for, submission_token, \
    with_directives
from maelflow.sites.schedulers import TaskResources, scheduler_named
from maelflow.sites.schedulers.slurm import Slurm
from tests.conftest import REPO

pytestmark = pytest.mark.unit

PLACEHOLDERS = {"hpc_port": "2222", "hpc_user": "maelhpc", "hpc_identity": "/ws/hpc/id_ed25519",
                "hpc_known_hosts": "/ws/hpc/known_hosts", "hpc_home": "/home/maelhpc",
                "hpc_root": "/users/maelhpc/maelflow-0123abcd",
                "maelflow": "/opt/maelflow/bin/maelflow", "workspace": "/ws"}
SITE_FILES = sorted((REPO / "configs" / "sites").glob("*.yaml"))


def _fill(value):
    if isinstance(value, str):
        for k, v in PLACEHOLDERS.items():
            value = value.replace("{" + k + "}", v)
        return value
    if isinstance(value, dict):
        return {k: _fill(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill(v) for v in value]
    return value


def load_site(name: str) -> Site:
    return Site.model_validate(_fill(compose_file(REPO / "configs" / "sites" / f"{name}.yaml", [])))


def directives(site: Site, task: TaskResources, **kwargs) -> list[str]:
    return Slurm().directives(site, task, **kwargs)


def parse_state(text: str) -> str:
    return Slurm().parse_state(text)


def sbatch(lines: list[str]) -> dict[str, str]:
    """'#SBATCH --key=value' lines as {key: value} (value '' for flags)."""
    out = {}
    for ln in lines:
        assert ln.startswith("#SBATCH --"), ln
        key, _, value = ln[len("#SBATCH --"):].partition("=")
        assert key not in out, f"{key} given twice"
        out[key] = value
    return out


EXPECTED_GPU = {  # site -> (gpu directive, partition for GPU jobs or None, qos or None)
    "lumi": (("gpus-per-node", "8"), "standard-g", None),
    "leonardo": (("gres", "gpu:4"), "boost_usr_prod", "normal"),
    "marenostrum5": (("gres", "gpu:4"), None, "acc_ehpc"),
    "jupiter": (("gpus-per-node", "4"), "booster", None),
}


@pytest.mark.parametrize("path", SITE_FILES, ids=lambda p: p.stem)
def test_directives_for_every_site(path: Path):
    site = load_site(path.stem)
    if site.scheduler != "slurm":
        with pytest.raises(ValueError, match="no slurm section"):
            directives(site, TaskResources())
        return
    cpu = sbatch(directives(site, TaskResources(), job_name="demo.fam.t", output="/o/t.1", token="abc"))
    assert cpu["job-name"] == "demo.fam.t"
    assert cpu["output"] == "/o/t.1" and "error" not in cpu
    assert cpu["nodes"] == "1" and cpu["ntasks-per-node"] == "1"
    assert cpu["time"] == "00:30:00"
    assert cpu["comment"] == "maelflow:abc"
    assert "gres" not in cpu and "gpus-per-node" not in cpu
    assert ("account" in cpu) == bool(site.slurm.account)
    assert ("qos" in cpu) == bool(site.slurm.qos)
    assert cpu.get("partition") == site.slurm.partition
    if site.gpus.per_node:
        gpu = sbatch(directives(site, TaskResources(nodes=2, gpus_per_node=site.gpus.per_node, cpus_per_task=8)))
        (key, value), partition, qos = EXPECTED_GPU[site.name]
        assert gpu[key] == value
        assert ({"gres", "gpus-per-node"} - {key}).isdisjoint(gpu)
        assert gpu.get("partition") == partition
        assert gpu.get("qos") == qos
        assert gpu["nodes"] == "2" and gpu["cpus-per-task"] == "8"


def test_localhpc_site_fills_its_placeholders():
    site = load_site("localhpc")
    ssh = site.connection.ssh
    assert (ssh.host, ssh.port, ssh.user, ssh.auth) == ("127.0.0.1", 2222, "maelhpc", "key")
    assert ssh.identity_file == "/ws/hpc/id_ed25519" and ssh.known_hosts == "/ws/hpc/known_hosts"
    assert site.paths.root == "/users/maelhpc/maelflow-0123abcd"
    assert site.maelflow_command is None and site.install.fallback_command == "/opt/maelflow/bin/maelflow"
    assert (site.reporting, site.internet.compute, site.slurm.partition) == ("relay", False, "debug")


def test_time_is_capped_at_the_sites_limit():
    site = load_site("localhpc")
    assert sbatch(directives(site, TaskResources(time="02:00:00")))["time"] == "01:00:00"
    assert sbatch(directives(site, TaskResources(time="00:05:00")))["time"] == "00:05:00"


def test_account_qos_and_extra_directives_when_set():
    lumi = load_site("lumi")
    slurm = lumi.slurm.model_copy(update={"account": "project_465000123", "qos": "high",
                                          "extra_directives": ["--exclusive", "#SBATCH --mem=0"]})
    lines = directives(lumi.model_copy(update={"slurm": slurm}), TaskResources())
    got = sbatch(lines)
    assert got["account"] == "project_465000123" and got["qos"] == "high"
    assert got["exclusive"] == "" and got["mem"] == "0"


def test_resources_from_job_script():
    text = ("#!/bin/bash\n# maelflow nodes=2\n# maelflow gpus_per_node=4\n# maelflow time=02:00:00\n"
            "# maelflow colour=red\necho\n")
    assert TaskResources.from_script(text) == TaskResources(nodes=2, gpus_per_node=4, time="02:00:00")
    assert TaskResources.from_script("#!/bin/bash\n# maelflow builds this\n") == TaskResources()


@pytest.mark.parametrize("text,state", [
    ("12 PENDING None 0:00 30:00", "PENDING"),
    ("12 PENDING Priority 0:00 UNLIMITED", "PENDING"),
    ("12 CONFIGURING None 0:01 30:00", "PENDING"),
    ("12 RUNNING None 0:05 30:00", "RUNNING"),
    ("12 COMPLETING None 0:05 30:00", "RUNNING"),
    ("12 SUSPENDED None 0:05 30:00", "RUNNING"),
    ("12 COMPLETED None 0:01 UNLIMITED", "COMPLETED"),
    ("12             COMPLETED      0:0 ", "COMPLETED"),
    ("12 FAILED NonZeroExitCode 0:01 30:00", "FAILED"),
    ("12 OUT_OF_MEMORY None 0:01 30:00", "FAILED"),
    ("12 NODE_FAIL None 0:01 30:00", "FAILED"),
    ("12 CANCELLED by 0 0:0", "CANCELLED"),
    ("12 CANCELLED+ 0:0", "CANCELLED"),
    ("12 TIMEOUT TimeLimit 1:06 1:00", "TIMEOUT"),
    ("12 R", "RUNNING"),
    ("12 PD", "PENDING"),
    ("", "UNKNOWN"),
    ("slurm_load_jobs error: Invalid job id specified", "UNKNOWN"),
])
def test_parse_state(text, state):
    assert parse_state(text) == state


def test_job_id_regex_and_commands():
    s = Slurm()
    assert s.parse_job_id("Submitted batch job 4711\n") == "4711"
    assert s.parse_job_id("sbatch: error: invalid partition specified: gpu") is None
    assert s.parse_job_id("Submitted batch job 12 on cluster maelflow") == "12"
    assert "squeue -h -t all -j 7 -o '%i %T %r %M %l'" in s.poll_command("7")
    assert "sacct --completion -j 7" in s.poll_command("7")
    assert s.kill_command("7") == "scancel 7" and s.hard_kill_command("7") is None
    assert s.submit_command("fit job1", "/o/fit.1", "abc") == "sbatch 'fit job1'"
    assert s.find_command() == "squeue -h -t all -o '%i %k'"
    assert s.jobs_with_token("5 maelflow:abc\n6 maelflow:abd\n7 (null)\n", "abc") == ["5"]
    assert s.valid_job_id("7") and s.valid_job_id("7_3") and not s.valid_job_id("0")
    for bad in ("7; rm -rf ~", "", "abc"):
        with pytest.raises(ValueError):
            s.poll_command(bad)
        with pytest.raises(ValueError):
            s.kill_command(bad)


def test_what_a_slurm_job_reads_about_itself():
    s = Slurm()
    assert s.ENV.job_id == "SLURM_JOB_ID" and s.ENV.procid == "SLURM_PROCID"
    assert s.job_id_in({"SLURM_JOB_ID": "42"}) == "42" and s.job_id_in({}) is None
    assert s.rank_in({"SLURM_PROCID": "3"}) == 3 and s.rank_in({}) is None
    assert s.WARNING_SIGNAL == "USR1" and s.LAUNCH.startswith("srun ")


def test_directives_go_after_the_shebang():
    assert with_directives("#!/bin/bash\necho hi\n", ["#SBATCH --x"]) == "#!/bin/bash\n#SBATCH --x\necho hi\n"
    assert with_directives("echo hi\n", ["#SBATCH --x"]) == "#!/bin/bash\n#SBATCH --x\necho hi\n"
    assert with_directives("echo hi\n", []) == "echo hi\n"


def test_token_changes_with_each_submission():
    a = submission_token("demo/t.job1", "ECF_PASS=abc")
    assert a == submission_token("demo/t.job1", "ECF_PASS=abc")
    assert a != submission_token("demo/t.job1", "ECF_PASS=xyz")
    assert a != submission_token("demo/t.job2", "ECF_PASS=abc")


def test_local_ecf_home(tmp_path):
    out = tmp_path / "jobs" / "suites" / "demo"
    (out / "tasks").mkdir(parents=True)
    job = out / "jobs" / "demo" / "jobs" / "t.job1"   # a family called 'jobs' is not ECF_HOME
    assert local_ecf_home(job) == out / "jobs"
    assert local_ecf_home(tmp_path / "x" / "t.job1") == tmp_path / "x"


def test_dry_run_prints_and_connects_nowhere(tmp_path, capsys):
    site = load_site("leonardo")                 # a real, unreachable login node
    home = tmp_path / "jobs"
    (home / "demo" / "train").mkdir(parents=True)
    job = home / "demo" / "train" / "fit.job1"
    job.write_text("#!/bin/bash\n# maelflow gpus_per_node=4\necho training\n")
    from maelflow.sites.connections import connect

    runner = BatchRunner(connect("leonardo", site, dry_run=True), Slurm(), site_name="leonardo", site=site)
    handle = runner.submit(job, home / "demo" / "train" / "fit.1")
    root = site.paths.root
    assert handle.remote_job == f"{root}/jobs/demo/train/fit.job1"
    assert handle.remote_out == f"{root}/jobs/demo/train/fit.1"
    assert handle.kind == "slurm"
    assert runner.kill(JobHandle("leonardo", "42", "slurm"), None, {}) == "dry run"
    assert runner.status(JobHandle("leonardo", "42", "slurm"), None) == (True, "dry run")
    printed = capsys.readouterr().out
    assert "#SBATCH --gres=gpu:4" in printed and "#SBATCH --qos=normal" in printed
    assert f"cd {root}/jobs/demo/train && sbatch fit.job1" in printed
    assert "scancel 42" in printed and "squeue -h -t all -j 42" in printed


def test_runner_for_picks_the_sites_scheduler_or_local_processes(config_root):
    rx = load_experiment("demo", ["sites=[lumi]"], config_root=config_root)
    assert runner_for(rx, "lumi", dry_run=True).scheduler.name == "slurm"
    login = runner_for(rx, "lumi", where="login", dry_run=True)
    assert login.scheduler.name == "local" and not login.shares_files      # a process on lumi's login node
    beside = runner_for(rx, "lumi", where="local", dry_run=True)
    assert beside.scheduler.name == "local" and beside.shares_files        # a process beside the server
    assert type(runner_for(rx, "lumi", dry_run=True).connection) is type(login.connection)
    assert scheduler_named("slurm").name == "slurm"

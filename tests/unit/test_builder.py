"""Suite generation: structure, determinism, ecFlow's own checks, nothing written on failure."""

from __future__ import annotations

import filecmp

import ecflow
import pytest
from click.testing import CliRunner

from maelflow.cli.main import cli
from maelflow.config.loader import load_experiment
from maelflow.suite.builder import build_suite
from maelflow.workspace import Workspace

pytestmark = pytest.mark.unit


def _build(config_root, tmp_path, out="out", overrides=()):
    ws = Workspace(tmp_path / "ws")
    rx = load_experiment("demo", list(overrides), config_root=config_root,
                         placeholders={"workspace": str(ws.root)})
    return build_suite(rx, tmp_path / out, ws)


def test_structure_triggers_limits(config_root, tmp_path):
    built = _build(config_root, tmp_path, overrides=["sites=[local,lumi]"])
    defs = ecflow.Defs(str(built.def_file))
    suite = defs.find_suite("demo")
    assert {lim.name(): lim.limit() for lim in suite.limits} == {
        "local_jobs": 2, "local_transfers": 2, "lumi_jobs": 8, "lumi_transfers": 4}
    assert defs.find_abs_node("/demo/lumi/train").get_trigger().get_expression() == "data == complete"
    assert defs.find_abs_node("/demo/lumi/register").get_trigger().get_expression() == "train == complete"
    stage = defs.find_abs_node("/demo/lumi/data/synth_demo_local_5p0_2020_2020_6h_v1/stage")
    assert stage.get_trigger().get_expression() == "/demo/publish/synth_demo_local_5p0_2020_2020_6h_v1/publish == complete"
    assert [m.name() for m in stage.meters] == ["progress"]
    train = defs.find_abs_node("/demo/local/train/tiny/train")
    assert {e.name() for e in train.events} == {"checkpoint", "timeout"}
    assert {lab.name() for lab in train.labels} == {"info", "mlflow", "checkpoint"}
    assert defs.find_abs_node("/demo/lumi").find_variable("MAELFLOW_REPORT").value() == "relay"
    assert defs.check() == ""


def test_same_config_same_bytes(config_root, tmp_path):
    a = _build(config_root, tmp_path, "a")
    b1 = _build(config_root, tmp_path, "b")
    first = b1.def_file.read_bytes()
    b2 = _build(config_root, tmp_path, "b")
    assert b2.def_file.read_bytes() == first
    cmp = filecmp.dircmp(a.out_dir / "tasks", b2.out_dir / "tasks")
    assert not cmp.diff_files and not cmp.left_only and not cmp.right_only
    assert (a.out_dir / "experiment.json").read_bytes() == (b2.out_dir / "experiment.json").read_bytes()


def test_job_creation_resolves_site_include(config_root, tmp_path, monkeypatch):
    monkeypatch.setenv("MAELFLOW_KEEP_JOBCHECK", "1")
    built = _build(config_root, tmp_path, overrides=["sites=[lumi]", "datasets=[]", "trainings=[]"])
    assert built.def_file.exists()
    built = _build(config_root, tmp_path, overrides=["sites=[lumi]"])
    job = next((built.out_dir / ".jobcheck").rglob("stage.job*")).read_text()
    assert "module load LUMI/24.03 partition/G" in job
    assert "%" not in job.replace("%%", "")
    assert "task stage --dataset synth-demo-local-5p0-2020-2020-6h-v1 --site lumi" in job


def test_invalid_config_writes_nothing(config_root, tmp_path, monkeypatch):
    monkeypatch.setenv("MAELFLOW_CONFIG_DIR", str(config_root))
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["build", "demo", "site.local.limits.jobs=0", "-o", str(out),
                                      "--workspace", str(tmp_path / "ws")])
    assert result.exit_code == 2
    assert not out.exists()
    assert not list(tmp_path.glob(".out*"))


def test_failed_rebuild_keeps_previous_suite(config_root, tmp_path, monkeypatch):
    monkeypatch.setenv("MAELFLOW_CONFIG_DIR", str(config_root))
    out = tmp_path / "out"
    runner = CliRunner()
    ok = runner.invoke(cli, ["build", "demo", "-o", str(out), "--workspace", str(tmp_path / "ws")])
    assert ok.exit_code == 0, ok.output
    before = (out / "demo.def").read_bytes()
    (config_root / "tasks_broken").mkdir()
    monkeypatch.setenv("MAELFLOW_SUITES_DIR", str(tmp_path / "nosuchtemplates"))
    bad = runner.invoke(cli, ["build", "demo", "-o", str(out), "--workspace", str(tmp_path / "ws")])
    assert bad.exit_code != 0
    assert (out / "demo.def").read_bytes() == before


def test_gpu_training_job_asks_slurm_for_one_task_per_gpu(config_root, tmp_path, monkeypatch):
    from maelflow.sites.schedulers import TaskResources
    from maelflow.sites.schedulers.slurm import Slurm

    monkeypatch.setenv("MAELFLOW_KEEP_JOBCHECK", "1")
    built = _build(config_root, tmp_path, overrides=["sites=[lumi]", "trainings=[tiny]", "training.tiny.gpus_per_node=8",
                                                     "training.tiny.nodes=2"])
    job = next(p for p in (built.out_dir / ".jobcheck").rglob("train.job*") if "/tiny/" in str(p)).read_text()
    assert 'launch="srun --kill-on-bad-exit=1"' in job and "$(( 2 * 8 ))" in job
    lines = Slurm().directives(built_site(built), TaskResources.from_script(job))
    assert "#SBATCH --nodes=2" in lines and "#SBATCH --ntasks-per-node=8" in lines
    assert "#SBATCH --gpus-per-node=8" in lines and "#SBATCH --partition=standard-g" in lines


def built_site(built):
    import json

    from maelflow.config.loader import ResolvedExperiment

    return ResolvedExperiment.from_json(json.loads((built.out_dir / "experiment.json").read_text())).sites["lumi"]


@pytest.mark.parametrize("sites", ["[local]", "[local,localhpc]"])
def test_the_demo_starts_every_service_its_suite_tasks_use(config_root, tmp_path, sites):
    """`maelflow demo` on an empty workspace starts its own services: it must start what the
    suite's tasks talk to (the catalogue for locate/register, the relay for loopback-site jobs)."""
    from maelflow import demo
    from maelflow.suite.layout import FamilySpec, suite_layout

    ws = Workspace(tmp_path / "ws")
    site = {"hpc_port": "2222", "hpc_user": "maelhpc", "hpc_identity": str(tmp_path / "id"),
            "hpc_known_hosts": str(tmp_path / "known_hosts"), "hpc_home": str(tmp_path / "home"),
            "hpc_root": str(tmp_path / "home" / "root"), "maelflow": "maelflow"}   # as `services up --with-hpc` sets them
    rx = load_experiment("demo", [f"sites={sites}"], config_root=config_root,
                         placeholders={"workspace": str(ws.root), **site})

    def scripts(node):
        if isinstance(node, FamilySpec):
            for child in node.children:
                yield from scripts(child)
        else:
            yield node.script
    found = set()
    for child in suite_layout(rx, {}).children:
        found |= set(scripts(child))
    needed = {demo.TASK_SERVICES[s] for s in found if s in demo.TASK_SERVICES}
    assert {"s3", "mlflow", "catalogue"} <= needed
    started = set(demo.services_needed(rx))
    assert needed <= started
    assert ("relay" in started) == ("localhpc" in sites)


def test_benchmark_mode_repeats_every_training_on_every_site_then_reports(config_root, tmp_path, monkeypatch):
    monkeypatch.setenv("MAELFLOW_KEEP_JOBCHECK", "1")
    built = _build(config_root, tmp_path, overrides=[
        "sites=[local,lumi]", "+benchmark.repeats=2", "+benchmark.trainings=[tiny]",
        "+benchmark.baseline=quarterly", "+benchmark.cron='-m 1,4,7,10 -d 1 03:00'"])
    defs = ecflow.Defs(str(built.def_file))
    assert defs.check() == ""
    node = defs.find_abs_node
    # the benchmarked training runs in the benchmark family only; the other one as before
    assert node("/demo/local/train/tiny") is None and node("/demo/local/train/tiny_anemoi") is not None
    bench = node("/demo/benchmark")
    assert bench.find_variable("MAELFLOW_BENCHMARK").value() == "demo"
    assert [str(c) for c in bench.crons] == ["cron -d 1 -m 1,4,7,10 03:00"]
    for site in ("local", "lumi"):
        fam = node(f"/demo/benchmark/{site}")
        # staging first: never inside what is timed
        assert fam.get_trigger().get_expression() == f"/demo/{site}/data == complete"
        assert [i.name() for i in fam.inlimits] == [f"{site}_jobs"]
        assert fam.find_variable("SITE").value() == site
        assert node(f"/demo/benchmark/{site}/tiny/r1").get_trigger() is None
        r2 = node(f"/demo/benchmark/{site}/tiny/r2")
        assert r2.get_trigger().get_expression() == "r1 == complete"   # repeats one after another
        assert r2.find_variable("MAELFLOW_REPEAT").value() == "2"
        assert node(f"/demo/benchmark/{site}/tiny/r3") is None
        assert node(f"/demo/benchmark/{site}/tiny/r2/sync").get_trigger().get_expression() == "train == complete"
    assert node("/demo/benchmark/lumi").find_variable("MAELFLOW_REPORT").value() == "relay"
    report = node("/demo/benchmark/report")
    assert report.get_trigger().get_expression() == "local == complete and lumi == complete"
    assert {lab.name() for lab in report.labels} == {"info", "report", "headline", "catalogue"}
    assert report.find_variable("MAELFLOW_RUNNER").value() == "local"   # beside the server
    job = next((built.out_dir / ".jobcheck").rglob("report.job*")).read_text()
    assert "task benchmark_report" in job and "MAELFLOW_BENCHMARK=demo" in job
    # the job check keeps one task per site and script: with only the benchmarked training, its repeat's
    built = _build(config_root, tmp_path, "only",
                   overrides=["sites=[lumi]", "trainings=[tiny]", "+benchmark.repeats=2"])
    train = next((built.out_dir / ".jobcheck").rglob("train.job*"))
    assert "/benchmark/lumi/tiny/r1/" in str(train)
    assert "MAELFLOW_REPEAT=1" in train.read_text() and "module load LUMI" in train.read_text()


def test_benchmark_section_is_checked(config_root, tmp_path):
    from maelflow.config.errors import ConfigError

    for bad in ("+benchmark.trainings=[nosuch]", "+benchmark.repeats=0", "+benchmark.cron=whenever",
                "+benchmark.repeat=2"):
        with pytest.raises(ConfigError) as exc:
            _build(config_root, tmp_path, overrides=[bad])
        assert "benchmark" in str(exc.value), (bad, str(exc.value))

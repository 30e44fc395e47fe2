"""``maelflow benchmark report`` on runs in a file-based MLflow store: runs made by the real timing
callback (driven by a fake clock, so their figures are known), the table and files it writes, the
baseline check failing on a deliberately slower run, and every kind of bad input."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner

from maelflow.cli.main import cli
from maelflow.reports import benchmark as bm
from maelflow.training.timing import MlflowSink, TimingCallback

pytestmark = pytest.mark.unit
MS = 1_000_000


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("COLUMNS", "200")   # rich's tables unwrapped
    from mlflow import MlflowClient

    uri = (tmp_path / "mlruns").as_uri()
    return uri, MlflowClient(uri)


def make_run(client, experiment: str, training: str, site: str, *, fwd: float, io: float = 2.0, steps: int = 20,
             batch_size: int = 8, rss: int | None = None, tags: dict | None = None, timing: bool = True) -> str:
    """A run as a training leaves it: the timing callback's metrics, tags and artifact (fake clock)."""
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(experiment)
    run = client.create_run(exp_id, run_name=training,
                            tags={"maelflow.training": training, "maelflow.site": site, **(tags or {})})
    rid = run.info.run_id
    if timing:
        now = [0]
        clock = lambda: now[0]  # noqa: E731
        cb = TimingCallback(warmup_steps=2, sample_every=5, energy=False, clock=clock,
                            sink_factory=lambda t: MlflowSink(client, rid))
        loop = SimpleNamespace(_on_before_fetch=lambda: None)
        trainer = SimpleNamespace(global_step=0, world_size=1, is_global_zero=True, current_epoch=0, callbacks=[],
                                  loggers=[], sanity_checking=False, state=SimpleNamespace(fn="fit"),
                                  fit_loop=SimpleNamespace(epoch_loop=loop), strategy=SimpleNamespace(),
                                  save_checkpoint=lambda *a: None)
        cb.on_train_start(trainer, None)
        cb.on_train_epoch_start(trainer, None)
        for i in range(steps):
            loop._on_before_fetch()
            now[0] += int(io * MS)
            cb.on_train_batch_start(trainer, None, torch.zeros(batch_size, 2), i)
            now[0] += int(fwd * MS) + (i % 3) * MS // 10          # a little spread
            cb.on_before_backward(trainer, None, None)
            now[0] += int(2 * fwd * MS)
            cb.on_after_backward(trainer, None)
            cb.on_before_optimizer_step(trainer, None, None)
            now[0] += MS
            cb.on_train_batch_end(trainer, None, None, None, i)
            trainer.global_step += 1
        cb.on_train_epoch_end(trainer, None)
        cb.on_train_end(trainer, None)
        if rss is not None:   # a known peak memory instead of this test process's
            client.log_metric(rid, "memory/peak_rss_bytes", rss, step=trainer.global_step + 1)
    else:
        client.log_metric(rid, "train_loss", 0.5)
    client.set_terminated(rid)
    return rid


def invoke(uri: str, *args: str):
    return CliRunner().invoke(cli, ["benchmark", "report", "--tracking-uri", uri, *args], catch_exceptions=False)


def test_two_sites_two_repeats_table_and_files(store, tmp_path):
    uri, client = store
    runs = {(site, r): make_run(client, "demo", "tiny", site, fwd=f, rss=500 * 2**20)
            for site, f in (("local", 4.0), ("localhpc", 6.0)) for r in range(2)}
    make_run(client, "demo", "old", "local", fwd=1, timing=False)          # trained before timing: skipped
    out = tmp_path / "report"
    res = invoke(uri, "demo", "--output", str(out))
    assert res.exit_code == 0, res.output
    for row in ("epoch", "batch", "forward", "backward", "optimizer", "IO (data loading)"):
        assert row in res.output
    assert "skipped" in res.output and "no timing metrics" in res.output
    assert res.output.count("unavailable") >= 4 and "no energy recorded" in res.output
    files = {p.name for p in out.iterdir()}
    assert {"report.md", "timing.csv", "runs.csv", "index.html", "step_times.png", "breakdown.png"} <= files
    assert all((out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for name in files if name.endswith(".png"))
    # the CSV carries each run's statistics as the callback logged them
    rows = list(csv.DictReader(io.StringIO((out / "timing.csv").read_text())))
    for (site, _), rid in runs.items():
        logged = client.get_run(rid).data.metrics
        mine = {r["category"]: r for r in rows if r["run_id"] == rid}
        assert set(mine) >= {"batch", "forward", "backward", "optimizer", "data_loading", "epoch"}
        for cat in ("batch", "forward", "data_loading"):
            for stat in ("min", "mean", "median", "p95", "max", "stdev"):
                assert float(mine[cat][f"{stat}_s"]) == pytest.approx(logged[f"timing/{cat}/{stat}"])
        assert int(mine["batch"]["count"]) == 18 and mine["batch"]["site"] == site
    summary = {r["run_id"]: r for r in csv.DictReader(io.StringIO((out / "runs.csv").read_text()))}
    assert set(summary) == set(runs.values())
    for rid in runs.values():
        assert float(summary[rid]["samples_per_s"]) == pytest.approx(client.get_run(rid).data.metrics[
            "timing/samples_per_s"])
    md = (out / "report.md").read_text()
    assert "| IO (data loading) |" in md and "![step_times.png](step_times.png)" in md
    html = (out / "index.html").read_text()
    assert "<img src='breakdown.png'" in html and "localhpc" in html


def test_the_baseline_check_fails_on_a_deliberately_slower_run(store, tmp_path):
    uri, client = store
    base = make_run(client, "demo", "tiny", "local", fwd=4.0, rss=500 * 2**20)
    same = make_run(client, "demo", "tiny", "local", fwd=4.0, rss=500 * 2**20)
    res = invoke(uri, "--run", same, "--baseline", base, "--output", str(tmp_path / "ok"))
    assert res.exit_code == 0, res.output
    assert "ok" in res.output and "REGRESSION" not in res.output

    slow = make_run(client, "demo", "tiny", "local", fwd=6.0, rss=500 * 2**20)   # a step 1.5x as long
    res = invoke(uri, "--run", slow, "--baseline", base, "--output", str(tmp_path / "bad"))
    assert res.exit_code == 1, res.output
    assert "REGRESSION" in res.output and "throughput" in res.output and "1 regression(s)" in res.output
    assert "REGRESSION" in (tmp_path / "bad" / "report.md").read_text()      # the report is written anyway
    # a looser tolerance lets it pass
    assert invoke(uri, "--run", slow, "--baseline", base, "--tolerance", "0.5").exit_code == 0

    fat = make_run(client, "demo", "tiny", "local", fwd=4.0, rss=int(500 * 2**20 * 1.02))   # +2% memory
    res = invoke(uri, "--run", fat, "--baseline", base)
    assert res.exit_code == 1 and "peak memory (RSS)" in res.output and "REGRESSION" in res.output
    slightly = make_run(client, "demo", "tiny", "local", fwd=4.0, rss=int(500 * 2**20 * 1.005))
    assert invoke(uri, "--run", slightly, "--baseline", base).exit_code == 0


def test_baselines_by_tag(store):
    uri, client = store
    make_run(client, "nightly", "tiny", "local", fwd=4.0, tags={"maelflow.baseline": "v1"})
    make_run(client, "nightly", "tiny", "local", fwd=4.2, tags={"maelflow.baseline": "v1"})
    make_run(client, "nightly", "tiny", "leonardo", fwd=2.0, tags={"release": "2027.1"})
    make_run(client, "today", "tiny", "local", fwd=6.0)
    res = invoke(uri, "today", "--baseline", "v1")
    assert res.exit_code == 1 and "baseline v1: 2 run(s)" in res.output
    res = invoke(uri, "today", "--baseline", "release=2027.1", "--tolerance", "0.9")
    assert res.exit_code == 0, res.output
    rep = bm.load_runs(client, ["today"], [], uri, with_steps=False)
    rep.baseline_spec = "v1"
    bm.compare(rep, bm.resolve_baseline(client, "v1", rep))
    (finding,) = [f for f in rep.findings if f.what == "throughput"]
    base_runs = client.search_runs([client.get_experiment_by_name("nightly").experiment_id],
                                   filter_string="tags.`maelflow.baseline` = 'v1'")
    expected = sorted(r.data.metrics["timing/samples_per_s"] for r in base_runs)
    assert finding.baseline == pytest.approx(sum(expected) / 2) and finding.regression


@pytest.mark.parametrize("args,needle", [
    (["nosuch"], "unknown experiment 'nosuch'"),
    (["--run", "0" * 32], f"unknown run '{'0' * 32}'"),
    (["untimed"], "experiment 'untimed': none of its 1 run(s) has timing metrics"),
    (["demo", "--baseline", "f" * 32], f"unknown baseline run '{'f' * 32}'"),
    (["demo", "--baseline", "nosuchtag"], "baseline 'nosuchtag' not found"),
    (["demo", "--baseline", "site=nowhere"], "baseline 'site=nowhere' not found"),
    ([], "name at least one experiment or --run"),
])
def test_bad_input_names_what_is_wrong_and_writes_nothing(store, tmp_path, args, needle):
    uri, client = store
    make_run(client, "demo", "tiny", "local", fwd=4.0)
    make_run(client, "untimed", "tiny", "local", fwd=4.0, timing=False)
    out = tmp_path / "out"
    res = invoke(uri, *args, "--output", str(out))
    assert res.exit_code == 2, res.output
    assert needle in " ".join(res.output.split())
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_a_run_without_timing_named_by_id(store):
    uri, client = store
    rid = make_run(client, "demo", "tiny", "local", fwd=4.0, timing=False)
    res = invoke(uri, "--run", rid)
    assert res.exit_code == 2 and f"run {rid} (tiny) has no timing metrics" in " ".join(res.output.split())


def test_output_is_replaced_whole_or_not_at_all(store, tmp_path, monkeypatch):
    uri, client = store
    make_run(client, "demo", "tiny", "local", fwd=4.0)
    out = tmp_path / "out"
    assert invoke(uri, "demo", "--output", str(out)).exit_code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def broken_plot(report, folder):
        (folder / "step_times.png").write_bytes(b"half")
        raise RuntimeError("disk full")

    monkeypatch.setattr(bm, "plot", broken_plot)
    with pytest.raises(RuntimeError, match="disk full"):
        invoke(uri, "demo", "--output", str(out))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before            # the earlier report, intact
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []
    # a folder holding anything else is never replaced
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("precious")
    res = invoke(uri, "demo", "--output", str(mine))
    assert res.exit_code == 2 and "not a benchmark report" in " ".join(res.output.split())
    assert (mine / "thesis.tex").read_text() == "precious" and len(list(mine.iterdir())) == 1


def test_the_workspace_without_mlflow_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    res = CliRunner().invoke(cli, ["benchmark", "report", "demo", "--workspace", str(tmp_path / "ws")])
    assert res.exit_code == 2 and "no MLflow server to read" in res.output and "--tracking-uri" in res.output


def test_distributions_come_from_every_step(store):
    uri, client = store
    rid = make_run(client, "demo", "tiny", "local", fwd=4.0, steps=30)
    rep = bm.load_runs(client, ["demo"], [], uri)
    (rt,) = rep.runs
    assert rt.run_id == rid and len(rt.steps) == 28                       # warm-up left out
    assert min(rt.steps) == pytest.approx(rt.stats["batch"]["min"]) and max(rt.steps) == pytest.approx(
        rt.stats["batch"]["max"])
    # without the artifact: the sampled metric (every 5th step)
    artifacts = Path(client.get_run(rid).info.artifact_uri.removeprefix("file://")) / "maelflow" / "timing.json"
    artifacts.unlink()
    rep = bm.load_runs(client, ["demo"], [], uri)
    sampled = [step for step in range(3, 31) if step % 5 == 0]             # measured steps 3..30, every 5th
    assert len(rep.runs[0].steps) == len(client.get_metric_history(rid, "timing/step/batch_s")) == len(sampled)

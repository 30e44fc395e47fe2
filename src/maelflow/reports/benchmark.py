"""The benchmark comparison: trainings × sites × runs from their MLflow runs, as MAELSTROM laid it out.

Why: the timing callback (:mod:`maelflow.training.timing`) leaves the same numbers in every run;
this turns a set of runs (the runs of one or more MLflow experiments, and runs named by id) into
the comparison a scientist or a CI gate reads: per run a table whose rows are the categories (epoch,
batch, forward, backward, optimizer, IO = data loading, communication, and their GPU variants) and
whose columns are min/mean/median/max/stdev (MAELSTROM D2.6's layout), plus samples per second,
time-to-train, the data-loading share, peak memory and energy with its quality.

Outputs, all written into a temporary folder beside ``--output`` and renamed into place at the end,
so a failure leaves the previous report or nothing, never half of one: ``report.md``,
``timing.csv`` (one row per run and category), ``runs.csv`` (one row per run), ``index.html`` and
the plots ``step_times.png`` (per-step batch time distributions, grouped by site) and
``breakdown.png`` (the mean step split into data loading, forward, backward, optimizer and the
rest) and ``throughput.png``.

A baseline (a run id, ``KEY=VALUE`` for the runs with that tag, or a bare ``NAME`` for the runs
tagged ``maelflow.baseline=NAME``) turns it into a regression check: a run whose throughput is
more than ``tolerance`` (10%) below the baseline's for the same training and site, or whose peak
memory (GPU where both have it, else RSS) is more than ``memory_tolerance`` (1%) above it, is a
finding, and the command exits non-zero.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import os
import re
import shutil
import statistics
import tempfile
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

from maelflow.errors import ConfigurationError

ROWS = (("epoch", "epoch"), ("batch", "batch"), ("forward", "forward"), ("backward", "backward"),
        ("optimizer", "optimizer"), ("IO (data loading)", "data_loading"), ("communication", "communication"),
        ("validation", "validation"), ("checkpoint", "checkpoint"),
        ("GPU batch", "gpu_batch"), ("GPU forward", "gpu_forward"), ("GPU backward", "gpu_backward"),
        ("GPU optimizer", "gpu_optimizer"), ("GPU communication", "gpu_communication"))
COLUMNS = ("min", "mean", "median", "max", "stdev")
MARKER = ".maelflow-benchmark-report"
BASELINE_TAG = "maelflow.baseline"
TIMING_KEY = "timing/batch/count"
RUN_ID = re.compile(r"[0-9a-f]{32}")


class BenchmarkInputError(ConfigurationError):
    """An experiment, run or baseline that cannot be compared: nothing was written."""


@dataclass
class RunTiming:
    run_id: str
    name: str
    experiment: str
    training: str
    site: str
    start_time: int
    stats: dict[str, dict[str, float]]
    metrics: dict[str, float]
    tags: dict[str, str]
    steps: list[float] = field(default_factory=list)   # per-step batch time, seconds

    @property
    def label(self) -> str:
        return f"{self.training} @ {self.site} · {self.run_id[:8]}"

    def metric(self, key: str) -> float | None:
        return self.metrics.get(key)

    @property
    def samples_per_s(self) -> float | None:
        return self.metric("timing/samples_per_s")

    @property
    def peak_memory(self) -> tuple[str, float] | None:
        for key, name in (("memory/peak_gpu_bytes", "GPU"), ("memory/peak_rss_bytes", "RSS")):
            if key in self.metrics:
                return name, self.metrics[key]
        return None

    @property
    def energy(self) -> tuple[str, float | None, str, str]:
        """(quality, joules, method, reason)."""
        quality = self.tags.get("energy_quality", "unavailable")
        reason = self.tags.get("energy_reason", "" if "energy_quality" in self.tags else "no energy recorded")
        return quality, self.metrics.get("energy/total_j"), self.tags.get("energy_method", "none"), reason


@dataclass
class Finding:
    run: RunTiming
    what: str            # throughput | peak memory
    value: float
    baseline: float
    limit: float
    regression: bool

    @property
    def change(self) -> float:
        return self.value / self.baseline - 1 if self.baseline else 0.0


@dataclass
class Report:
    tracking_uri: str
    runs: list[RunTiming]
    skipped: list[str] = field(default_factory=list)
    baseline_spec: str | None = None
    baseline: list[RunTiming] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    unmatched: list[str] = field(default_factory=list)
    generated: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))

    @property
    def regressions(self) -> list[Finding]:
        return [f for f in self.findings if f.regression]


# -------------------------------------------------------------------------------- reading
def _stats(metrics: dict[str, float]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        parts = key.split("/")
        if len(parts) == 3 and parts[0] == "timing" and parts[1] != "step":
            out.setdefault(parts[1], {})[parts[2]] = value
    return out


def _timing_of(client: Any, run: Any, experiment: str) -> RunTiming:
    tags = dict(run.data.tags)
    return RunTiming(run_id=run.info.run_id, name=run.info.run_name or tags.get("mlflow.runName", ""),
                     experiment=experiment,
                     training=tags.get("maelflow.training") or run.info.run_name or "?",
                     site=tags.get("maelflow.site", "?"), start_time=int(run.info.start_time or 0),
                     stats=_stats(dict(run.data.metrics)), metrics=dict(run.data.metrics), tags=tags)


def _load_steps(client: Any, rt: RunTiming) -> None:
    """Every step's batch time from the run's ``maelflow/timing.json``, else the sampled metric."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = client.download_artifacts(rt.run_id, "maelflow/timing.json", tmp)
            data = json.loads(Path(path).read_text())
        rt.steps = [v / 1e6 for v in data.get("steps", {}).get("batch", [])]
    except Exception:  # noqa: BLE001 - an artifact store that is not reachable: the metric history
        rt.steps = []
    if not rt.steps:
        try:
            rt.steps = [m.value for m in client.get_metric_history(rt.run_id, "timing/step/batch_s")]
        except Exception:  # noqa: BLE001
            rt.steps = []


def _not_found(exc: Exception) -> bool:
    return "RESOURCE_DOES_NOT_EXIST" in str(getattr(exc, "error_code", "")) or "not found" in str(exc).lower() \
        or "does not exist" in str(exc).lower()


def load_runs(client: Any, experiments: Iterable[str], run_ids: Iterable[str], tracking_uri: str,
              with_steps: bool = True) -> Report:
    """The runs with timing of each experiment (by MLflow experiment name) and each run id."""
    experiments, run_ids = list(experiments), list(run_ids)
    if not experiments and not run_ids:
        raise BenchmarkInputError("name at least one experiment or --run")
    runs: list[RunTiming] = []
    skipped: list[str] = []
    exp_names: dict[str, str] = {}
    for name in experiments:
        exp = client.get_experiment_by_name(name)
        if exp is None:
            known = sorted(e.name for e in client.search_experiments(max_results=200))
            raise BenchmarkInputError(f"unknown experiment {name!r} at {tracking_uri}"
                                      + (f" (known: {', '.join(known)})" if known else " (it has no experiment)"))
        exp_names[exp.experiment_id] = name
        found = client.search_runs([exp.experiment_id], max_results=5000, order_by=["attributes.start_time ASC"])
        timed = [r for r in found if TIMING_KEY in r.data.metrics]
        if not timed:
            raise BenchmarkInputError(f"experiment {name!r}: none of its {len(found)} run(s) has timing metrics "
                                      f"({TIMING_KEY}); were they trained before maelflow recorded timing, or "
                                      "with MAELFLOW_TIMING=0?")
        skipped += [f"{name}/{r.info.run_name or r.info.run_id} ({r.info.run_id[:8]}): no timing metrics"
                    for r in found if TIMING_KEY not in r.data.metrics]
        runs += [_timing_of(client, r, name) for r in timed]
    seen = {r.run_id for r in runs}
    for run_id in run_ids:
        run = _get_run(client, run_id, "run")
        if TIMING_KEY not in run.data.metrics:
            raise BenchmarkInputError(f"run {run_id} ({run.info.run_name}) has no timing metrics ({TIMING_KEY})")
        if run.info.run_id in seen:
            continue
        exp = exp_names.get(run.info.experiment_id) or client.get_experiment(run.info.experiment_id).name
        runs.append(_timing_of(client, run, exp))
        seen.add(run.info.run_id)
    if with_steps:
        for rt in runs:
            _load_steps(client, rt)
    return Report(tracking_uri, runs, skipped)


def _get_run(client: Any, run_id: str, what: str) -> Any:
    try:
        return client.get_run(run_id)
    except Exception as exc:  # noqa: BLE001 - MlflowException: RESOURCE_DOES_NOT_EXIST, or a malformed id
        if _not_found(exc) or "INVALID_PARAMETER_VALUE" in str(getattr(exc, "error_code", "")):
            raise BenchmarkInputError(f"unknown {what} {run_id!r}: no such MLflow run") from None
        raise


# -------------------------------------------------------------------------------- baseline
def resolve_baseline(client: Any, spec: str, report: Report) -> list[RunTiming]:
    """A run id; ``KEY=VALUE``: the runs with that tag; ``NAME``: the runs tagged maelflow.baseline=NAME.
    Tags are looked for in the report's experiments first, then in every experiment."""
    if RUN_ID.fullmatch(spec):
        run = _get_run(client, spec, "baseline run")
        if TIMING_KEY not in run.data.metrics:
            raise BenchmarkInputError(f"baseline run {spec} ({run.info.run_name}) has no timing metrics")
        rt = _timing_of(client, run, client.get_experiment(run.info.experiment_id).name)
        return [rt]
    key, value = spec.split("=", 1) if "=" in spec else (BASELINE_TAG, spec)
    if not key or not value or "'" in key + value:
        raise BenchmarkInputError(f"baseline {spec!r}: give a run id, KEY=VALUE or a baseline name")
    flt = f"tags.`{key}` = '{value}'"
    by_name = {r.experiment for r in report.runs}
    scopes = [[e.experiment_id for e in client.search_experiments(max_results=1000) if e.name in by_name]]
    scopes.append([e.experiment_id for e in client.search_experiments(max_results=1000)])
    for ids in scopes:
        if not ids:
            continue
        found = [r for r in client.search_runs(ids, filter_string=flt, max_results=1000)
                 if TIMING_KEY in r.data.metrics]
        if found:
            names = {e.experiment_id: e.name for e in client.search_experiments(max_results=1000)}
            return [_timing_of(client, r, names.get(r.info.experiment_id, "?")) for r in found]
    raise BenchmarkInputError(f"baseline {spec!r} not found: no run with that id and no run with timing tagged "
                              f"{key}={value} at {report.tracking_uri}")


def compare(report: Report, baseline: list[RunTiming], tolerance: float = 0.10,
            memory_tolerance: float = 0.01) -> None:
    """Each run against the baseline runs of the same training and site (else the same training;
    else, with a single baseline run, that run): throughput and peak memory."""
    report.baseline = baseline
    base_ids = {b.run_id for b in baseline}

    def pick(rt: RunTiming) -> list[RunTiming]:
        same = [b for b in baseline if (b.training, b.site) == (rt.training, rt.site)]
        if same:
            return same
        same = [b for b in baseline if b.training == rt.training]
        return same or (baseline if len(baseline) == 1 else [])

    for rt in report.runs:
        if rt.run_id in base_ids:
            continue
        bases = pick(rt)
        if not bases:
            report.unmatched.append(f"{rt.label}: no baseline run of training {rt.training!r}")
            continue
        tput = [b.samples_per_s for b in bases if b.samples_per_s]
        if rt.samples_per_s and tput:
            ref = statistics.median(tput)
            limit = ref * (1 - tolerance)
            report.findings.append(Finding(rt, "throughput", rt.samples_per_s, ref, limit, rt.samples_per_s < limit))
        mine = rt.peak_memory
        if mine:
            refs = [b.peak_memory for b in bases if b.peak_memory and b.peak_memory[0] == mine[0]]
            if refs:
                ref = statistics.median(v for _, v in refs)
                limit = ref * (1 + memory_tolerance)
                report.findings.append(Finding(rt, f"peak memory ({mine[0]})", mine[1], ref, limit, mine[1] > limit))
    if not report.findings:
        raise BenchmarkInputError(f"baseline {report.baseline_spec!r} matches none of the runs compared "
                                  f"(baseline trainings: {', '.join(sorted({b.training for b in baseline}))}; "
                                  f"runs: {', '.join(sorted({r.training for r in report.runs}))})")


# -------------------------------------------------------------------------------- formatting
def fmt_s(value: float | None) -> str:
    if value is None:
        return "-"
    if value >= 100:
        return f"{value:.0f} s"
    if value >= 1:
        return f"{value:.2f} s"
    if value >= 1e-3:
        return f"{value * 1e3:.2f} ms"
    return f"{value * 1e6:.1f} µs"


def fmt_bytes(value: float | None) -> str:
    if value is None:
        return "-"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if value >= size:
            return f"{value / size:.2f} {unit}"
    return f"{value:.0f} B"


def summary_rows(report: Report) -> list[dict[str, str]]:
    rows = []
    for rt in report.runs:
        quality, joules, method, reason = rt.energy
        mem = rt.peak_memory
        rows.append({
            "experiment": rt.experiment, "training": rt.training, "site": rt.site, "run": rt.run_id,
            "steps": f"{rt.metric('timing/batch/count') or 0:.0f}",
            "samples/s": f"{rt.samples_per_s:.1f}" if rt.samples_per_s else "-",
            "time-to-train": fmt_s(rt.metric("timing/time_to_train_s")),
            "IO share": f"{rt.metric('timing/data_loading_share'):.1%}"
            if rt.metric("timing/data_loading_share") is not None else "-",
            "peak memory": f"{fmt_bytes(mem[1])} {mem[0]}" if mem else "-",
            "energy": f"{joules:.0f} J" if joules is not None else "-",
            "energy quality": quality, "energy method": method, "energy reason": reason,
        })
    return rows


def category_rows(rt: RunTiming) -> list[tuple[str, dict[str, float]]]:
    return [(label, rt.stats[key]) for label, key in ROWS if key in rt.stats and rt.stats[key].get("count")]


# ------------------------------------------------------------------ per application, sites as columns
SKILL_KEY = "skill_vs_baseline"   # logged by the MAELSTROM applications (maelflow.apps)


@dataclass
class ApplicationTable:
    """One application (training) across sites, as MAELSTROM's deliverable tables lay it out: a row
    per timing category (the mean per step; per epoch for epoch), then throughput, time-to-train,
    IO share, peak memory, energy and skill; a column per site. A site with several runs shows the
    median over them."""

    training: str
    sites: list[str]
    rows: list[tuple[str, list[str]]]
    runs: dict[str, list[RunTiming]]


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def application_tables(report: Report) -> list[ApplicationTable]:
    by_training: dict[str, dict[str, list[RunTiming]]] = {}
    for rt in report.runs:
        by_training.setdefault(rt.training, {}).setdefault(rt.site, []).append(rt)
    tables = []
    for training in sorted(by_training):
        runs = by_training[training]
        sites = sorted(runs)
        rows: list[tuple[str, list[str]]] = [("runs", [str(len(runs[s])) for s in sites])]
        for label, key in ROWS:
            means = [_median([r.stats[key]["mean"] for r in runs[s] if r.stats.get(key, {}).get("count")
                              and r.stats[key].get("mean") is not None]) for s in sites]
            if any(v is not None for v in means):
                rows.append((label, [fmt_s(v) for v in means]))

        def per_site(value) -> list[float | None]:
            return [_median([v for v in (value(r) for r in runs[s]) if v is not None]) for s in sites]

        tput = per_site(lambda r: r.samples_per_s)
        rows.append(("samples/s", [f"{v:.1f}" if v is not None else "-" for v in tput]))
        rows.append(("time-to-train", [fmt_s(v) for v in per_site(lambda r: r.metric("timing/time_to_train_s"))]))
        share = per_site(lambda r: r.metric("timing/data_loading_share"))
        rows.append(("IO share", [f"{v:.1%}" if v is not None else "-" for v in share]))
        mem = []
        for s in sites:
            kinds = {r.peak_memory[0] for r in runs[s] if r.peak_memory}
            value = _median([r.peak_memory[1] for r in runs[s] if r.peak_memory])
            mem.append(f"{fmt_bytes(value)} {'/'.join(sorted(kinds))}" if value is not None else "-")
        rows.append(("peak memory", mem))
        energy = per_site(lambda r: r.energy[1])
        rows.append(("energy", [f"{v:.0f} J" if v is not None else "/".join(sorted({r.energy[0] for r in runs[s]}))
                                for v, s in zip(energy, sites)]))
        skill = per_site(lambda r: r.metric(SKILL_KEY))
        if any(v is not None for v in skill):
            rows.append(("skill vs baseline", [f"{v:.3f}" if v is not None else "-" for v in skill]))
        tables.append(ApplicationTable(training, sites, rows, runs))
    return tables


APPLICATIONS_NOTE = ("One table per application (training), one column per site: the mean time per step of each "
                     "category (per epoch for epoch), warm-up excluded; a site with several runs shows the median "
                     "over them.")


def applications_markdown(report: Report) -> list[str]:
    out = ["", "## Applications", "", APPLICATIONS_NOTE]
    for table in application_tables(report):
        out += ["", f"### {table.training}", "", "| | " + " | ".join(table.sites) + " |",
                "| --- |" + " ---: |" * len(table.sites)]
        out += [f"| {label} | " + " | ".join(cells) + " |" for label, cells in table.rows]
    return out


def applications_html(report: Report) -> list[str]:
    e = html.escape
    parts = [f"<h2>Applications</h2><p>{e(APPLICATIONS_NOTE)}</p>"]
    for table in application_tables(report):
        parts.append(f"<h3>{e(table.training)}</h3><table><tr><th></th>"
                     + "".join(f"<th>{e(s)}</th>" for s in table.sites) + "</tr>")
        for label, cells in table.rows:
            parts.append(f"<tr><td>{e(label)}</td>" + "".join(f"<td class='n'>{e(c)}</td>" for c in cells) + "</tr>")
        parts.append("</table>")
    return parts


def applications_csv(report: Report) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["training", "row", "site", "value"])
    for table in application_tables(report):
        for label, cells in table.rows:
            for site, cell in zip(table.sites, cells):
                w.writerow([table.training, label, site, cell])
    return buf.getvalue()


def render_applications(report: Report, console: Any) -> None:
    from rich.table import Table

    for t in application_tables(report):
        table = Table(title=f"application {t.training}", title_justify="left")
        table.add_column("")
        for site in t.sites:
            table.add_column(site, justify="right")
        for label, cells in t.rows:
            table.add_row(label, *cells)
        console.print(table)


def render_terminal(report: Report, console: Any) -> None:
    from rich.table import Table

    for rt in report.runs:
        table = Table(title=f"{rt.experiment}: {rt.label}", title_justify="left")
        table.add_column("")
        for col in COLUMNS:
            table.add_column(col, justify="right")
        table.add_column("n", justify="right")
        for label, stats in category_rows(rt):
            table.add_row(label, *[fmt_s(stats.get(c)) for c in COLUMNS], f"{stats.get('count', 0):.0f}")
        console.print(table)
    summary = Table(title="runs", title_justify="left")
    keys = ["training", "site", "run", "steps", "samples/s", "time-to-train", "IO share", "peak memory", "energy",
            "energy quality"]
    for key in keys:
        summary.add_column(key, justify="right" if key in ("steps", "samples/s", "energy") else "left")
    for row in summary_rows(report):
        summary.add_row(*[row[k][:8] if k == "run" else row[k] for k in keys])
    console.print(summary)
    render_applications(report, console)
    by_reason: dict[str, list[str]] = {}
    for r in summary_rows(report):
        if r["energy reason"]:
            by_reason.setdefault(r["energy reason"], []).append(f"{r['site']}/{r['run'][:8]}")
    for reason, where in by_reason.items():
        console.print(f"[dim]energy not measured ({', '.join(where)}): {reason}[/]", highlight=False)
    for line in report.skipped:
        console.print(f"[yellow]skipped[/] {line}", highlight=False)
    render_findings(report, console)


def finding_text(f: Finding) -> str:
    if f.what == "throughput":
        return (f"{f.run.label}: throughput {f.value:.1f} samples/s vs baseline {f.baseline:.1f} "
                f"({f.change:+.1%}; limit {f.limit:.1f})")
    return (f"{f.run.label}: {f.what} {fmt_bytes(f.value)} vs baseline {fmt_bytes(f.baseline)} "
            f"({f.change:+.2%}; limit {fmt_bytes(f.limit)})")


def render_findings(report: Report, console: Any) -> None:
    if not report.baseline_spec:
        return
    console.print(f"baseline {report.baseline_spec}: {len(report.baseline)} run(s) "
                  f"({', '.join(b.run_id[:8] for b in report.baseline)})", highlight=False)
    for f in report.findings:
        mark = "[bold red]REGRESSION[/]" if f.regression else "[green]ok[/]"
        console.print(f"  {mark} {finding_text(f)}", highlight=False)
    for line in report.unmatched:
        console.print(f"  [yellow]not compared[/] {line}", highlight=False)


def markdown(report: Report, images: list[str]) -> str:
    out = ["# Training benchmark report", "",
           f"Tracking server: `{report.tracking_uri}`; {len(report.runs)} run(s); generated {report.generated}.", "",
           "Times per step and category, warm-up steps excluded (rows as in MAELSTROM D2.6). IO is the time "
           "waiting for the next batch (data loading); communication is the DDP all-reduce window.", ""]
    rows = summary_rows(report)
    keys = ["experiment", "training", "site", "run", "steps", "samples/s", "time-to-train", "IO share", "peak memory",
            "energy", "energy quality", "energy method"]
    out += ["## Runs", "", "| " + " | ".join(keys) + " |", "|" + " --- |" * len(keys)]
    out += ["| " + " | ".join(r[k] for k in keys) + " |" for r in rows]
    reasons = [r for r in rows if r["energy reason"]]
    if reasons:
        out += ["", "Energy not measured (or measured in part), by source:", ""]
        out += [f"- {r['training']} @ {r['site']} ({r['run'][:8]}): {r['energy reason']}" for r in reasons]
    out += applications_markdown(report)
    for rt in report.runs:
        out += ["", f"## {rt.experiment}: {rt.label}", "", "| | " + " | ".join(COLUMNS) + " | n |",
                "| --- |" + " ---: |" * (len(COLUMNS) + 1)]
        for label, stats in category_rows(rt):
            out.append(f"| {label} | " + " | ".join(fmt_s(stats.get(c)) for c in COLUMNS)
                       + f" | {stats.get('count', 0):.0f} |")
    if report.baseline_spec:
        out += ["", "## Baseline check", "",
                f"Baseline `{report.baseline_spec}`: " + ", ".join(f"`{b.run_id[:8]}`" for b in report.baseline), ""]
        out += [f"- {'**REGRESSION**' if f.regression else 'ok'}: {finding_text(f)}" for f in report.findings]
        out += [f"- not compared: {line}" for line in report.unmatched]
    if report.skipped:
        out += ["", "## Skipped", ""] + [f"- {line}" for line in report.skipped]
    out += ["", "## Plots", ""] + [f"![{name}]({name})" for name in images]
    return "\n".join(out) + "\n"


def timing_csv(report: Report) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["experiment", "training", "site", "run_id", "category", "count", "min_s", "mean_s", "median_s",
                "p95_s", "max_s", "stdev_s", "total_s"])
    for rt in report.runs:
        for _, key in ROWS:
            s = rt.stats.get(key)
            if s and s.get("count"):
                w.writerow([rt.experiment, rt.training, rt.site, rt.run_id, key, int(s["count"])]
                           + [repr(s.get(k)) if s.get(k) is not None else ""
                              for k in ("min", "mean", "median", "p95", "max", "stdev", "total")])
    return buf.getvalue()


def runs_csv(report: Report) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["experiment", "training", "site", "run_id", "run_name", "steps", "samples_per_s", "time_to_train_s",
                "data_loading_share", "peak_rss_bytes", "peak_gpu_bytes", "energy_j", "energy_quality",
                "energy_method", "energy_scope", "energy_reason"])
    for rt in report.runs:
        m = rt.metrics
        quality, joules, method, reason = rt.energy
        w.writerow([rt.experiment, rt.training, rt.site, rt.run_id, rt.name, int(m.get(TIMING_KEY, 0)),
                    m.get("timing/samples_per_s", ""), m.get("timing/time_to_train_s", ""),
                    m.get("timing/data_loading_share", ""), m.get("memory/peak_rss_bytes", ""),
                    m.get("memory/peak_gpu_bytes", ""), "" if joules is None else joules, quality, method,
                    rt.tags.get("energy_scope", ""), reason])
    return buf.getvalue()


def html_page(report: Report, images: list[str], inline_from: Path | None = None) -> str:
    """The report page; with ``inline_from`` (the folder holding the plots) every plot is embedded as
    a data: URI, so the page is one self-contained file (the copy kept in the catalogue)."""
    e = html.escape
    rows = summary_rows(report)
    keys = ["experiment", "training", "site", "run", "steps", "samples/s", "time-to-train", "IO share", "peak memory",
            "energy", "energy quality", "energy method", "energy reason"]
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>Training benchmark report</title>",
             "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #ccc;padding:3px 8px}td.n{text-align:right}.bad{color:#b00;font-weight:bold}"
             ".ok{color:#070}img{max-width:100%}</style></head><body>",
             "<h1>Training benchmark report</h1>",
             f"<p>Tracking server <code>{e(report.tracking_uri)}</code>; {len(report.runs)} run(s); generated "
             f"{e(report.generated)}. Warm-up steps excluded; IO = waiting for the next batch.</p>",
             "<h2>Runs</h2><table><tr>" + "".join(f"<th>{e(k)}</th>" for k in keys) + "</tr>"]
    for r in rows:
        parts.append("<tr>" + "".join(f"<td>{e(r[k])}</td>" for k in keys) + "</tr>")
    parts.append("</table>")
    parts += applications_html(report)
    if report.baseline_spec:
        parts.append(f"<h2>Baseline check</h2><p>Baseline <code>{e(report.baseline_spec)}</code></p><ul>")
        for f in report.findings:
            cls, word = ("bad", "REGRESSION") if f.regression else ("ok", "ok")
            parts.append(f"<li><span class='{cls}'>{word}</span> {e(finding_text(f))}</li>")
        parts += [f"<li>not compared: {e(line)}</li>" for line in report.unmatched]
        parts.append("</ul>")
    for name in images:
        src = name if inline_from is None else \
            "data:image/png;base64," + base64.b64encode((inline_from / name).read_bytes()).decode()
        parts.append(f"<p><img src='{e(src)}' alt='{e(name)}'></p>")
    for rt in report.runs:
        parts.append(f"<h3>{e(rt.experiment)}: {e(rt.label)}</h3><table><tr><th></th>"
                     + "".join(f"<th>{c}</th>" for c in COLUMNS) + "<th>n</th></tr>")
        for label, stats in category_rows(rt):
            parts.append(f"<tr><td>{e(label)}</td>" + "".join(f"<td class='n'>{e(fmt_s(stats.get(c)))}</td>"
                                                              for c in COLUMNS)
                         + f"<td class='n'>{stats.get('count', 0):.0f}</td></tr>")
        parts.append("</table>")
    if report.skipped:
        parts.append("<h2>Skipped</h2><ul>" + "".join(f"<li>{e(s)}</li>" for s in report.skipped) + "</ul>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


# -------------------------------------------------------------------------------- plots
def plot(report: Report, folder: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sites = sorted({r.site for r in report.runs})
    colours = {s: plt.get_cmap("tab10")(i % 10) for i, s in enumerate(sites)}
    runs = sorted(report.runs, key=lambda r: (r.site, r.training, r.start_time))
    names = []

    # 1. per-step batch time distributions, grouped by site
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(runs) + 2), 4.5))
    data = [[v * 1e3 for v in (r.steps or [])] or [r.stats.get("batch", {}).get("median", 0) * 1e3] for r in runs]
    parts = ax.boxplot(data, patch_artist=True, showfliers=True, flierprops={"markersize": 2})
    for patch, r in zip(parts["boxes"], runs):
        patch.set_facecolor(colours[r.site])
        patch.set_alpha(0.6)
    ax.set_xticks(range(1, len(runs) + 1), [f"{r.site}\n{r.training}\n{r.run_id[:8]}" for r in runs], fontsize=7)
    ax.set_ylabel("batch (training step) time [ms]")
    ax.set_title("Step time distributions per site (warm-up excluded)")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(folder / "step_times.png", dpi=110)
    plt.close(fig)
    names.append("step_times.png")

    # 2. the mean step split into its parts
    fig, ax = plt.subplots(figsize=(9, max(3.2, 0.5 * len(runs) + 2.2)))
    left = [0.0] * len(runs)
    mean = lambda r, k: r.stats.get(k, {}).get("mean", 0.0) * 1e3  # noqa: E731
    segments = [("data loading", lambda r: mean(r, "data_loading")), ("forward", lambda r: mean(r, "forward")),
                ("backward", lambda r: mean(r, "backward")), ("optimizer", lambda r: mean(r, "optimizer")),
                ("rest of the step", lambda r: max(mean(r, "batch") - mean(r, "forward") - mean(r, "backward")
                                                   - mean(r, "optimizer"), 0.0))]
    y = range(len(runs))
    for label, value in segments:
        widths = [value(r) for r in runs]
        ax.barh(list(y), widths, left=left, label=label)
        left = [a + b for a, b in zip(left, widths)]
    comm = [mean(r, "communication") for r in runs]
    if any(comm):   # a thin bar under the step: the all-reduce window, from where backward starts
        ax.barh([i - 0.45 for i in y], comm, left=[mean(r, "data_loading") + mean(r, "forward") for r in runs],
                height=0.1, color="k", label="communication (overlaps backward)")
    ax.set_yticks(list(y), [f"{r.site} · {r.training} · {r.run_id[:8]}" for r in runs], fontsize=7)
    ax.set_xlabel("mean time per step [ms]")
    ax.set_title("Where a step's time goes")
    ax.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.3 if len(runs) < 4 else -0.12))
    fig.tight_layout()
    fig.savefig(folder / "breakdown.png", dpi=110)
    plt.close(fig)
    names.append("breakdown.png")

    # 3. throughput (and energy where measured)
    fig, ax = plt.subplots(figsize=(max(6, 1.0 * len(runs) + 2), 4))
    tput = [r.samples_per_s or 0.0 for r in runs]
    bars = ax.bar(range(len(runs)), tput, color=[colours[r.site] for r in runs])
    for bar, r in zip(bars, runs):
        quality, joules, _, _ = r.energy
        ax.annotate(f"{joules:.0f} J" if joules is not None else f"energy {quality}", (bar.get_x() + bar.get_width() / 2,
                    bar.get_height()), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(runs)), [f"{r.site}\n{r.training}\n{r.run_id[:8]}" for r in runs], fontsize=7)
    ax.set_ylabel("samples / s (all processes)")
    ax.set_title("Throughput")
    fig.tight_layout()
    fig.savefig(folder / "throughput.png", dpi=110)
    plt.close(fig)
    names.append("throughput.png")
    return names


# -------------------------------------------------------------------------------- writing
def write_report(report: Report, output: Path) -> list[Path]:
    """Every file into a fresh folder beside ``output``, then renamed into place (replacing an
    earlier report there); a folder that holds anything else is never replaced."""
    output = Path(output).absolute()
    if output.exists() and not output.is_dir():
        raise BenchmarkInputError(f"--output {output} is a file, not a folder")
    if output.is_dir() and any(output.iterdir()) and not (output / MARKER).exists():
        raise BenchmarkInputError(f"--output {output} holds files that are not a benchmark report: refusing to "
                                  "replace it (name an empty or new folder)")
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        images = plot(report, tmp)
        (tmp / "report.md").write_text(markdown(report, images))
        (tmp / "timing.csv").write_text(timing_csv(report))
        (tmp / "runs.csv").write_text(runs_csv(report))
        (tmp / "applications.csv").write_text(applications_csv(report))
        (tmp / "index.html").write_text(html_page(report, images))
        (tmp / MARKER).write_text(json.dumps({"tracking_uri": report.tracking_uri, "generated": report.generated,
                                              "runs": [r.run_id for r in report.runs]}) + "\n")
        tmp.chmod(0o755)
        old = None
        if output.exists():
            old = output.with_name(f".{output.name}.old-{uuid.uuid4().hex[:8]}")
            output.rename(old)
        try:
            tmp.rename(output)
        except BaseException:
            if old is not None:
                old.rename(output)   # the earlier report back in its place
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return sorted(p for p in output.iterdir() if p.name != MARKER)

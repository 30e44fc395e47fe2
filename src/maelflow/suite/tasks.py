"""The bodies of the suite's tasks, called from the job scripts as ``maelflow task NAME``.

Each task reads the resolved experiment the suite was built from (MAELFLOW_CONFIG), reports
progress through the job's reporter, and on a failure it understands leaves a one-line reason that
becomes the abort reason in ecFlow UI.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from maelflow.errors import MaelflowError
from maelflow.config.loader import ResolvedExperiment
from maelflow.reporting import Reporter
from maelflow.workspace import Workspace, write_atomic

class TaskFailed(MaelflowError):
    """A task failed for a reason an operator can act on."""


@dataclass
class TaskContext:
    rx: ResolvedExperiment
    ws: Workspace
    reporter: Reporter
    config_file: Path

    @classmethod
    def from_env(cls, config: str | None = None, workspace: str | None = None) -> "TaskContext":
        path = Path(config or os.environ.get("MAELFLOW_CONFIG", ""))
        if not path.is_file():
            raise TaskFailed(f"resolved experiment config not found: {path} (set MAELFLOW_CONFIG or --config)")
        rx = ResolvedExperiment.from_json(json.loads(path.read_text()))
        return cls(rx, Workspace.resolve(workspace), Reporter(), path)

    @property
    def runs_dir(self) -> Path:
        return self.config_file.parent / "runs"


def provenance(ctx: TaskContext) -> Path:
    from maelflow.provenance import record

    rec = record(ctx.rx.to_json(), {"suite": ctx.rx.name, "ecf_name": os.environ.get("ECF_NAME")})
    path = ctx.runs_dir / "provenance.json"
    write_atomic(path, json.dumps(rec, indent=2, sort_keys=True) + "\n")
    ctx.reporter.label("info", f"maelflow {rec['maelflow'].get('version')} {rec['maelflow'].get('commit', '')[:10]} "
                       f"config {rec['config_sha256'][:12]}")
    return path


def build(ctx: TaskContext, dataset: str) -> None:
    """Create the dataset's zarr at its source path from its anemoi-datasets recipe or its generator."""
    from maelflow.datasets.build import DatasetBuildError, build_dataset

    ds = ctx.rx.datasets[dataset]
    try:
        path = build_dataset(ds, Path(ds.source), ctx.reporter)
    except DatasetBuildError as exc:
        raise TaskFailed(str(exc)) from None
    ctx.reporter.label("info", f"{dataset} ready at {path}")


def publish(ctx: TaskContext, dataset: str) -> None:
    """Publish the dataset's zarr to the EWC: objects (parallel, multipart when large), manifest last."""
    from maelflow import ewc
    from maelflow.datasets import catalogue_hook
    from maelflow.datasets.settings import open_store
    from maelflow_transfer.errors import TransferError
    from maelflow_transfer.progress import Progress, reporter_sink
    from maelflow_transfer.publish import publish as do_publish

    ds = ctx.rx.datasets[dataset]
    if not ds.source:
        raise TaskFailed(f"dataset {dataset!r} has no source to publish from")
    try:
        store = open_store(ewc.settings_for_job(ctx.ws, None), ds.key_prefix)
        ctx.reporter.label("info", f"publishing {ds.source} to {store.url}")
        # the suite owns its dataset: a rebuilt source replaces the published copy (manifest withdrawn first)
        res = do_publish(Path(ds.source), dataset, store, progress=Progress([reporter_sink(ctx.reporter)]),
                         replace=True, on_manifest=lambda m: ctx.reporter.event("manifest"))
    except TransferError as exc:
        raise TaskFailed(str(exc)) from None
    note = _register(ctx, dataset, catalogue_hook.EWC_PLATFORM, store.url, None)
    ctx.reporter.label("info", f"published {res.objects} objects at {store.url} ({res.copied} uploaded, "
                       f"{res.bytes_copied / 2**20:.1f} MiB in {res.seconds:.1f}s){note}")


def _register(ctx: TaskContext, dataset: str, platform: str, path: str, site_root: str | None) -> str:
    """Record the location in the catalogue; a catalogue that is not there is said, not fatal."""
    from maelflow.datasets import catalogue_hook

    try:
        catalogue_hook.register_location(ctx.ws, dataset, platform, path, site_root=site_root)
        return f"; catalogue: located at {platform}"
    except catalogue_hook.CatalogueUnavailable as exc:
        print(f"maelflow: catalogue not updated: {exc}", flush=True)
        return "; catalogue not updated (see the job output)"


def stage(ctx: TaskContext, dataset: str, site: str) -> None:
    """Stage the published dataset to the site, verified per object, visible only when complete.

    Runs where the suite placed it (layout.py): on the site's login node when it reaches the
    internet (pull there), else beside the server (pull here, push by rsync over SSH).
    """
    from maelflow.datasets.stage import stage_dataset
    from maelflow.sites.connections import is_local
    from maelflow.training.runs import dataset_path
    from maelflow_transfer.errors import TransferError
    from maelflow_transfer.progress import reporter_sink

    ds = ctx.rx.datasets[dataset]
    s = ctx.rx.sites[site]
    dest = str(dataset_path(ctx.rx, site, dataset))
    # mirrors layout.py's placement: the login node when it reaches the internet, else the server
    via = "here" if is_local(s) or s.internet.login else "push"
    ctx.reporter.label("info", f"staging {ds.key_prefix} to {dest} ({'pull on the login node' if via == 'here' else 'push by rsync over SSH'})")
    try:
        res, dest, via = stage_dataset(ctx.ws, dataset, site_name=site, site=s, dest=dest, prefix=ds.key_prefix,
                                       via=via, sinks=[reporter_sink(ctx.reporter)])
    except TransferError as exc:
        raise TaskFailed(str(exc)) from None
    ctx.reporter.event("verified")
    ctx.reporter.label("info", f"{res.objects} objects verified at {dest} ({res.copied} copied, "
                       f"{res.bytes_copied / 2**20:.1f} MiB in {res.seconds:.1f}s)")


def locate(ctx: TaskContext, dataset: str, site: str) -> None:
    """Register a staged dataset's location on the site in the catalogue.

    Beside the server, after the stage: a job on a login node cannot be assumed to reach the
    catalogue. The location is registered only when the site holds the complete copy (the
    manifest a finished stage leaves in the dataset folder).
    """
    from maelflow.sites.files import SiteFiles
    from maelflow.training.runs import dataset_path
    from maelflow.datasets import catalogue_hook
    from maelflow_transfer.manifest import MANIFEST_NAME

    dest = str(dataset_path(ctx.rx, site, dataset))
    if SiteFiles(ctx.rx, site).read_bytes(f"{dest}/{MANIFEST_NAME}") is None:
        raise TaskFailed(f"dataset {dataset!r} is not complete at {dest} on {site} (no {MANIFEST_NAME}): stage it first")
    try:
        catalogue_hook.register_location(ctx.ws, dataset, site, dest)
    except catalogue_hook.CatalogueUnavailable as exc:
        raise TaskFailed(str(exc)) from None
    ctx.reporter.label("info", f"catalogue: {dataset} located at {site}:{dest}")


def train(ctx: TaskContext, training: str, site: str) -> None:
    from maelflow.services.base import ServiceError
    from maelflow.services.stack import discover
    from maelflow.training.launch import TrainingError, train as do_train

    tracking_uri = None
    if ctx.rx.sites[site].internet.compute:  # else the node cannot reach the server: log offline
        try:
            tracking_uri = discover(ctx.ws, "mlflow").url
        except (ServiceError, OSError):
            tracking_uri = None
    try:
        res = do_train(ctx.rx, training, site, ctx.reporter, tracking_uri=tracking_uri)
    except TrainingError as exc:
        raise TaskFailed(str(exc)) from None
    ctx.reporter.label("info", f"done: {res.epochs} epochs, {res.global_step} steps, "
                       f"{len(res.checkpoints)} checkpoints in {res.run_dir}")


def register(ctx: TaskContext, training: str, site: str) -> Path:
    """Register a finished training, its checkpoints and their lineage in the catalogue.

    Runs beside the server (compute nodes cannot reach the catalogue) and reads what the training
    left on the site through the site's files. A checkpoint's identity is derived from its content
    (a UUID from its SHA-256), so registering again finds the same entries instead of duplicating.
    """
    import uuid as uuidlib

    from maelflow.sites.files import SiteFiles
    from maelflow.training.runs import dataset_path, run_dir

    files = SiteFiles(ctx.rx, site)
    out = run_dir(ctx.rx, site, training)
    raw = files.read_bytes(str(out / "run.json"))
    if raw is None:
        raise TaskFailed(f"training {training!r} left no run record at {out / 'run.json'} on {site}: did it run?")
    state = json.loads(raw)
    # Lightning apps write checkpoints/, anemoi checkpoint/<run id>/: look under the whole run folder
    found = [f"{out}/{rel}" for rel in files.files_under(str(out)) if rel.endswith(".ckpt")]
    if not found:
        raise TaskFailed(f"training {training!r} wrote no checkpoint under {out} on {site}")
    sums = files.checksums(found)
    checkpoints = [{"path": p, "size": sums[p][0], "sha256": sums[p][1],
                    "uuid": str(uuidlib.UUID(sums[p][1][:32]))} for p in sorted(found)]
    t = ctx.rx.trainings[training]
    deploy = os.environ.get("MAELFLOW_DEPLOY_ID", "0")
    key = f"{ctx.rx.name}-{training}-{deploy}"
    lineage = {
        "experiment": ctx.rx.name, "training": training, "key": key, "site": site, "run_id": state.get("run_id"),
        "tracking_uri": state.get("tracking_uri"), "application": t.application,
        "forked_from": state.get("forked_from") or t.fork_from,
        "datasets": [{"name": d, "path": str(dataset_path(ctx.rx, site, d))} for d in t.datasets],
        "checkpoints": checkpoints, "config": t.model_dump(mode="json"),
    }
    if state.get("anemoi_version"):  # the release that wrote the checkpoints (their config schema)
        lineage["anemoi_version"] = state["anemoi_version"]
        lineage["anemoi_line"] = state.get("anemoi_line")
    path = ctx.runs_dir / site / training / deploy / "lineage.json"
    write_atomic(path, json.dumps(lineage, indent=2, sort_keys=True) + "\n")
    n_new = _register_in_catalogue(ctx, key, lineage)
    ctx.reporter.label("info", f"training {key}: {len(checkpoints)} checkpoints ({n_new} new) of run "
                       f"{state.get('run_id')} registered in the catalogue")
    return path


def _register_in_catalogue(ctx: TaskContext, key: str, lineage: dict) -> int:
    from maelflow.services.base import ServiceError

    try:
        from maelflow import catalogue
        from maelflow_registry.client import CatalogueClientError
    except ImportError as exc:
        raise TaskFailed(f"the catalogue client is not installed ({exc})") from None
    try:
        cat = catalogue.client(ctx.ws)
    except ServiceError as exc:
        raise TaskFailed(f"cannot register {key}: {exc}") from None
    try:
        cat.register_training(key, run_id=lineage["run_id"], datasets=[d["name"] for d in lineage["datasets"]],
                              status="completed", owner=ctx.rx.experiment.owner, mlflow_url=lineage["tracking_uri"],
                              experiment=lineage["experiment"], site=lineage["site"],
                              application=lineage["application"], forked_from=lineage["forked_from"],
                              checkpoints=[c["uuid"] for c in lineage["checkpoints"]],
                              # the anemoi release that trained it (its config schema): what a reader needs
                              **({"anemoi_version": lineage["anemoi_version"], "anemoi_line": lineage.get("anemoi_line")}
                                 if lineage.get("anemoi_version") else {}))
        new = 0
        for c in lineage["checkpoints"]:
            if cat.exists("weights", c["uuid"]):
                continue
            meta = {"run_id": lineage["run_id"], "training": key, "site": lineage["site"],
                    "dataset": {"names": [d["name"] for d in lineage["datasets"]]},
                    "sha256": c["sha256"], "size": c["size"], "file": c["path"].rsplit("/", 1)[-1]}
            if lineage["forked_from"]:
                meta["fork_run_id"] = lineage["forked_from"]
            if lineage.get("anemoi_version"):
                meta["anemoi_version"] = lineage["anemoi_version"]
                meta["anemoi_line"] = lineage.get("anemoi_line")
            cat.register_checkpoint(c["uuid"], meta, training=key, location=(lineage["site"], c["path"]))
            new += 1
        return new
    except CatalogueClientError as exc:
        raise TaskFailed(f"the catalogue refused {key}: {exc}") from None


def sync(ctx: TaskContext, training: str, site: str) -> None:
    """Copy an offline MLflow run from the site to the tracking server (twice adds nothing)."""
    from maelflow.services.base import ServiceError
    from maelflow.services.stack import discover
    from maelflow.sites.files import SiteFiles
    from maelflow.tracking.sync import sync_store
    from maelflow.training.runs import run_dir

    files = SiteFiles(ctx.rx, site)
    remote_run = run_dir(ctx.rx, site, training)
    raw = files.read_bytes(str(remote_run / "run.json"))
    if raw is None:
        raise TaskFailed(f"training {training!r} left no run record at {remote_run / 'run.json'} on {site}")
    state = json.loads(raw)
    if state.get("mode") != "offline":
        ctx.reporter.label("info", f"nothing to sync: the run logged {state.get('mode', 'nowhere')} "
                           f"to {state.get('tracking_uri')}")
        return
    try:
        tracking_uri = discover(ctx.ws, "mlflow").url
    except ServiceError as exc:
        raise TaskFailed(f"cannot sync: {exc}") from None
    store = state["tracking_uri"].removeprefix("file://")
    local = ctx.ws.path("mlflow-offline", ctx.rx.name, site, training)
    if files.local:
        local_store = Path(store)
    else:
        n = files.fetch_tree(store, local)
        ctx.reporter.label("info", f"fetched {n} files of the offline run from {site}")
        local_store = local
    res = sync_store(local_store.as_uri(), tracking_uri, run_ids=[state["run_id"]] if state.get("run_id") else None)
    dest = res.mapping.get(state.get("run_id", ""), "")
    from maelflow.tracking.mlflow_runs import run_label

    if dest:
        exp = _experiment_id(tracking_uri, dest)
        ctx.reporter.label("mlflow", run_label(tracking_uri, exp, dest))
    ctx.reporter.label("info", f"synced {res.runs} run(s): {res.created} new, {res.metrics_added} metric points, "
                       f"{res.artifacts_added} artifacts added")


def _experiment_id(tracking_uri: str, run_id: str) -> str:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri).get_run(run_id).info.experiment_id


def benchmark_report(ctx: TaskContext) -> Path:
    """The benchmark family's last task: compare this cycle's runs of every site in one report.

    Finds the runs by their tags (maelflow.benchmark, maelflow.deploy; the latest of each training,
    site and repeat, so a rerun task replaces its earlier attempt), writes the report under the
    workspace (``benchmarks/<experiment>/<deploy>-<round>``), and labels its path and the headline
    (median samples/s per site). With a baseline configured, a regression aborts the task.
    """
    from mlflow import MlflowClient

    from maelflow.reports import benchmark as bm
    from maelflow.services.base import ServiceError
    from maelflow.services.stack import discover
    from maelflow.suite.layout import benchmark_name

    rx = ctx.rx
    bench = rx.experiment.benchmark
    if bench is None:
        raise TaskFailed(f"experiment {rx.name!r} has no benchmark section")
    try:
        uri = discover(ctx.ws, "mlflow").url
    except (ServiceError, OSError) as exc:
        raise TaskFailed(f"cannot read the benchmark runs: {exc}") from None
    name = benchmark_name(rx)
    deploy = os.environ.get("MAELFLOW_DEPLOY_ID") or "0"
    trainings = rx.experiment.benchmark_trainings
    client = MlflowClient(uri)
    exp_ids = []
    for exp_name in sorted({rx.trainings[t].mlflow.experiment or rx.name for t in trainings}):
        exp = client.get_experiment_by_name(exp_name)
        if exp is not None:
            exp_ids.append(exp.experiment_id)
    found = client.search_runs(exp_ids, filter_string=f"tags.`maelflow.benchmark` = '{name}' and "
                               f"tags.`maelflow.deploy` = '{deploy}'", max_results=5000,
                               order_by=["attributes.start_time ASC"]) if exp_ids else []
    latest: dict[tuple[str, str, str], object] = {}
    for run in found:
        tags = run.data.tags
        latest[(tags.get("maelflow.training", ""), tags.get("maelflow.site", ""),
                tags.get("maelflow.benchmark.repeat", ""))] = run
    wanted = [(t, s, str(r)) for t in trainings for s in rx.experiment.sites for r in range(1, bench.repeats + 1)]
    missing = [f"{t}@{s}#{r}" for t, s, r in wanted if (t, s, r) not in latest]
    untimed = [f"{t}@{s}#{r}" for t, s, r in wanted if (t, s, r) in latest
               and bm.TIMING_KEY not in latest[(t, s, r)].data.metrics]
    if missing or untimed:
        raise TaskFailed(f"benchmark {name}: " + "; ".join(
            p for p in (f"no MLflow run of {', '.join(missing)}" if missing else "",
                        f"no timing metrics in {', '.join(untimed)}" if untimed else "") if p)
            + f" at {uri} (deploy {deploy})")
    runs = [latest[w] for w in wanted]
    from maelflow.sites.connections import connect
    from maelflow.training.job_energy import record_site_jobs

    for note in record_site_jobs(uri, runs, lambda site: connect(site, rx.sites[site])):
        print(f"maelflow: {note}", flush=True)
    round_ = max(r.data.tags.get("maelflow.benchmark.round", "0") for r in runs)
    try:
        rep = bm.load_runs(client, [], [r.info.run_id for r in runs], uri)
        if bench.baseline:
            rep.baseline_spec = bench.baseline
            bm.compare(rep, bm.resolve_baseline(client, bench.baseline, rep), bench.tolerance,
                       bench.memory_tolerance)
        out = ctx.ws.path("benchmarks", rx.name, f"{deploy}-{round_}")
        bm.write_report(rep, out)
    except bm.BenchmarkInputError as exc:
        raise TaskFailed(f"benchmark {name}: {exc}") from None
    ctx.reporter.label("report", str(out / "index.html"))
    headline = benchmark_headline(rep, rx.experiment.sites)
    ctx.reporter.label("headline", headline)
    _publish_benchmark(ctx, rep, out, f"{rx.name}-{name}-{deploy}-{round_}", headline, {
        f"{rx.name}-{t}-{deploy}": {"datasets": list(rx.trainings[t].datasets), "owner": rx.experiment.owner,
                                    "experiment": rx.name, "training": t, "application": rx.trainings[t].application,
                                    "sites": list(rx.experiment.sites)} for t in trainings})
    if rep.regressions:
        worst = "; ".join(bm.finding_text(f) for f in rep.regressions[:3])
        ctx.reporter.label("info", f"REGRESSION against baseline {bench.baseline}: {worst}")
        raise TaskFailed(f"benchmark {name}: {len(rep.regressions)} regression(s) against baseline "
                         f"{bench.baseline}: {worst} (report {out})")
    ctx.reporter.label("info", f"{len(rep.runs)} runs of {', '.join(trainings)} on {', '.join(rx.experiment.sites)} "
                       f"compared" + (f", no regression against {bench.baseline}" if bench.baseline else ""))
    return out


def _publish_benchmark(ctx: TaskContext, rep, out: Path, key: str, headline: str,
                       trainings: dict[str, dict]) -> None:
    """The report into the catalogue (a ``benchmarks`` entry the trainings' pages link to); a
    catalogue that is not there is said in the label, not fatal: the report is on disk."""
    from maelflow import catalogue
    from maelflow.reports.publish import publish_report
    from maelflow.services.base import ServiceError
    from maelflow_registry.client import CatalogueClientError
    from requests import RequestException

    try:
        page = publish_report(catalogue.client(ctx.ws), rep, out, key, experiment=ctx.rx.name,
                              trainings=trainings, headline=headline)
    except (ServiceError, OSError, CatalogueClientError, RequestException) as exc:
        print(f"maelflow: benchmark report not registered in the catalogue: {exc}", flush=True)
        ctx.reporter.label("catalogue", "not registered (see the job output)")
        return
    ctx.reporter.label("catalogue", f"benchmarks/{key} (page /artefacts/{page})")


def benchmark_headline(rep, sites: list[str]) -> str:
    """Median samples/s per site (each training when there are several), e.g. 'local 812 samples/s'."""
    import statistics

    trainings = sorted({r.training for r in rep.runs})
    parts = []
    for site in sites:
        for t in trainings:
            values = [r.samples_per_s for r in rep.runs if r.site == site and r.training == t and r.samples_per_s]
            if values:
                who = site if len(trainings) == 1 else f"{t}@{site}"
                parts.append(f"{who} {statistics.median(values):.4g} samples/s")
    return ", ".join(parts) or "no throughput recorded"

"""The bodies of the model-production tasks (``maelflow task champion|evaluate|gate|resolve|forecast|deliver``).

Each reads the resolved experiment like every suite task (:class:`maelflow.suite.tasks.TaskContext`).
Tasks beside the server reach the catalogue, MLflow and the EWC store, and read and write the
site's files through its connection; tasks on the site (``evaluate``, ``forecast``) only read the
staged dataset and the checkpoints there, and leave JSON files for the next task. A failure an
operator can act on is a :class:`TaskFailed` whose message is the abort reason.
"""

from __future__ import annotations

import json
import os
import uuid as uuidlib
from datetime import datetime, timezone
from pathlib import Path

from maelflow.errors import MaelflowError
from maelflow.suite.operations_layout import gate_alias
from maelflow.suite.tasks import TaskContext, TaskFailed

CHAMPION_FILE = "champion.json"
SCORES_FILE = "scores.json"


# ------------------------------------------------------------------------------------- helpers
def _deploy() -> str:
    return os.environ.get("MAELFLOW_DEPLOY_ID") or "0"


def evaluation_dir(ctx: TaskContext, site: str, training: str) -> Path:
    from maelflow.training.runs import run_dir

    return run_dir(ctx.rx, site, training) / "evaluation"


def cycle_dir(ctx: TaskContext, site: str, cycle: str) -> Path:
    return Path(ctx.rx.sites[site].paths.outputs) / ctx.rx.name / "operations" / _deploy() / str(cycle)


def _files(ctx: TaskContext, site: str):
    from maelflow.sites.files import SiteFiles

    return SiteFiles(ctx.rx, site)


def _write_site_json(ctx: TaskContext, site: str, path: Path, data: dict) -> None:
    conn = _files(ctx, site).connection()
    conn.makedirs(str(path.parent))
    conn.put_text(str(path), json.dumps(data, indent=2, sort_keys=True) + "\n")


def _read_site_json(ctx: TaskContext, site: str, path: Path, what: str) -> dict:
    raw = _files(ctx, site).read_bytes(str(path))
    if raw is None:
        raise TaskFailed(f"{what} not found at {path} on {site}")
    return json.loads(raw)


def _models(ctx: TaskContext):
    from maelflow.operations.versions import Models

    return Models(ctx.ws)


def _spec(ctx: TaskContext, training: str):
    from maelflow.suite.operations_layout import model_of_training

    spec = model_of_training(ctx.rx, training)
    if spec is None:
        raise TaskFailed(f"training {training!r} is not gated into any model of experiment {ctx.rx.name!r}")
    return spec


def _catalogue_error():
    from maelflow_registry.client import CatalogueClientError

    return CatalogueClientError


def _checkpoint_on_site(version: dict, weights: dict | None, site: str) -> str | None:
    where = (weights or {}).get("locations", {}).get(site) or {}
    if where.get("path"):
        return where["path"]
    recorded = version.get("checkpoint") or {}
    return recorded.get("path") if recorded.get("site") == site else None


def _resolve_on_site(ctx: TaskContext, model: str, alias: str, site: str) -> dict | None:
    """The version ``model@alias`` names now, with its checkpoint's path on ``site`` and whether the
    file is there; None when the model or the alias does not exist (yet)."""
    models = _models(ctx)
    try:
        found = models.resolve(model, alias)
    except MaelflowError as exc:
        if "no alias" in exc.message or "no models entry" in exc.message:
            return None
        raise TaskFailed(f"cannot resolve {model}@{alias}: {exc.message}") from None
    weights = None
    try:
        weights = models.weights(found["weights"])
    except MaelflowError:
        pass
    path = _checkpoint_on_site(found, weights, site)
    exists = bool(path) and _files(ctx, site).connection().exists(path)
    application = "anemoi"
    training = found.get("training") or (weights or {}).get("training")
    if training:
        try:  # the register task records the training's application (anemoi, or an import path)
            application = models.client.get("trainings", training).get("application") or "anemoi"
        except _catalogue_error():
            pass
    return {"model": model, "alias": alias, "version": found["version"], "weights": found["weights"],
            "sha256": found.get("sha256"), "training": training, "run_id": found.get("run_id"),
            "application": application, "path": path, "exists": exists}


# ----------------------------------------------------------------------------------- evaluate
def champion(ctx: TaskContext, training: str, site: str) -> None:
    """Which version the gate's champion alias names, for the evaluate task to score beside the candidate."""
    spec = _spec(ctx, training)
    alias = spec.gate.champion_alias
    found = _resolve_on_site(ctx, spec.name, alias, site) if spec.gate.champion_margin is not None else None
    data: dict = {"model": spec.name, "alias": alias, "version": None}
    if found is not None:
        data.update(found)
        if not found["exists"]:
            data["error"] = (f"its checkpoint {found['weights']} is not on {site}"
                             + (f" (missing at {found['path']})" if found["path"] else " (no location recorded)"))
    _write_site_json(ctx, site, evaluation_dir(ctx, site, training) / CHAMPION_FILE, data)
    if data["version"] is None:
        text = f"{spec.name} has no {alias} yet: no champion to compare with"
    else:
        text = f"champion {spec.name}@{alias} = v{data['version']}" + (f": {data['error']}" if data.get("error") else "")
    ctx.reporter.label("info", text)


def _application(ctx: TaskContext, training: str) -> str:
    return ctx.rx.trainings[training].application


def _checkpoint_name(ctx: TaskContext, training: str, spec) -> str:
    """The checkpoint file evaluated and promoted: ``evaluation.checkpoint``, else anemoi's
    ``inference-last.ckpt`` or a Lightning application's ``last.ckpt`` (its ModelCheckpoint's)."""
    default = "inference-last.ckpt" if _application(ctx, training) == "anemoi" else "last.ckpt"
    return spec.evaluation.checkpoint or default


def _candidate(ctx: TaskContext, training: str, site: str, spec) -> tuple[dict, Path]:
    from maelflow.training.runs import run_dir

    out = run_dir(ctx.rx, site, training)
    state = _read_site_json(ctx, site, out / "run.json", f"the run record of {training!r} (did it train?)")
    if _application(ctx, training) != "anemoi":   # a Lightning application: checkpoints/ of its run folder
        return state, out / "checkpoints" / _checkpoint_name(ctx, training, spec)
    folder = state.get("checkpoint_dir")
    if not folder:
        raise TaskFailed(f"training {training!r} on {site} has no anemoi checkpoint folder in {out / 'run.json'}: "
                         "only anemoi trainings are evaluated")
    return state, Path(folder) / _checkpoint_name(ctx, training, spec)


def evaluate(ctx: TaskContext, training: str, site: str) -> None:
    """Score the candidate (and the champion, on the same dates) on the site; leave scores.json."""
    from maelflow.operations.scores import EvaluationError, evaluate_checkpoint
    from maelflow.training.runs import dataset_path

    spec = _spec(ctx, training)
    t = ctx.rx.trainings[training]
    if not t.datasets:
        raise TaskFailed(f"training {training!r} names no dataset to evaluate on")
    folder = evaluation_dir(ctx, site, training)
    _, ckpt = _candidate(ctx, training, site, spec)
    ds = dataset_path(ctx.rx, site, t.datasets[0])
    if t.application == "anemoi":
        ctx.reporter.label("info", f"scoring {ckpt.name} on held-out dates of {t.datasets[0]}")

        def score(path: Path, dates=None):
            return evaluate_checkpoint(path, ds, spec.evaluation.samples, dates=dates)
    else:   # a Lightning application: its own validation on its held-out split (operations/app_scores.py)
        from maelflow.operations.app_scores import evaluate_application

        ctx.reporter.label("info", f"scoring {ckpt.name} with {t.application}'s own held-out evaluation")
        paths = [dataset_path(ctx.rx, site, d) for d in t.datasets]

        def score(path: Path, dates=None):
            return evaluate_application(t.application, t.datamodule, path, paths, dict(t.config))
    try:
        cand = score(ckpt)
    except EvaluationError as exc:
        raise TaskFailed(f"cannot evaluate {training}: {exc}") from None
    champ_file = folder / CHAMPION_FILE
    champ = json.loads(champ_file.read_text()) if champ_file.is_file() else {"version": None}
    if champ.get("version") is not None and not champ.get("error"):
        try:
            theirs = score(Path(champ["path"]), dates=cand.dates)
            champ["evaluation"] = theirs.to_json()
            champ["summary"] = theirs.summary()
        except EvaluationError as exc:
            champ["error"] = str(exc)
    result = {"training": training, "model": spec.name, "site": site, "dataset": t.datasets[0],
              "checkpoint": str(ckpt), "candidate": cand.to_json(), "champion": champ,
              "evaluated": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / SCORES_FILE).write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    s = cand.summary()
    metric = spec.gate.champion_metric
    if t.application == "anemoi":
        text = (f"nrmse {s['nrmse']:.4g}, skill vs persistence {s['skill_persistence']:.3f}, "
                f"vs climatology {s['skill_climatology']:.3f}")
    else:
        text = ", ".join(f"{k} {v:.4g}" for k, v in sorted(s.items())[:6])
    theirs = (champ.get("summary") or {}).get(metric)
    ctx.reporter.label("info", text + (f", champion v{champ['version']} {metric} {theirs:.4g}"
                                       if theirs is not None else ""))


def _log_to_mlflow(ws, state: dict, summary: dict, decision_text: str) -> str:
    """The scores as metrics (``eval_<score>``) of the training's own run, where it is on the server."""
    from maelflow.services.base import ServiceError
    from maelflow.services.stack import discover

    run_id = state.get("mlflow_run_id") or state.get("run_id")
    if state.get("mode") != "online" or not run_id:
        return f"MLflow: the run logged {state.get('mode', 'nowhere')}, scores kept in the catalogue only"
    try:
        from mlflow import MlflowClient

        client = MlflowClient(discover(ws, "mlflow").url)
    except (ServiceError, OSError) as exc:
        return f"MLflow not reachable ({exc})"
    import time

    from mlflow.entities import Metric, RunTag

    now = int(time.time() * 1000)
    metrics = [Metric(f"eval_{k.replace('.', '_')}", float(v), now, 0) for k, v in summary.items()]
    client.log_batch(run_id, metrics=metrics, tags=[RunTag("maelflow.gate", decision_text[:5000])])
    return f"MLflow: {len(metrics)} scores on run {run_id}"



def gate(ctx: TaskContext, training: str, site: str) -> None:
    """Record the evaluation, decide, and on a pass promote the checkpoint to a new model version."""
    from maelflow.operations.gate import decide

    spec = _spec(ctx, training)
    folder = evaluation_dir(ctx, site, training)
    scores = _read_site_json(ctx, site, folder / SCORES_FILE, f"the evaluation of {training!r}")
    state, ckpt = _candidate(ctx, training, site, spec)
    files = _files(ctx, site)
    sums = files.checksums([str(ckpt)])
    if str(ckpt) not in sums:
        raise TaskFailed(f"the candidate checkpoint {ckpt} of {training!r} is not on {site}")
    size, sha = sums[str(ckpt)]
    weights = str(uuidlib.UUID(sha[:32]))  # the register task's identity of the same file
    summary = scores["candidate"]["summary"]
    champ = scores.get("champion") or {}
    champion_info = None
    if champ.get("version") is not None:
        champion_info = {"version": champ["version"], "weights": champ.get("weights"),
                         "summary": champ.get("summary"), "error": champ.get("error")}
    decision = decide(spec.gate, summary, champion_info)
    metric = spec.gate.champion_metric
    if champion_info and (champion_info.get("summary") or {}).get(metric) and summary.get(metric) is not None:
        from maelflow.operations.scores import skill

        summary = {**summary, "skill_champion": skill(summary[metric], champion_info["summary"][metric])}
    alias = gate_alias(spec, training)
    from maelflow.training.warm_start import WARM_START_FILE

    warm_raw = files.read_bytes(str(folder.parent / WARM_START_FILE))   # a fine-tuning cycle's champion
    warm = json.loads(warm_raw) if warm_raw else None
    mlflow_note = _log_to_mlflow(ctx.ws, state, summary, decision.text)
    key = f"{ctx.rx.name}-{training}-{_deploy()}"
    evaluation = {"model": spec.name, "at": scores.get("evaluated"), "dataset": scores.get("dataset"),
                  "dates": scores["candidate"]["dates"], "summary": summary,
                  "references": scores["candidate"]["references"], "champion": champion_info,
                  **decision.to_json()}
    if scores["candidate"].get("how"):
        evaluation["how"] = scores["candidate"]["how"]
    if warm:
        evaluation["warm_start"] = {k: warm.get(k) for k in ("model", "alias", "version", "weights", "sha256",
                                                              "checkpoint", "warm_start", "cycle", "dates")}
    cat = _models(ctx).client
    CatalogueClientError = _catalogue_error()
    try:
        record = cat.get("weights", weights)
    except CatalogueClientError as exc:
        raise TaskFailed(f"checkpoint {weights} ({ckpt.name} of {key}) is not registered in the catalogue "
                         f"({exc.message}): the register task registers it") from None
    try:
        ops = [] if isinstance(record.get("evaluations"), list) else [{"op": "add", "path": "/evaluations", "value": []}]
        cat.patch("weights", weights, ops + [{"op": "add", "path": "/evaluations/-", "value": evaluation}])
    except CatalogueClientError as exc:
        raise TaskFailed(f"the catalogue refused the evaluation of {weights}: {exc.message}") from None
    ctx.reporter.label("decision", decision.text)
    if not decision.passed:
        ctx.reporter.label("info", f"{training} not promoted into {spec.name}; {alias} unchanged. "
                           f"{mlflow_note}")
        return
    data = files.read_bytes(str(ckpt))
    models = _models(ctx)
    try:
        _, number = models.promote(
            spec.name, weights, alias=alias, why=((f"fine-tuned from v{warm['version']}, " if warm else "")
                                              + f"gate {decision.text}")[:3900], local_copy=data,
            sha256=sha, training=key, run_id=state.get("mlflow_run_id") or state.get("run_id"),
            datasets=list(ctx.rx.trainings[training].datasets),
            checkpoint={"site": site, "path": str(ckpt), "size": size},
            evaluation={k: evaluation[k] for k in ("dataset", "dates", "summary", "references", "champion", "how",
                                                   "warm_start") if k in evaluation},
            gate={"decision": "passed", "checks": decision.checks, "rules": [r.model_dump() for r in spec.gate.rules],
                  "champion_margin": spec.gate.champion_margin},
            mlflow={"run_id": state.get("mlflow_run_id"), "tracking_uri": state.get("tracking_uri")}
            if state.get("mode") == "online" else None)
    except MaelflowError as exc:
        raise TaskFailed(f"the gate passed {training} but promoting it failed: {exc.message}") from None
    ctx.reporter.event("promoted")
    for note in models.notes:
        print(f"maelflow: {note}", flush=True)
    ctx.reporter.label("info", f"{spec.name} v{number} <- {ckpt.name} of {key}; {alias} -> v{number}. "
                       f"{mlflow_note}" + ("; " + "; ".join(models.notes) if models.notes else ""))


# ----------------------------------------------------------------------------------- operations
def _ops(ctx: TaskContext):
    ops = ctx.rx.experiment.operations
    if ops is None:
        raise TaskFailed(f"experiment {ctx.rx.name!r} has no operations section")
    return ops


def resolve(ctx: TaskContext, site: str, cycle: str) -> None:
    """model@alias now; its checkpoint must be on the site. Writes cycle.json for the forecast task."""
    from maelflow.operations.forecast import CYCLE_FILE, cycle_date
    from maelflow.training.runs import dataset_path

    ops = _ops(ctx)
    date = cycle_date(cycle, ops.time)
    found = _resolve_on_site(ctx, ops.model, ops.alias, site)
    if found is None:
        raise TaskFailed(f"cycle {cycle}: model {ops.model} has no alias {ops.alias!r} (has the gate promoted a "
                         f"version? maelflow model show {ops.model}): nothing forecast")
    ctx.reporter.label("model", f"{ops.model}@{ops.alias} = v{found['version']} (checkpoint {found['weights']})")
    if not found["exists"]:
        where = f"missing at {site}:{found['path']}" if found["path"] else f"with no location on {site}"
        raise TaskFailed(f"cycle {cycle}: {ops.model}@{ops.alias} is v{found['version']}, whose checkpoint "
                         f"{found['weights']} is {where}: nothing run, nothing registered; restore the file or "
                         f"roll back (maelflow model rollback {ops.model} {ops.alias})")
    s = ctx.rx.sites[site]
    data = {**found, "checkpoint": found["path"], "experiment": ctx.rx.name, "site": site,
            "date": date.isoformat(), "cycle": str(cycle), "lead_time": ops.lead_time, "output": ops.output,
            "dataset": ops.dataset, "dataset_path": str(dataset_path(ctx.rx, site, ops.dataset)),
            "device": "cuda" if s.gpus.per_node else "cpu",
            "resolved": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    _write_site_json(ctx, site, cycle_dir(ctx, site, cycle) / CYCLE_FILE, data)
    ctx.reporter.label("info", f"cycle {date:%Y-%m-%d %H} UTC +{ops.lead_time} h with v{found['version']}")


def forecast(ctx: TaskContext, site: str, cycle: str) -> None:
    from maelflow.operations.forecast import ForecastError, run_cycle

    folder = cycle_dir(ctx, site, cycle)
    ctx.reporter.label("info", f"anemoi-inference in {folder}")
    try:
        result = run_cycle(folder)
    except ForecastError as exc:
        raise TaskFailed(f"cycle {cycle}: {exc.message}") from None
    attrs = result["attributes"]
    ctx.reporter.label("info", f"{Path(result['output']).name} ({result['size'] / 2**20:.2f} MiB) by "
                       f"{attrs['maelflow_model']} v{attrs['maelflow_model_version']}")


def _publish(ctx: TaskContext, site: str, output: str, key_prefix: str) -> tuple[str, int]:
    """Copy the output (a file, or a zarr folder) from the site into the EWC store; (s3 URI, objects)."""
    import obstore

    from maelflow import ewc
    from maelflow.s3 import object_store

    settings = ewc.settings_for_job(ctx.ws, None)
    store = object_store(settings)
    files = _files(ctx, site)
    name = Path(output).name
    rels = files.files_under(output) if ctx.rx.experiment.operations.output == "zarr" else [""]
    for rel in rels:
        data = files.read_bytes(f"{output}/{rel}" if rel else output)
        if data is None:
            raise TaskFailed(f"the forecast output {output} is not on {site}")
        obstore.put(store, f"{key_prefix}/{name}" + (f"/{rel}" if rel else ""), data)
    return f"s3://{settings.get('bucket') or 'ewc'}/{key_prefix}/{name}", len(rels)


def deliver(ctx: TaskContext, site: str, cycle: str) -> None:
    """Publish the cycle's output to the EWC store and register it as a forecast with its lineage."""
    from maelflow.operations.forecast import CYCLE_FILE, RESULT_FILE

    ops = _ops(ctx)
    folder = cycle_dir(ctx, site, cycle)
    c = _read_site_json(ctx, site, folder / CYCLE_FILE, f"cycle {cycle}'s cycle.json")
    result = _read_site_json(ctx, site, folder / RESULT_FILE, f"cycle {cycle}'s forecast.json (did it run?)")
    stamp = datetime.fromisoformat(c["date"]).strftime("%Y%m%d%H")
    produced = result["attributes"].get("maelflow_produced") or datetime.now(timezone.utc).isoformat()
    prefix = f"{ops.prefix.strip('/')}/{ctx.rx.name}/{c['model']}/{stamp}"
    uri, objects = _publish(ctx, site, result["output"], prefix)
    key = f"{ctx.rx.name}-{stamp}-{datetime.fromisoformat(produced).strftime('%Y%m%dT%H%M%S')}"
    record = {"name": key, "model": c["model"], "version": int(c["version"]), "alias": c["alias"],
              "weights": c["weights"], "checkpoint_sha256": c.get("sha256"), "training": c.get("training"),
              "run_id": c.get("run_id"), "experiment": ctx.rx.name, "cycle": c["date"], "lead_time": c["lead_time"],
              "produced": produced, "runner": result["attributes"].get("maelflow_producer"),
              "initial_conditions": {"dataset": c["dataset"], "path": c["dataset_path"], "site": site},
              "output": {"format": result["format"], "file": Path(result["output"]).name, "size": result["size"],
                         "sha256": result["sha256"], "objects": objects},
              "locations": {"ewc": {"path": uri}, site: {"path": result["output"]}}}
    cat = _models(ctx).client
    CatalogueClientError = _catalogue_error()
    try:
        if not cat.exists("forecasts", key):
            cat.create("forecasts", record)
    except CatalogueClientError as exc:
        raise TaskFailed(f"cycle {cycle}: published to {uri} but the catalogue refused the forecast: "
                         f"{exc.message}") from None
    ctx.reporter.label("catalogue", f"forecasts/{key}")
    ctx.reporter.label("info", f"{uri} ({result['size'] / 2**20:.2f} MiB) from {c['model']} v{c['version']}")

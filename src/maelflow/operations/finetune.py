"""Cyclic fine-tuning: each date of a model's ``finetune`` repeat warm-starts a training from the
champion's weights on new data, then evaluates and gates it like any training.

Why a cycle of its own: operational models are refreshed on data that arrived after they were
trained (AIFS was fine-tuned on IFS analyses after its ERA5 pre-training); a cycle must start from
the version that is the champion *when it runs* (not when the suite was built), say which one that
was, train only on data the champion has not seen, and keep its held-out dates out of training,
so that its gate compares candidate and champion fairly.

A cycle (suite family ``finetune/<model>``, variable ``YMD``) runs the tasks ``ft_warmstart`` ->
``ft_train`` -> ``ft_sync`` -> ``ft_register`` -> ``ft_champion`` -> ``ft_evaluate`` -> ``ft_gate``. All of them run
through :func:`finetune`, which gives the cycle a run folder of its own (the deploy id with the
cycle's date), so that every task of a cycle finds what the one before left, a second cycle never
resumes the first, and the catalogue's training key names the cycle.

``warmstart`` (beside the server) resolves ``model@alias``, checks that the version's *training*
checkpoint (``last.ckpt`` beside its ``inference-last.ckpt``: anemoi restores weights from a
Lightning checkpoint) is on the site, and fixes the cycle's dates: training from the end of the
champion's own training period (or ``window`` days before the cycle) up to the cycle's date, held
out from it for ``holdout`` days. It writes ``warm_start.json`` into the cycle's run folder; the
anemoi launcher reads it (:func:`apply_warm_start`): ``system.input.warm_start`` with
``training.load_weights_only`` (weights only: a new run with a fresh optimiser and step count on the
new data), the dates of the three splits, and ``parent_uuid`` (the champion checkpoint's uuid, as
anemoi records it for a forked run) in the new checkpoint's metadata. A cycle whose dataset holds
too few dates to train on or to hold out (the data of its days has not arrived) is skipped, not
failed: ``warmstart`` says why in its ``info`` label and sets its ``skip`` event, and the cycle's
other tasks are set complete unrun (their ecFlow complete expression), so the repeat moves on.
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timedelta, timezone
from pathlib import Path

from maelflow.suite.tasks import TaskContext, TaskFailed
from maelflow.training.runs import dataset_dates
from maelflow.training.warm_start import WARM_START_FILE

MIN_DATES = 4   # a split needs the model's input states and a target (multistep 2 + 1), and one more
CYCLE_TASKS = ("warmstart", "train", "sync", "register", "champion", "evaluate", "gate")
CYCLE_PREFIX = "ft_"   # a cycle's task nodes (and their scripts, suites/tasks/ft_*.ecf): ft_<task>


# ------------------------------------------------------------------------------------ dates
class TooLittleData(ValueError):
    """The dataset has too few dates for this cycle yet (new data to train on, or to hold out):
    the cycle is skipped, not failed; a later cycle will find them."""


def cycle_splits(cycle: datetime, dates: list[datetime], champion_end: datetime | None, window: float | None,
                 holdout: float) -> dict[str, list[str]]:
    """Training, validation and test dates ``[start, end]`` (inclusive, ISO) of one cycle.

    Training: after the champion's training period (``champion_end``) or ``window`` days before
    ``cycle``, up to the last date before ``cycle``; validation and test: ``holdout`` days from
    ``cycle`` on. TooLittleData says which split has too few dates of the dataset; a ``ValueError``
    that the champion's period is unknown and no window is set (a configuration to fix)."""
    if window is None and champion_end is None:
        raise ValueError("the champion's training period is not known: set finetune.window (days)")
    lo = cycle - timedelta(days=window) if window is not None else champion_end + timedelta(seconds=1)
    train = [d for d in dates if lo <= d < cycle]
    held = [d for d in dates if cycle <= d < cycle + timedelta(days=holdout)]
    since = f"since {champion_end.isoformat()} (the end of the champion's training)" if window is None \
        else f"in the {window:g} days before {cycle.isoformat()}"
    if len(train) < MIN_DATES:
        raise TooLittleData(f"only {len(train)} dates of new data {since} before {cycle.isoformat()} in the dataset "
                         f"(at least {MIN_DATES} needed): nothing to fine-tune on yet")
    if len(held) < MIN_DATES:
        raise TooLittleData(f"only {len(held)} dates of the dataset from {cycle.isoformat()} on to hold out for "
                         f"evaluation (at least {MIN_DATES} needed; its last date is {dates[-1].isoformat()})")
    a, b = [train[0].isoformat(), train[-1].isoformat()], [held[0].isoformat(), held[-1].isoformat()]
    return {"training": a, "validation": b, "test": list(b)}


# ------------------------------------------------------------------------------- the tasks
def cycle_deploy(cycle: str) -> str:
    """Give this process the cycle's deploy id (``<deploy>-<YYYYMMDD>``): its run folder, its key."""
    base = os.environ.get("MAELFLOW_DEPLOY_ID") or "0"
    suffix = f"-{cycle}"
    if not base.endswith(suffix):
        os.environ["MAELFLOW_DEPLOY_ID"] = base + suffix
    return os.environ["MAELFLOW_DEPLOY_ID"]


def finetune(ctx: TaskContext, task: str, training: str, site: str, cycle: str) -> None:
    """``maelflow task finetune --task T``: task T of a fine-tuning cycle, in the cycle's run folder."""
    from maelflow.operations import tasks as ops_tasks
    from maelflow.suite import tasks as suite_tasks

    task = task.removeprefix(CYCLE_PREFIX)   # the suite's task names: ft_warmstart, ft_train ...
    if task not in CYCLE_TASKS:
        raise TaskFailed(f"unknown fine-tuning task {task!r} (one of {', '.join(CYCLE_TASKS)})")
    cycle_deploy(cycle)
    if task == "warmstart":
        warmstart(ctx, training, site, cycle)
    elif task in ("train", "sync", "register"):
        getattr(suite_tasks, task)(ctx, training, site)
    else:
        getattr(ops_tasks, task)(ctx, training, site)


def _finetune_spec(ctx: TaskContext, training: str):
    from maelflow.suite.operations_layout import model_of_training

    spec = model_of_training(ctx.rx, training)
    if spec is None or spec.finetune is None or spec.finetune.training != training:
        raise TaskFailed(f"training {training!r} is not the fine-tuning training of any model of {ctx.rx.name!r}")
    return spec


def _champion_end(ctx: TaskContext, site: str, checkpoint: str) -> datetime | None:
    """The end of the champion's training period: its run folder's config (``config/anemoi.yaml``)."""
    import yaml

    from maelflow.sites.files import SiteFiles

    run = Path(checkpoint).parents[2]   # <run>/checkpoint/<run id>/inference-last.ckpt
    raw = SiteFiles(ctx.rx, site).read_bytes(str(run / "config" / "anemoi.yaml"))
    if raw is None:
        return None
    cfg = yaml.safe_load(raw) or {}
    splits = (((cfg.get("dataloader") or {}).get("training") or {}).get("datasets") or {}).values()
    ends = [str((v or {}).get("end")) for v in splits if (v or {}).get("end")]
    try:
        return max(datetime.fromisoformat(e[:19]) for e in ends) if ends else None
    except ValueError:
        return None


def warmstart(ctx: TaskContext, training: str, site: str, cycle: str) -> None:
    """Resolve the champion now, check its training checkpoint is on the site, fix the cycle's dates."""
    from maelflow.operations.forecast import cycle_date
    from maelflow.operations.tasks import _files, _resolve_on_site, _write_site_json
    from maelflow.training.runs import dataset_path, run_dir

    spec = _finetune_spec(ctx, training)
    ft = spec.finetune
    t = ctx.rx.trainings[training]
    if t.application != "anemoi":
        raise TaskFailed(f"fine-tuning training {training!r} is {t.application!r}: warm starts are anemoi-training's "
                         "(system.input.warm_start); an application fine-tunes with fork_from")
    if not t.datasets:
        raise TaskFailed(f"fine-tuning training {training!r} names no dataset")
    alias = ft.from_alias or spec.gate.champion_alias
    date = cycle_date(cycle, ft.time)
    found = _resolve_on_site(ctx, spec.name, alias, site)
    if found is None:
        raise TaskFailed(f"cycle {cycle}: {spec.name} has no alias {alias!r} to warm-start from (has a gate "
                         f"promoted a version? maelflow model show {spec.name}): nothing trained")
    ctx.reporter.label("model", f"{spec.name}@{alias} = v{found['version']} (checkpoint {found['weights']})")
    if not found["path"]:
        raise TaskFailed(f"cycle {cycle}: {spec.name}@{alias} is v{found['version']}, whose checkpoint has no "
                         f"location on {site}: nothing to warm-start from")
    files = _files(ctx, site)
    start_from = str(Path(found["path"]).with_name("last.ckpt"))
    sums = files.checksums([start_from])
    if start_from not in sums:
        raise TaskFailed(f"cycle {cycle}: {spec.name}@{alias} is v{found['version']}, but its training checkpoint "
                         f"{start_from} is not on {site} (anemoi warm-starts from the Lightning checkpoint beside "
                         f"{Path(found['path']).name}): nothing trained")
    ds = dataset_path(ctx.rx, site, t.datasets[0])
    raw = files.read_bytes(str(ds / ".zattrs"))
    if raw is None:
        raise TaskFailed(f"cycle {cycle}: dataset {t.datasets[0]} is not staged on {site} ({ds})")
    try:
        dates = dataset_dates(json.loads(raw))
        champion_end = _champion_end(ctx, site, found["path"])
        splits = cycle_splits(date, dates, champion_end, ft.window, ft.holdout)
    except TooLittleData as exc:
        # not a failure: the data for this cycle has not arrived (yet). The event completes the rest
        # of the cycle unrun (their complete expression) and the repeat moves to the next date.
        ctx.reporter.label("info", f"skipped: {exc}")
        ctx.reporter.event("skip")
        return
    except (ValueError, KeyError) as exc:
        raise TaskFailed(f"cycle {cycle} of {spec.name}: {exc}") from None
    data = {"model": spec.name, "alias": alias, "version": found["version"], "weights": found["weights"],
            "sha256": found.get("sha256"), "training": found.get("training"), "run_id": found.get("run_id"),
            "checkpoint": found["path"], "warm_start": start_from, "warm_start_sha256": sums[start_from][1],
            "champion_training_end": champion_end.isoformat() if champion_end else None,
            "cycle": cycle, "date": date.isoformat(), "dataset": t.datasets[0], "dates": splits,
            "resolved": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    out = run_dir(ctx.rx, site, training)
    _write_site_json(ctx, site, out / WARM_START_FILE, data)
    ctx.reporter.label("info", f"from v{found['version']} ({Path(start_from).name}); training "
                       f"{splits['training'][0]} to {splits['training'][1]}, held out {splits['test'][0]} to "
                       f"{splits['test'][1]}")

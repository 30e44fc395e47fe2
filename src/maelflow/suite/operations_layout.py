"""The suite's families for model production, per site: ``evaluate`` after ``register``, then ``operations``.

``evaluate/<training>/{champion, evaluate, gate}``, one after another for the trainings of each
model in the order the model lists them (so each gate compares with the champion the previous one
left): ``champion`` (beside the server) finds the version the gate's champion alias names and
checks its checkpoint is on the site; ``evaluate`` (on the site) scores the candidate, persistence,
climatology and the champion on held-out dates; ``gate`` (beside the server) records the scores in
MLflow and the catalogue and decides: a pass makes a model version and moves the alias, a refusal
says why in the ``decision`` label and moves nothing.

``operations`` (the experiment's operations site): an ecFlow ``repeat date YMD`` family, one cycle
per date, each ``resolve`` (beside the server: model@alias, the checkpoint checked on the site) ->
``forecast`` (on the site: anemoi-inference, with an optional ``late`` flag) -> ``deliver`` (beside
the server: publish to the EWC store, register the forecast). The repeat moves to the next date
only when all three are complete; an aborted cycle holds the family until an operator acts.

``finetune`` (the same site): per model with a ``finetune`` section, a ``repeat date`` of fine-tuning
cycles, each a warm-started training evaluated and gated like any other (``finetune_family``).
"""

from __future__ import annotations

from maelflow.config.loader import ResolvedExperiment
from maelflow.config.names import node_name
from maelflow.suite.spec import FamilySpec, TaskSpec


def gated_trainings(rx: ResolvedExperiment) -> list[tuple[str, str]]:
    """(model name, training) pairs in gate order."""
    return [(m.name, t) for m in rx.experiment.models for t in m.trainings]


def model_spec(rx: ResolvedExperiment, name: str):
    for m in rx.experiment.models:
        if m.name == name:
            return m
    return None


def model_of_training(rx: ResolvedExperiment, training: str):
    """The model a training is gated into: one of its trainings, or its fine-tuning training."""
    for m in rx.experiment.models:
        if training in m.trainings or (m.finetune is not None and m.finetune.training == training):
            return m
    return None


def gate_alias(spec, training: str) -> str:
    """The alias a pass moves: a fine-tuning cycle's own (finetune.alias), else the gate's."""
    ft = spec.finetune
    if ft is not None and ft.training == training and ft.alias:
        return ft.alias
    return spec.gate.alias


def evaluate_family(rx: ResolvedExperiment) -> FamilySpec | None:
    pairs = gated_trainings(rx)
    if not pairs:
        return None
    fam = FamilySpec("evaluate", trigger="register == complete",
                     labels=[("info", "evaluate, gate and promote: " + ", ".join(f"{t} -> {m}" for m, t in pairs))])
    previous: str | None = None
    for model, training in pairs:
        spec = model_spec(rx, model)
        fam.children.append(FamilySpec(
            node_name(training), variables={"TRAINING": training, "MODEL": model},
            trigger=f"{previous} == complete" if previous else None,
            labels=[("info", f"{training} into {model}: gate moves '{spec.gate.alias}'")],
            children=[
                TaskSpec("champion", "champion", labels=[("info", "")], runs_on="server"),
                TaskSpec("evaluate", "evaluate", labels=[("info", "")], trigger="champion == complete"),
                TaskSpec("gate", "gate", labels=[("info", ""), ("decision", "")], events=["promoted"],
                         trigger="evaluate == complete", runs_on="server"),
            ]))
        previous = node_name(training)
    return fam


# a cycle whose warm start found too little data sets this event: the rest of the cycle is set
# complete unrun, and the repeat moves on to the next date
SKIPPED = "ft_warmstart:skip"


def finetune_family(rx: ResolvedExperiment, site_name: str, after: str | None) -> FamilySpec | None:
    """``finetune/<model>``: a ``repeat date YMD`` per model with a ``finetune`` section, one cycle per date:
    ``ft_warmstart`` (beside the server: model@alias now, the champion's training checkpoint on the
    site and the cycle's dates, into warm_start.json) -> ``ft_train`` (anemoi-training,
    load_weights_only from that checkpoint, on the new data) -> ``ft_sync`` -> ``ft_register`` ->
    ``ft_champion`` -> ``ft_evaluate`` -> ``ft_gate``: the same task bodies as any gated training,
    each cycle in a run folder of its own (the deploy id with the cycle's date). Runs on the operations
    site (default: the first site)."""
    from dataclasses import replace

    from maelflow.suite.training_tasks import train_tasks

    models = [m for m in rx.experiment.models if m.finetune is not None]
    if not models or (rx.experiment.operations_site or rx.experiment.sites[0]) != site_name:
        return None
    fam = FamilySpec("finetune", trigger=f"{after} == complete" if after else None,
                     labels=[("info", "cyclic fine-tuning from the champion: " + ", ".join(
                         f"{m.finetune.training} -> {m.name}@{gate_alias(m, m.finetune.training)}" for m in models))])
    for m in models:
        ft = m.finetune
        train, sync = train_tasks(rx.trainings[ft.training])
        alias = gate_alias(m, ft.training)
        fam.children.append(FamilySpec(
            node_name(m.name), variables={"TRAINING": ft.training, "MODEL": m.name},
            repeat=("YMD", ft.ymd_start, ft.ymd_end, ft.every),
            labels=[("info", f"{ft.training}: warm start from {m.name}@{ft.from_alias or m.gate.champion_alias}, "
                             f"gate moves '{alias}', {ft.start} to {ft.end}")],
            children=[
                TaskSpec("ft_warmstart", "ft_warmstart", labels=[("model", ""), ("info", "")], events=["skip"],
                         runs_on="server"),
                *(replace(t, complete=SKIPPED) for t in (
                    replace(train, name="ft_train", script="ft_train", trigger="ft_warmstart == complete"),
                    replace(sync, name="ft_sync", script="ft_sync", trigger="ft_train == complete"),
                    TaskSpec("ft_register", "ft_register", labels=[("info", "")], trigger="ft_sync == complete",
                             runs_on="server"),
                    TaskSpec("ft_champion", "ft_champion", labels=[("info", "")], trigger="ft_register == complete",
                             runs_on="server"),
                    TaskSpec("ft_evaluate", "ft_evaluate", labels=[("info", "")], trigger="ft_champion == complete"),
                    TaskSpec("ft_gate", "ft_gate", labels=[("info", ""), ("decision", "")], events=["promoted"],
                             trigger="ft_evaluate == complete", runs_on="server"))),
            ]))
    return fam


def operations_family(rx: ResolvedExperiment, site_name: str, after: str | None) -> FamilySpec | None:
    ops = rx.experiment.operations
    if ops is None or rx.experiment.operations_site != site_name:
        return None
    fam = FamilySpec("operations", variables={"MODEL": ops.model, "ALIAS": ops.alias},
                     trigger=f"{after} == complete" if after else None,
                     repeat=("YMD", ops.ymd_start, ops.ymd_end, ops.every),
                     labels=[("info", f"forecasts of {ops.model}@{ops.alias} from {ops.dataset}, {ops.time:02d} UTC, "
                                      f"+{ops.lead_time} h, {ops.start} to {ops.end}")])
    fam.children = [
        TaskSpec("resolve", "resolve", labels=[("model", ""), ("info", "")], runs_on="server"),
        TaskSpec("forecast", "forecast", labels=[("info", "")], trigger="resolve == complete", late=ops.late),
        TaskSpec("deliver", "deliver", labels=[("info", ""), ("catalogue", "")], trigger="forecast == complete",
                 runs_on="server"),
    ]
    return fam


def operations_families(rx: ResolvedExperiment, site_name: str) -> list[FamilySpec]:
    """What a site family gets after its train/register families (nothing without models or operations)."""
    out: list[FamilySpec] = []
    evaluate = evaluate_family(rx) if rx.experiment.regular_trainings else None
    if evaluate is not None:
        out.append(evaluate)
    after = "evaluate" if evaluate is not None else ("data" if rx.experiment.datasets else None)
    ops = operations_family(rx, site_name, after)
    if ops is not None:
        out.append(ops)
    finetune = finetune_family(rx, site_name, after)
    if finetune is not None:
        out.append(finetune)
    return out

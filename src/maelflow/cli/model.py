"""``maelflow model list|show|promote|alias|rollback|history|mirror``: operational model versions and aliases.

Thin: the catalogue holds the record (:mod:`maelflow.operations.versions`), every alias move goes
to the model's append-only history with who, when, from, to and why, and each change is mirrored
to MLflow's model registry. Every command takes ``--json`` for scripts.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from maelflow.cli.options import resolve_workspace, workspace_option

json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
mirror_option = click.option("--no-mirror", is_flag=True, help="Change the catalogue only, not MLflow's registry.")


def _models(workspace: str | None, no_mirror: bool = False):
    from maelflow.operations.versions import Models

    return Models(resolve_workspace(workspace), mirror=not no_mirror)


def _echo_json(data) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))


def _notes(models) -> None:
    for note in models.notes:
        click.echo(f"warning: {note}", err=True)


def _aliases(record: dict) -> str:
    return ", ".join(f"{a} -> v{v}" for a, v in sorted((record.get("aliases") or {}).items())) or "none"


@click.group("model")
def command() -> None:
    """Model versions and aliases: promote, move, roll back, and their history."""


@command.command("list")
@workspace_option
@json_option
def list_(workspace: str | None, as_json: bool) -> None:
    """Every model with its versions and aliases."""
    found = _models(workspace).list()
    if as_json:
        _echo_json([{"name": m["name"], "versions": sorted(int(n) for n in m.get("versions") or {}),
                     "aliases": m.get("aliases") or {}} for m in found])
        return
    if not found:
        click.echo("no models")
    for m in found:
        click.echo(f"{m['name']}: {len(m.get('versions') or {})} version(s), aliases {_aliases(m)}")


@command.command("show")
@click.argument("name")
@workspace_option
@json_option
def show(name: str, workspace: str | None, as_json: bool) -> None:
    """One model: its versions (checkpoint, hash, scores, gate) and aliases."""
    record = _models(workspace).show(name)
    if as_json:
        _echo_json(record)
        return
    click.echo(f"model {name}: aliases {_aliases(record)}")
    for number in sorted(record.get("versions") or {}, key=int):
        v = record["versions"][number]
        summary = (v.get("evaluation") or {}).get("summary") or {}
        scores = ", ".join(f"{k} {summary[k]:.4g}" for k in ("nrmse", "skill_persistence", "skill_climatology")
                           if isinstance(summary.get(k), (int, float)))
        how = (v.get("gate") or {}).get("decision") or ("manual: " + v["reason"] if v.get("reason") else "")
        click.echo(f"  v{number}: checkpoint {v['weights']} sha256 {str(v.get('sha256', ''))[:12]} "
                   f"training {v.get('training', '-')} promoted {v.get('promoted', '')[:19]} by {v.get('promoted_by')}"
                   + (f" [{how}]" if how else "") + (f" ({scores})" if scores else ""))


@command.command("promote")
@click.argument("name")
@click.option("--weights", required=True, help="The registered checkpoint (uuid) to make a version of.")
@click.option("--alias", default=None, help="Move this alias to the new version.")
@click.option("--reason", default=None, help="Why, in words: needed unless --evaluation passes the gate.")
@click.option("--evaluation", "evaluation_file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="The evaluation (scores.json of the evaluate task) the model's gate is applied to.")
@click.option("--experiment", default=None, help="The experiment whose model gate to apply (default: the gate's "
                                                  "defaults).")
@workspace_option
@mirror_option
@json_option
def promote(name: str, weights: str, alias: str | None, reason: str | None, evaluation_file: str | None,
            experiment: str | None, workspace: str | None, no_mirror: bool, as_json: bool) -> None:
    """Make checkpoint WEIGHTS a new immutable version of model NAME, by hand.

    The same evidence the suite's gate asks for (--evaluation, judged by the model's gate), or a
    written --reason; the checkpoint file is read where the catalogue says it lies and must have the
    content hash it was registered with.
    """
    from maelflow.errors import ConfigurationError
    from maelflow.operations.gate import decide
    from maelflow.operations.versions import ModelError, check_source

    if not reason and not evaluation_file:
        raise ConfigurationError("a manual promotion needs evidence: --evaluation FILE (an evaluation the "
                                 "model's gate passes) or --reason TEXT (why, recorded with the version)")
    models = _models(workspace, no_mirror)
    record = models.weights(weights)
    fields: dict = {}
    why = reason
    if evaluation_file:
        scores = json.loads(Path(evaluation_file).read_text())
        candidate = scores.get("candidate") or {}
        summary = candidate.get("summary")
        if not isinstance(summary, dict):
            raise ConfigurationError(f"{evaluation_file}: no candidate.summary: not an evaluation of the evaluate task")
        gate_cfg = _gate_of(experiment, name, models.ws)
        champ = scores.get("champion") or {}
        champion = ({"version": champ["version"], "summary": champ.get("summary"), "error": champ.get("error")}
                    if champ.get("version") is not None else None)
        decision = decide(gate_cfg, summary, champion)
        if not decision.passed and not reason:
            raise ModelError(f"the gate refuses this evaluation: {decision.text}",
                             hint="give --reason to promote it all the same (recorded with the version)",
                             exit_code=2)
        fields["evaluation"] = {k: candidate.get(k) for k in ("dates", "dataset", "summary", "references")}
        fields["gate"] = {**decision.to_json(), "manual": True}
        why = why or f"manual, gate {decision.text}"
    source, data = check_source(models.ws, record)
    md = record.get("metadata") or {}
    new, number = models.promote(
        name, weights, alias=alias, why=why, local_copy=data, reason=reason, sha256=source.sha256,
        checkpoint={"site": source.site, "path": source.path, "size": source.size},
        training=record.get("training") or md.get("training"), run_id=md.get("run_id"),
        datasets=(md.get("dataset") or {}).get("names") if isinstance(md.get("dataset"), dict) else None, **fields)
    _notes(models)
    if as_json:
        _echo_json({"model": name, "version": number, "aliases": new.get("aliases"), "record": new["versions"][str(number)]})
        return
    click.echo(f"{name} v{number} <- checkpoint {weights} ({source.site}:{source.path}, sha256 {source.sha256[:12]})"
               + (f"; {alias} -> v{number}" if alias else ""))


def _gate_of(experiment: str | None, model: str, ws):
    from maelflow.config.models import Gate

    if not experiment:
        return Gate()
    from maelflow.cli.common import load_or_exit

    rx = load_or_exit(experiment, (), ws)
    for m in rx.experiment.models:
        if m.name == model:
            return m.gate
    from maelflow.errors import ConfigurationError

    raise ConfigurationError(f"experiment {experiment!r} has no model {model!r} "
                             f"(its models: {', '.join(m.name for m in rx.experiment.models) or 'none'})")


@command.command("alias")
@click.argument("name")
@click.argument("alias")
@click.argument("version", type=int)
@click.option("--reason", default=None, help="Why, recorded in the history.")
@workspace_option
@mirror_option
@json_option
def alias_(name: str, alias: str, version: int, reason: str | None, workspace: str | None, no_mirror: bool,
           as_json: bool) -> None:
    """Point ALIAS of model NAME at VERSION (recorded in the history)."""
    models = _models(workspace, no_mirror)
    record = models.move(name, alias, version, reason)
    _notes(models)
    if as_json:
        _echo_json({"model": name, "aliases": record.get("aliases"), "moved": (record.get("history") or [None])[-1]})
        return
    click.echo(f"{name}: {alias} -> v{version}")


@command.command("rollback")
@click.argument("name")
@click.argument("alias")
@click.option("--to", "version", type=int, default=None, help="This version instead of one step back.")
@click.option("--reason", default=None, help="Why, recorded in the history.")
@workspace_option
@mirror_option
@json_option
def rollback(name: str, alias: str, version: int | None, reason: str | None, workspace: str | None,
             no_mirror: bool, as_json: bool) -> None:
    """Move ALIAS of model NAME back one step (the version it named before its last move), or --to a version."""
    models = _models(workspace, no_mirror)
    record = models.rollback(name, alias, version, reason)
    _notes(models)
    moved = (record.get("history") or [None])[-1]
    if as_json:
        _echo_json({"model": name, "aliases": record.get("aliases"), "moved": moved})
        return
    click.echo(f"{name}: {alias} rolled back v{moved['from']} -> v{moved['to']}")


@command.command("history")
@click.argument("name")
@click.option("--alias", default=None, help="Only this alias's moves.")
@click.option("--at", default=None, help="Also say which version ALIAS named at this time (ISO 8601).")
@workspace_option
@json_option
def history(name: str, alias: str | None, at: str | None, workspace: str | None, as_json: bool) -> None:
    """Every alias move of model NAME, oldest first: when, alias, from, to, how, who, why."""
    from maelflow.errors import ConfigurationError

    models = _models(workspace)
    data = models.history(name, alias)
    if at:
        if not alias:
            raise ConfigurationError("--at needs --alias: which alias's version at that time")
        try:
            data["at"] = {"time": at, "version": models.resolve(name, alias, at)["version"]}
        except Exception as exc:  # noqa: BLE001 - a 404: the alias named nothing then
            from maelflow.errors import MaelflowError

            if not isinstance(exc, MaelflowError):
                raise
            data["at"] = {"time": at, "version": None, "why": exc.message}
    if as_json:
        _echo_json(data)
        return
    for h in data["history"]:
        frm = f"v{h['from']}" if h.get("from") is not None else "-"
        to = f"v{h['to']}" if h.get("to") is not None else "-"
        click.echo(f"{h['at'][:19]}  {h['alias']:<12} {frm:>4} -> {to:<4} {h['action']:<8} by {h.get('by') or '?'}"
                   + (f": {h['why']}" if h.get("why") else ""))
    if not data["history"]:
        click.echo("no alias moves")
    if at:
        v = data["at"]["version"]
        click.echo(f"at {at}: {alias} named " + (f"v{v}" if v is not None else "nothing"))


@command.command("mirror")
@click.argument("name")
@workspace_option
@json_option
def mirror(name: str, workspace: str | None, as_json: bool) -> None:
    """Bring MLflow's model registry in line with the catalogue's record of NAME (after a failed mirror)."""
    from maelflow.errors import ServiceFailure

    models = _models(workspace)
    done = models.mirror(name)
    if done is None:
        raise ServiceFailure("; ".join(models.notes) or "nothing mirrored")
    if as_json:
        _echo_json(done)
        return
    click.echo(f"{name}: MLflow has versions {', '.join(f'v{n}' for n in sorted(done['versions'], key=int))}; "
               f"aliases {', '.join(f'{a} -> v{done_v}' for a, done_v in sorted(done['aliases'].items())) or 'none'} "
               f"(MLflow version numbers)")

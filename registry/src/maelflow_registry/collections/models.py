"""Models: maelflow's own collection. A model is a promoted checkpoint, in numbered versions with aliases.

A version (``versions["3"] = {"weights": <uuid>, "promoted", "promoted_by", ...}``) never changes
once written: besides its checkpoint it may carry the checkpoint's content hash (``sha256``), where
the checkpoint lies (``checkpoint``), the training, run and datasets it came from, the evaluation
that let it through the gate (``evaluation``, ``gate``) or the written ``reason`` of a manual
promotion. An alias (``candidate``, ``production``) moves between versions, and every move is
appended to ``history`` (alias, from, to, action, at, by, why): an append-only record of which
version an alias named at any time (:func:`alias_at`), and the stack a ``rollback`` pops
(:func:`rollback_target`). A write of the whole entry that moves an alias without saying so gets
its history line added by the server (:meth:`Models.updating`); one that edits or drops a line of
the history is refused.

Promoting, moving an alias and rolling back are the changes a model gets (:func:`promote`,
:func:`set_alias`, :func:`rollback`, behind the models routes). Edge: checkpoint -promoted-vN-> model.
"""

from __future__ import annotations

import re
from datetime import datetime, timezone
from typing import Any

from maelflow_registry.collections.base import CatalogueView, Cell, Collection
from maelflow_registry.config import Settings
from maelflow_registry.errors import BadRequest, Conflict, NotFound, Unprocessable
from maelflow_registry.keys import check_key
from maelflow_registry.records import now_iso
from maelflow_registry.refs import Edges, first_key, metadata, ref

COLLECTION = "models"
# MLflow's alias rules (mlflow/utils/validation.py), so that every alias here can be mirrored there:
# letters, digits, '_' and '-', at most 255 characters; 'latest' and 'v<number>' are reserved
ALIAS_RE = re.compile(r"^[A-Za-z0-9_-]{1,255}$")
RESERVED_ALIAS = re.compile(r"^(latest|[vV]\d+)$")
ACTIONS = ("promote", "move", "rollback")
# what a version may carry besides its checkpoint (all optional; strings or objects as named)
VERSION_STRINGS = ("sha256", "training", "run_id", "reason", "description", "source")
VERSION_OBJECTS = ("evaluation", "gate", "checkpoint", "mlflow")


def alias_problem(alias: Any) -> str | None:
    """Why ``alias`` cannot be a model alias (here and in MLflow's registry); None when it can."""
    if not isinstance(alias, str) or not ALIAS_RE.match(alias):
        return f"model alias '{str(alias)[:40]}' must use letters, digits, '-' and '_' (at most 255)"
    if RESERVED_ALIAS.match(alias):
        return f"model alias '{alias}' is reserved ('latest' and 'v<number>' name versions in MLflow)"
    return None


def _history_problem(entry: Any, i: int) -> str | None:
    if not isinstance(entry, dict):
        return f"history[{i}] must be an object"
    if alias_problem(entry.get("alias")):
        return f"history[{i}]: {alias_problem(entry.get('alias'))}"
    for field in ("from", "to"):
        value = entry.get(field)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            return f"history[{i}].{field} must be a version number or null"
    if entry.get("action") not in ACTIONS:
        return f"history[{i}].action must be one of {', '.join(ACTIONS)}"
    if not isinstance(entry.get("at"), str):
        return f"history[{i}].at must be a time stamp"
    for field in ("by", "why"):
        if entry.get(field) is not None and not isinstance(entry.get(field), str):
            return f"history[{i}].{field} must be a string"
    return None


class Models(Collection):
    name = COLLECTION
    main_key = "name"
    title, singular = "Models", "Model"
    defaults = {"versions": dict, "aliases": dict}   # 'history' comes with the first alias move
    column, colour = 3, "#fae8ff"
    page = "model.html"
    list_headers = ("Name", "Versions", "Aliases", "Latest", "Alias moves", "Updated")

    def check(self, key: str, record: dict, old: dict | None, *, settings: Settings, creating: bool) -> None:
        versions, aliases = record.get("versions"), record.get("aliases")
        if not isinstance(versions, dict) or not isinstance(aliases, dict):
            raise Unprocessable("a model needs 'versions' (an object of number -> version) and 'aliases' "
                                "(an object of alias -> version number)")
        for number, version in versions.items():
            if not (isinstance(number, str) and number.isdigit() and not number.startswith("0")):
                raise Unprocessable(f"model version '{str(number)[:40]}' must be a positive whole number")
            if not isinstance(version, dict) or not isinstance(version.get("weights"), str):
                raise Unprocessable(f"model version {number} must be an object naming its checkpoint in 'weights'")
        for alias, number in aliases.items():
            if not isinstance(alias, str) or not alias or not alias.replace("-", "").replace("_", "").isalnum():
                raise Unprocessable(f"model alias '{str(alias)[:40]}' must use letters, digits, '-' and '_'")
            if str(number) not in versions:
                raise Unprocessable(f"alias '{alias}' points to version {str(number)[:20]}, which does not exist")
        for number, version in ((old or {}).get("versions") or {}).items():
            if versions.get(number) != version:
                raise Conflict(f"model version {number} is immutable: it cannot be changed or removed; "
                               "promote a new version and move the alias instead")
        history = record.get("history", [])
        if not isinstance(history, list):
            raise Unprocessable("a model's 'history' must be a list of alias moves")
        for i, entry in enumerate(history):
            problem = _history_problem(entry, i)
            if problem:
                raise Unprocessable(problem)
        before = (old or {}).get("history") or []
        if history[:len(before)] != before:
            raise Conflict("a model's alias history is append-only: its lines cannot be changed or removed")

    def updating(self, old: dict, new: dict) -> None:
        """A write that moved an alias without a history line of its own gets one (by: unknown)."""
        aliases_old = old.get("aliases") if isinstance(old.get("aliases"), dict) else {}
        aliases_new = new.get("aliases") if isinstance(new.get("aliases"), dict) else {}
        if "history" not in new and isinstance(old.get("history"), list):
            new["history"] = list(old["history"])  # a write of the entry without its history keeps it
        history = new.setdefault("history", [])
        if not isinstance(history, list):
            return  # check() says what is wrong
        added = history[len(old.get("history") or []):]
        for alias in sorted(set(aliases_old) | set(aliases_new)):
            before, after = aliases_old.get(alias), aliases_new.get(alias)
            if before == after or any(isinstance(h, dict) and h.get("alias") == alias and h.get("to") == after
                                      for h in added):
                continue
            history.append({"alias": alias, "from": before, "to": after, "action": "move", "at": now_iso(),
                            "by": None, "why": "changed by a write of the whole entry"})

    def edges(self, key: str, record: dict) -> list[tuple[str, str, str]]:
        out = Edges()
        versions = record.get("versions") if isinstance(record.get("versions"), dict) else {}
        for number, version in versions.items():
            uuid = first_key(version.get("weights")) if isinstance(version, dict) else None
            if uuid:
                out.add(ref("weights", uuid), f"promoted-v{number}", ref(self.name, key))
        return list(out)

    def label(self, key: str, record: dict) -> str:
        aliases = record.get("aliases") if isinstance(record.get("aliases"), dict) else {}
        if aliases:
            return f"{key} [{', '.join(f'{a}=v{v}' for a, v in sorted(aliases.items()))}]"
        return key

    def list_row(self, row: dict, index: Any) -> list[Cell]:
        rec, key = row["record"], row["key"]
        versions = rec.get("versions") or {}
        latest = max(versions, key=lambda n: int(n) if str(n).isdigit() else 0) if versions else None
        aliases = ", ".join(f"{a} → v{v}" for a, v in sorted((rec.get("aliases") or {}).items()))
        return [(key, self.link(key)), (len(versions), None), (aliases, None),
                (f"v{latest}: {versions[latest].get('weights')}" if latest else "", None),
                (len(rec.get("history") or []), None), (row["updated"][:19], None)]

    def page_context(self, key: str, record: dict, index: Any) -> dict:
        """Versions newest first with their scores, and the alias history as a timeline."""
        versions = record.get("versions") if isinstance(record.get("versions"), dict) else {}
        rows = []
        for number in sorted(versions, key=lambda n: -int(n) if str(n).isdigit() else 0):
            v = versions[number] if isinstance(versions[number], dict) else {}
            evaluation = v.get("evaluation") if isinstance(v.get("evaluation"), dict) else {}
            scores = evaluation.get("summary") if isinstance(evaluation.get("summary"), dict) else {}
            rows.append({"number": number, "weights": v.get("weights"), "promoted": v.get("promoted") or "",
                         "by": v.get("promoted_by") or "", "sha256": v.get("sha256") or "",
                         "training": v.get("training") or "", "scores": scores,
                         "decision": (v.get("gate") or {}).get("decision") if isinstance(v.get("gate"), dict) else None,
                         "reason": v.get("reason") or "",
                         "aliases": sorted(a for a, n in (record.get("aliases") or {}).items() if str(n) == number)})
        score_names = sorted({s for r in rows for s in r["scores"]})
        history = [h for h in (record.get("history") or []) if isinstance(h, dict)]
        return {"version_rows": rows, "score_names": score_names, "timeline": list(reversed(history))}


collection = Models()


# -- reading the history ----------------------------------------------------------------------------
def _parse_time(text: str, what: str = "time") -> datetime:
    try:
        stamp = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except (TypeError, ValueError):
        raise BadRequest(f"the {what} '{str(text)[:40]}' is not an ISO 8601 time (e.g. 2026-12-01T06:00:00Z)") from None
    return stamp if stamp.tzinfo else stamp.replace(tzinfo=timezone.utc)


def alias_at(record: dict, alias: str, when: str) -> int | None:
    """The version ``alias`` named at time ``when`` (ISO 8601), from the history; None before its first move."""
    at = _parse_time(when)
    number = None
    for entry in record.get("history") or []:
        if entry.get("alias") != alias:
            continue
        try:
            moved = _parse_time(entry.get("at"), "history time")
        except BadRequest:
            continue
        if moved > at:
            break
        number = entry.get("to")
    return number


def alias_stack(record: dict, alias: str) -> list[int]:
    """The versions ``alias`` was moved through, as a stack: a promotion or a move pushes, a
    rollback pops back to the version it names (or pushes it, when it was never there)."""
    stack: list[int] = []
    for entry in record.get("history") or []:
        if entry.get("alias") != alias:
            continue
        to = entry.get("to")
        if to is None:
            stack.clear()
        elif entry.get("action") == "rollback" and to in stack:
            del stack[len(stack) - 1 - stack[::-1].index(to) + 1:]
        else:
            stack.append(to)
    return stack


def rollback_target(record: dict, alias: str) -> int:
    """The version a one-step rollback of ``alias`` returns to: the one it named before its last move."""
    current = (record.get("aliases") or {}).get(alias)
    if current is None:
        raise NotFound(f"model '{record.get('name')}' has no alias '{alias}'")
    stack = alias_stack(record, alias)
    while stack and stack[-1] == current:
        stack.pop()
    if not stack:
        raise Conflict(f"alias '{alias}' of model '{record.get('name')}' has no earlier version to roll back to "
                       f"(it has only ever named v{current})")
    return stack[-1]


# -- changes ----------------------------------------------------------------------------------------
def _move(model: dict, alias: str, number: int | None, action: str, user: str, why: str | None) -> None:
    before = model["aliases"].get(alias)
    if number is None:
        model["aliases"].pop(alias, None)
    else:
        model["aliases"][alias] = number
    model.setdefault("history", []).append({"alias": alias, "from": before, "to": number, "action": action,
                                            "at": now_iso(), "by": user, "why": why})


def _check_alias(alias: str) -> None:
    problem = alias_problem(alias)
    if problem:
        raise BadRequest(problem)


def _version_fields(fields: dict | None) -> dict:
    out: dict[str, Any] = {}
    for name, value in (fields or {}).items():
        if value is None:
            continue
        if name in VERSION_STRINGS and isinstance(value, str):
            out[name] = value[:4000]
        elif name in VERSION_OBJECTS and isinstance(value, dict):
            out[name] = value
        elif name == "datasets" and isinstance(value, list) and all(isinstance(v, str) for v in value):
            out[name] = value
        else:
            raise BadRequest(f"'{name}' is not a field a model version may carry with that type "
                             f"(strings: {', '.join(VERSION_STRINGS)}; objects: {', '.join(VERSION_OBJECTS)}; "
                             "datasets: a list of names)")
    return out


def promote(catalogue: CatalogueView, name: str, weights: str, *, user: str, role: str | None,
            description: str | None = None, alias: str | None = None, why: str | None = None,
            fields: dict | None = None) -> tuple[dict, int]:
    """A new immutable version of model ``name`` made from the registered checkpoint ``weights``.

    The checkpoint must be registered, and a content hash given with it must be the one registered
    for it: a version never names a source the catalogue cannot vouch for. Promoting a checkpoint
    that already is a version of the model makes no new version (the same content is the same
    version); the alias, if given, then moves to it. The answer's ``_promoted`` is the version number.
    """
    check_key(name, "model name")
    check_key(weights, "checkpoint uuid")
    if alias is not None:
        _check_alias(alias)
    extra = _version_fields(fields)
    if description:
        extra["description"] = description
    row = catalogue.index.get("weights", weights)
    if row is None:
        raise Unprocessable(f"checkpoint '{weights}' is not registered: register it (weights) before "
                            "promoting it to a model")
    import json

    registered = metadata(json.loads(row["record"])).get("sha256")
    if extra.get("sha256") and isinstance(registered, str) and registered != extra["sha256"]:
        raise Unprocessable(f"checkpoint '{weights}' is registered with SHA-256 {registered[:16]}..., not "
                            f"{extra['sha256'][:16]}...: the file changed since it was registered")
    if isinstance(registered, str) and "sha256" not in extra:
        extra["sha256"] = registered
    promoted: dict[str, int] = {}

    def mutate(old: dict | None) -> dict:
        model = collection.add_defaults(old or {"name": name})
        same = [int(n) for n, v in model["versions"].items() if isinstance(v, dict) and v.get("weights") == weights]
        if same:
            number = same[0]
        else:
            number = max((int(n) for n in model["versions"] if str(n).isdigit()), default=0) + 1
            model["versions"][str(number)] = {"weights": weights, "promoted": now_iso(), "promoted_by": user, **extra}
        if alias and model["aliases"].get(alias) != number:
            _move(model, alias, number, "promote", user, why or extra.get("reason") or f"promoted v{number}")
        promoted["number"] = number
        return model

    new, version, _ = catalogue.write(COLLECTION, name, mutate, user=user, role=role)
    return {**new, "_promoted": promoted["number"]}, version


def _number(value: Any) -> int:
    if isinstance(value, bool):
        raise BadRequest("the version must be a whole number")
    try:
        return int(value)
    except (TypeError, ValueError):
        raise BadRequest("the body must be {\"version\": <number>[, \"reason\": \"...\"]}") from None


def set_alias(catalogue: CatalogueView, name: str, alias: str, number: Any, *, user: str,
              role: str | None, why: str | None = None) -> tuple[dict, int]:
    """Point ``alias`` of model ``name`` at an existing version, recording the move."""
    check_key(name, "model name")
    _check_alias(alias)
    number = _number(number)

    def mutate(old: dict | None) -> dict:
        model = collection.add_defaults(old)
        if str(number) not in model["versions"]:
            raise Unprocessable(f"alias '{alias}' cannot point to version {number}: model '{name}' has "
                                f"versions {', '.join(sorted(model['versions'], key=int)) or 'none'}")
        if model["aliases"].get(alias) != number:
            _move(model, alias, number, "move", user, why)
        return model

    new, version, _ = catalogue.write(COLLECTION, name, mutate, user=user, role=role, must_exist=True)
    return new, version


def rollback(catalogue: CatalogueView, name: str, alias: str, number: Any = None, *, user: str,
             role: str | None, why: str | None = None) -> tuple[dict, int]:
    """Move ``alias`` back one step (to the version it named before its last move), or to ``number``."""
    check_key(name, "model name")
    _check_alias(alias)
    target = None if number is None else _number(number)

    def mutate(old: dict | None) -> dict:
        model = collection.add_defaults(old)
        to = rollback_target(model, alias) if target is None else target
        if str(to) not in model["versions"]:
            raise Unprocessable(f"model '{name}' has no version {to} to roll back to")
        if model["aliases"].get(alias) == to:
            raise Conflict(f"alias '{alias}' of model '{name}' already names v{to}")
        _move(model, alias, to, "rollback", user, why or "rollback")
        return model

    new, version, _ = catalogue.write(COLLECTION, name, mutate, user=user, role=role, must_exist=True)
    return new, version

"""Models: promote a checkpoint to a new immutable version, move, roll back and resolve aliases.

Every alias move is appended to the model's history (who, when, from, to, why): ``GET
.../history`` reads it, and ``GET .../aliases/<alias>?at=<time>`` answers which version an alias
named at that time.
"""

from __future__ import annotations

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from maelflow_registry.api import API
from maelflow_registry.api.bodies import ERRORS, RECORD, json_body, record_response
from maelflow_registry.api.deps import Alias, CatalogueDep, Key, Reader, Writer
from maelflow_registry.collections import models
from maelflow_registry.errors import BadRequest, NotFound

router = APIRouter(prefix=f"{API}/{models.COLLECTION}", tags=["models"], responses=ERRORS)

_VERSION_PROPS = {**{f: {"type": "string"} for f in models.VERSION_STRINGS},
                  **{f: {"type": "object"} for f in models.VERSION_OBJECTS},
                  "datasets": {"type": "array", "items": {"type": "string"}}}
_MOVE_BODY = {"requestBody": {"required": True, "content": {"application/json": {"schema": {
    "type": "object", "required": ["version"], "properties": {"version": {"type": "integer"},
                                                              "reason": {"type": "string"}}}}}}}
_ROLLBACK_BODY = {"requestBody": {"required": False, "content": {"application/json": {"schema": {
    "type": "object", "properties": {"version": {"type": "integer"}, "reason": {"type": "string"}}}}}}}


def _optional_string(body: dict, field: str) -> str | None:
    value = body.get(field)
    if value is not None and not isinstance(value, str):
        raise BadRequest(f"'{field}' must be a string")
    return value


@router.post("/{name}/versions", status_code=201, responses=RECORD,
             openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": {
                 "type": "object", "required": ["weights"], "properties": {
                     "weights": {"type": "string"}, "description": {"type": "string"},
                     "alias": {"type": "string"}, "why": {"type": "string"}, **_VERSION_PROPS}}}}}})
async def promote(caller: Writer, cat: CatalogueDep, request: Request, name: Key) -> Response:
    """Promote a registered checkpoint to a new, immutable version of a model (write).

    Optional fields recorded with the version: its content hash (checked against the checkpoint's
    registered one), evaluation, gate decision, training, run, datasets, checkpoint location, the
    written reason of a manual promotion. ``alias`` moves that alias to the version (history: ``why``).
    """
    body = await json_body(request)
    if not isinstance(body, dict) or not isinstance(body.get("weights"), str):
        raise BadRequest("the body must be {\"weights\": \"<checkpoint uuid>\"[, \"description\", \"alias\", ...]}")
    alias, why, description = (_optional_string(body, f) for f in ("alias", "why", "description"))
    fields = {k: v for k, v in body.items() if k not in ("weights", "alias", "why", "description")}
    record, version = await run_in_threadpool(
        lambda: models.promote(cat, name, body["weights"], user=caller.name, role=caller.role, alias=alias,
                               description=description, why=why, fields=fields))
    return record_response(record, version, status=201)


@router.put("/{name}/aliases/{alias}", responses=RECORD, openapi_extra=_MOVE_BODY)
async def move_alias(caller: Writer, cat: CatalogueDep, request: Request, name: Key, alias: Alias) -> Response:
    """Point an alias (candidate, production...) at an existing version, recorded in the history (write)."""
    body = await json_body(request)
    if not isinstance(body, dict) or "version" not in body:
        raise BadRequest("the body must be {\"version\": <number>[, \"reason\": \"...\"]}")
    why = _optional_string(body, "reason")
    record, version = await run_in_threadpool(
        lambda: models.set_alias(cat, name, alias, body["version"], user=caller.name, role=caller.role, why=why))
    return record_response(record, version)


@router.post("/{name}/aliases/{alias}/rollback", responses=RECORD, openapi_extra=_ROLLBACK_BODY)
async def rollback_alias(caller: Writer, cat: CatalogueDep, request: Request, name: Key, alias: Alias) -> Response:
    """Move an alias back one step (to the version it named before its last move), or to ``version`` (write)."""
    raw = await request.body()
    body = await json_body(request) if raw.strip() else {}
    if not isinstance(body, dict):
        raise BadRequest("the body must be {} or {\"version\": <number>, \"reason\": \"...\"}")
    why = _optional_string(body, "reason")
    record, version = await run_in_threadpool(
        lambda: models.rollback(cat, name, alias, body.get("version"), user=caller.name, role=caller.role, why=why))
    return record_response(record, version)


@router.get("/{name}/aliases/{alias}")
async def resolve_alias(caller: Reader, cat: CatalogueDep, name: Key, alias: Alias,
                        at: str | None = Query(None, max_length=40,
                                               description="a time (ISO 8601): the version the alias named then")) -> dict:
    """The version an alias points at (now, or at time ``at``), with its checkpoint."""
    model = cat.record(models.COLLECTION, name)
    number = (model.get("aliases") or {}).get(alias) if at is None else models.alias_at(model, alias, at)
    if number is None:
        raise NotFound(f"model '{name}' has no alias '{alias}'" + (f" at {at}" if at else ""))
    found = (model.get("versions") or {}).get(str(number))
    if not isinstance(found, dict):
        raise NotFound(f"model '{name}': alias '{alias}' names version {number}, which is not recorded")
    return {"model": name, "alias": alias, "version": number, **({"at": at} if at else {}), **found}


@router.get("/{name}/history")
async def history(caller: Reader, cat: CatalogueDep, name: Key,
                  alias: str | None = Query(None, max_length=64, description="only this alias's moves")) -> dict:
    """Every alias move of a model, oldest first (append-only): alias, from, to, action, at, by, why."""
    model = cat.record(models.COLLECTION, name)
    moves = [h for h in model.get("history") or [] if alias is None or h.get("alias") == alias]
    return {"model": name, "aliases": model.get("aliases") or {}, "history": moves}

"""Models: promote a checkpoint to a new immutable version, move and resolve aliases."""

from __future__ import annotations

import re

from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from maelflow_registry.api import API
from maelflow_registry.api.bodies import ERRORS, RECORD, json_body, record_response
from maelflow_registry.api.deps import KEY_PATTERN, Alias, CatalogueDep, Key, Reader, Writer
from maelflow_registry.collections import models
from maelflow_registry.errors import BadRequest, NotFound

router = APIRouter(prefix=f"{API}/{models.COLLECTION}", tags=["models"], responses=ERRORS)


@router.post("/{name}/versions", status_code=201, responses=RECORD,
             openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": {
                 "type": "object", "required": ["weights"], "properties": {
                     "weights": {"type": "string"}, "description": {"type": "string"},
                     "alias": {"type": "string"}}}}}}})
async def promote(caller: Writer, cat: CatalogueDep, request: Request, name: Key) -> Response:
    """Promote a registered checkpoint to a new, immutable version of a model (write)."""
    body = await json_body(request)
    if not isinstance(body, dict) or not isinstance(body.get("weights"), str):
        raise BadRequest("the body must be {\"weights\": \"<checkpoint uuid>\"[, \"description\", \"alias\"]}")
    alias = body.get("alias")
    if alias is not None and (not isinstance(alias, str) or not re.match(KEY_PATTERN, alias)):
        raise BadRequest("'alias' must be a name of letters, digits, '.', '_' and '-'")
    description = body.get("description")
    record, version = await run_in_threadpool(
        lambda: models.promote(cat, name, body["weights"], user=caller.name, role=caller.role, alias=alias,
                               description=description if isinstance(description, str) else None))
    return record_response(record, version, status=201)


@router.put("/{name}/aliases/{alias}", responses=RECORD,
            openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": {
                "type": "object", "required": ["version"], "properties": {"version": {"type": "integer"}}}}}}})
async def move_alias(caller: Writer, cat: CatalogueDep, request: Request, name: Key, alias: Alias) -> Response:
    """Point an alias (candidate, operational...) at an existing version (write)."""
    body = await json_body(request)
    if not isinstance(body, dict) or "version" not in body:
        raise BadRequest("the body must be {\"version\": <number>}")
    record, version = await run_in_threadpool(
        lambda: models.set_alias(cat, name, alias, body["version"], user=caller.name, role=caller.role))
    return record_response(record, version)


@router.get("/{name}/aliases/{alias}")
async def resolve_alias(caller: Reader, cat: CatalogueDep, name: Key, alias: Alias) -> dict:
    """The version an alias points at, with its checkpoint."""
    model = cat.record(models.COLLECTION, name)
    number = model.get("aliases", {}).get(alias)
    if number is None:
        raise NotFound(f"model '{name}' has no alias '{alias}'")
    return {"model": name, "alias": alias, "version": number, **model["versions"][str(number)]}

"""Entries of every registered collection: the anemoi-registry protocol, plus bulk creation.

``GET/POST /api/v1/<collection>`` and ``GET/PUT/PATCH/DELETE /api/v1/<collection>/<key>``. Reads are
``async`` and go straight to SQLite (a primary-key lookup takes microseconds: no thread hop);
writes run in the thread pool, because they wait on S3. The hottest of them, a plain
``GET /<collection>/<key>``, is usually answered before routing by
:class:`maelflow_registry.app.FastLookups`, with the same answer.
"""

from __future__ import annotations

import json

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from maelflow_registry.api import API
from maelflow_registry.api.bodies import (ARRAY_BODY, ERRORS, OBJECT_BODY, PATCH_BODY, RECORD, json_body,
                                          parse_if_match, record_response)
from maelflow_registry.api.deps import CatalogueDep, CollectionName, Key, Reader, Writer
from maelflow_registry.errors import BadRequest

router = APIRouter(prefix=API, tags=["entries"], responses=ERRORS)

IfMatch = Header(None, alias="If-Match")


@router.post("/_bulk/{collection}", status_code=201, openapi_extra=ARRAY_BODY)
async def bulk(caller: Writer, cat: CatalogueDep, request: Request, collection: CollectionName) -> dict:
    """Create up to 5000 new entries at once (write); all or nothing."""
    body = await json_body(request)
    return await run_in_threadpool(
        lambda: cat.bulk_create(collection.value, body, user=caller.name, role=caller.role))


@router.get("/{collection}", responses={200: {
    "description": "matching entries", "content": {"application/json": {"schema": {
        "type": "array", "items": {"type": "object"}}}}}})
async def list_entries(caller: Reader, cat: CatalogueDep, request: Request, collection: CollectionName,
                       limit: int | None = Query(None, alias="_limit", ge=0, le=100000),
                       offset: int = Query(0, alias="_offset", ge=0, le=10**9)) -> Response:
    """Entries whose fields equal every ``field=value`` query parameter (exact match).

    A field is a top-level field, else the same name under ``metadata``; ``metadata.X`` names the
    nested one. An unknown field matches nothing. Parameters starting with ``_`` are options.
    """
    filters = {k: v for k, v in request.query_params.items() if not k.startswith("_")}
    if len(filters) > 20:
        raise BadRequest("at most 20 filters")
    texts = cat.list(collection.value, filters, limit, offset)
    return Response(content="[" + ",".join(texts) + "]", media_type="application/json")


@router.post("/{collection}", status_code=201, openapi_extra=OBJECT_BODY, responses={201: {
    "description": "the new entry", "content": {"application/json": {"schema": {"type": "object"}}}}})
async def create(caller: Writer, cat: CatalogueDep, request: Request, collection: CollectionName) -> Response:
    """Register a new entry (write); 409 if its key exists. Tasks get a uuid, status and timestamps."""
    body = await json_body(request)
    record, version = await run_in_threadpool(
        lambda: cat.create(collection.value, body, user=caller.name, role=caller.role))
    return record_response(record, version, status=201)


@router.get("/{collection}/{key}", responses=RECORD)
async def get_entry(caller: Reader, cat: CatalogueDep, collection: CollectionName, key: Key,
                    hidden: str | None = Query(None, alias="_")) -> Response:
    """One entry; ``_`` adds the server's fields (``_original``, ``_version``...). ETag is its version."""
    row = cat.row(collection.value, key)
    extra = None
    if hidden is not None:
        extra = {"_version": row["version"], "_created": row["created"], "_updated": row["updated"],
                 "_created_by": row["created_by"], "_updated_by": row["updated_by"],
                 "_original": json.loads(row["original"]) if row["original"] else None}
    return record_response(row["record"], row["version"], extra=extra)


@router.put("/{collection}/{key}", responses={**RECORD, 201: RECORD[200]}, openapi_extra=OBJECT_BODY)
async def replace(caller: Writer, cat: CatalogueDep, request: Request, collection: CollectionName, key: Key,
                  if_match: str | None = IfMatch) -> Response:
    """Create or replace an entry (write); with If-Match, only if its version is still that one."""
    expected = parse_if_match(if_match)
    body = await json_body(request)
    record, version, created = await run_in_threadpool(
        lambda: cat.replace(collection.value, key, body, user=caller.name, role=caller.role, if_match=expected))
    return record_response(record, version, status=201 if created else 200)


@router.patch("/{collection}/{key}", responses=RECORD, openapi_extra=PATCH_BODY)
async def patch(caller: Writer, cat: CatalogueDep, request: Request, collection: CollectionName, key: Key,
                if_match: str | None = IfMatch) -> Response:
    """Apply an RFC 6902 JSON patch atomically (write); a failed ``test`` is a 409. Returns the entry."""
    expected = parse_if_match(if_match)
    body = await json_body(request)
    record, version = await run_in_threadpool(
        lambda: cat.patch(collection.value, key, body, user=caller.name, role=caller.role, if_match=expected))
    return record_response(record, version)


@router.delete("/{collection}/{key}")
async def delete(caller: Writer, cat: CatalogueDep, collection: CollectionName, key: Key,
                 force: str | None = Query(None, description="accepted for the anemoi client; ignored"),
                 if_match: str | None = IfMatch) -> dict:
    """Delete an entry: admin (tasks: write). Refused for a protected entry or a dataset with copies."""
    expected = parse_if_match(if_match)
    return await run_in_threadpool(
        lambda: cat.delete(collection.value, key, user=caller.name, role=caller.role, if_match=expected))

"""How requests are read and answers written, and how the OpenAPI document describes both.

Request bodies are parsed here rather than by pydantic models so that malformed JSON, NaN, or a
wrong shape each get a 400 with a sentence, not a 500 and not a validation dump; their shapes are
still declared in the OpenAPI document (``openapi_extra``), so schemathesis exercises them.
Answers carrying an entry have ``ETag: "<version>"``, which ``If-Match`` sends back.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import Request
from fastapi.responses import Response

from maelflow_registry.catalogue import PATCH_OPS
from maelflow_registry.errors import BadRequest
from maelflow_registry.store import dumps


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON (send non-finite numbers as strings)")


async def json_body(request: Request) -> Any:
    raw = await request.body()
    if not raw.strip():
        raise BadRequest("the request needs a JSON body")
    try:
        return json.loads(raw, parse_constant=_refuse_constant)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise BadRequest(f"malformed JSON: {str(exc)[:200]}") from None


def parse_if_match(value: str | None) -> int | None:
    if value is None:
        return None
    text = value.strip()
    if text.startswith("W/"):
        text = text[2:]
    text = text.strip('"')
    if not text.isdigit() or len(text) > 12:
        raise BadRequest(f"If-Match must be an entry version as sent in ETag, e.g. \"3\"; got '{value[:40]}'")
    return int(text)


def record_response(record: Any, version: int, status: int = 200, extra: dict | None = None) -> Response:
    if isinstance(record, str) and not extra:
        body = record
    else:
        data = json.loads(record) if isinstance(record, str) else record
        if extra:
            data = {**data, **extra}
        body = dumps(data)
    return Response(content=body, media_type="application/json", status_code=status,
                    headers={"ETag": f'"{version}"'})


# -- OpenAPI descriptions of what the routes parse themselves -------------------------------------
ERROR_SCHEMA = {"type": "object", "properties": {"error": {"type": "string"}, "status": {"type": "integer"},
                                                 "message": {"type": "string"}},
                "required": ["error", "message"]}
ERRORS: dict[int | str, dict] = {
    code: {"description": text, "content": {"application/json": {"schema": ERROR_SCHEMA}}}
    for code, text in ((400, "bad request"), (401, "no or unknown token"), (403, "the token's role is too low"),
                       (404, "not found"), (409, "conflict"), (412, "version mismatch (If-Match)"),
                       (413, "body too large"), (422, "invalid entry or parameters"))}
OBJECT_BODY = {"requestBody": {"required": True, "content": {"application/json": {
    "schema": {"type": "object", "additionalProperties": True}}}}}
ARRAY_BODY = {"requestBody": {"required": True, "content": {"application/json": {
    "schema": {"type": "array", "items": {"type": "object", "additionalProperties": True}}}}}}
PATCH_BODY = {"requestBody": {"required": True, "content": {"application/json": {"schema": {
    "type": "array", "items": {"type": "object", "required": ["op", "path"], "properties": {
        "op": {"type": "string", "enum": list(PATCH_OPS)}, "path": {"type": "string"},
        "from": {"type": "string"}, "value": {}}}}}}}}
BYTES_BODY = {"requestBody": {"required": True, "content": {"application/octet-stream": {
    "schema": {"type": "string", "format": "binary"}}}}}
RECORD = {200: {"description": "the entry", "content": {"application/json": {"schema": {"type": "object"}}}}}

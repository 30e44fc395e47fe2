"""The HTTP service: the anemoi-registry REST API under ``/api/v1``, ``/settings``, and the web pages.

Design choices, and why:
- FastAPI, because its OpenAPI document (``/openapi.json``) is generated from the routes themselves,
  so schemathesis tests exactly what runs. Request bodies are parsed here rather than by pydantic
  models so that malformed JSON, NaN, or a wrong shape each get a 400 with a sentence, not a 500
  and not a validation dump; their shapes are still declared in the OpenAPI document.
- Reads are ``async`` and go straight to SQLite (a primary-key lookup takes microseconds: no thread
  hop); writes run in the thread pool, because they wait on S3.
- Every request error is a 4xx JSON body ``{"error", "status", "message"}``; the anemoi client retries
  5xx for an hour, so an unexpected exception is the only thing allowed to become a 500.
- Pure ASGI middleware normalises ``//`` (the client's ``entry`` command sends ``/api/v1//datasets/x``)
  and refuses bodies over the size limit before the application reads them.
"""

from __future__ import annotations

import enum
import json
import logging
import re
from typing import Any, Callable

from fastapi import FastAPI, Header, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from maelflow_registry import __version__
from maelflow_registry.auth import TokenInfo, hash_token, role_allows
from maelflow_registry.catalogue import PATCH_OPS, Catalogue
from maelflow_registry.config import Settings
from maelflow_registry.errors import BadRequest, CatalogueError, Forbidden, NotFound, TooLarge, Unauthorized
from maelflow_registry.keys import COLLECTIONS, check_artefact_path
from maelflow_registry.store import dumps

LOG = logging.getLogger("maelflow_registry")
API = "/api/v1"
KEY_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"

Collection = enum.Enum("Collection", {c: c for c in COLLECTIONS}, type=str)


class Context:
    """What the routes share: the catalogue, and the settings/tokens files watched for changes."""

    def __init__(self, catalogue: Catalogue, settings: Callable[[], Settings], tokens: Callable[[], dict],
                 s3_endpoint: str | None = None):
        self.catalogue = catalogue
        self.settings = settings
        self.tokens = tokens
        self.s3_endpoint = s3_endpoint

    def identify(self, request: Request, cookies: bool = False) -> tuple[str | None, str]:
        """(role, name) of the caller; (None, 'anonymous') without a token. 'Bearer None' is no token."""
        header = request.headers.get("authorization")
        token = None
        if header:
            scheme, _, value = header.partition(" ")
            if scheme.lower() != "bearer":
                raise Unauthorized("use 'Authorization: Bearer <token>'")
            value = value.strip()
            if value and value not in ("None", "null"):
                token = value
        if token is None and cookies:
            token = request.cookies.get("catalogue_token") or None
        if token is None:
            return None, "anonymous"
        info: TokenInfo | None = self.tokens().get(hash_token(token))
        if info is None:
            raise Unauthorized("unknown or revoked token")
        return info.role, info.name

    def require(self, request: Request, needed: str, cookies: bool = False) -> tuple[str | None, str]:
        role, name = self.identify(request, cookies=cookies)
        if needed == "read" and role is None and self.settings().anonymous_read:
            return role, name
        if role is None:
            raise Unauthorized(f"this needs a token with the '{needed}' role: send 'Authorization: Bearer <token>' "
                               f"(an operator creates one with: maelflow catalogue token create --role {needed})")
        if not role_allows(role, needed):
            raise Forbidden(f"this token has the '{role}' role; this request needs '{needed}'")
        return role, name


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


class BodyLimit:
    """ASGI middleware: refuse a body over the limit (413) before the app sees it; squash '//' in paths."""

    def __init__(self, app, limits: Callable[[str], int]):
        self.app = app
        self.limits = limits

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        if "//" in path:
            scope = dict(scope, path=re.sub(r"/{2,}", "/", path))
        limit = self.limits(scope["path"])
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                return await _send_error(send, BadRequest("Content-Length is not a number"))
            if size > limit:
                # read what the client is sending anyway (up to a cap): most clients send the whole body
                # before reading the answer and would see a reset connection instead of the 413
                if size <= DRAIN_CAP:
                    await _drain(receive)
                return await _send_error(send, TooLarge(f"the body is {size} bytes; the limit is {limit}"))
        received = 0
        chunks: list[dict] = []
        # read (and count) the whole body first: a chunked upload cannot declare its length
        while True:
            message = await receive()
            if message["type"] != "http.request":
                chunks.append(message)
                break
            received += len(message.get("body", b""))
            if received > limit:
                if message.get("more_body"):
                    await _drain(receive, DRAIN_CAP - received)
                return await _send_error(send, TooLarge(f"the body exceeds the limit of {limit} bytes"))
            chunks.append(message)
            if not message.get("more_body"):
                break

        async def replay():
            if chunks:
                return chunks.pop(0)
            return await receive()

        return await self.app(scope, replay, send)


DRAIN_CAP = 256 * 1024**2


async def _drain(receive, budget: int = DRAIN_CAP) -> None:
    while budget > 0:
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body"):
            return
        budget -= len(message.get("body", b""))


async def _send_error(send, error: CatalogueError) -> None:
    body = json.dumps(error.to_json()).encode()
    await send({"type": "http.response.start", "status": error.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


def create_app(ctx: Context) -> FastAPI:
    app = FastAPI(title="maelflow catalogue", version=__version__,
                  description="Datasets, experiments, trainings, checkpoints (weights), models and tasks, "
                              "with lineage. Compatible with the anemoi-registry 0.3.4 client.")
    app.state.ctx = ctx
    cat = ctx.catalogue

    # -- errors ----------------------------------------------------------------------------------
    @app.exception_handler(CatalogueError)
    async def catalogue_error(request: Request, exc: CatalogueError):
        if request.url.path.startswith(API) or request.method != "GET" or "html" not in request.headers.get("accept", ""):
            return JSONResponse(exc.to_json(), status_code=exc.status)
        from maelflow_registry.web import error_page

        return error_page(request, exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        problems = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err.get("loc", ()))
            problems.append(f"{where}: {err.get('msg')}")
        return JSONResponse({"error": "invalid request", "status": 422,
                             "message": "; ".join(problems)[:1000] or "invalid request"}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        message = {404: f"no such page or API path: {request.url.path[:200]}",
                   405: f"{request.method} is not allowed on {request.url.path[:200]}"}.get(exc.status_code,
                                                                                         str(exc.detail))
        return JSONResponse({"error": str(exc.detail).lower(), "status": exc.status_code, "message": message},
                            status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):  # pragma: no cover - a bug if reached
        LOG.exception("unexpected error on %s %s", request.method, request.url.path)
        return JSONResponse({"error": "internal error", "status": 500,
                             "message": f"{type(exc).__name__}: the server failed; see the catalogue log"},
                            status_code=500)

    # -- service ---------------------------------------------------------------------------------
    @app.get("/health", tags=["service"], responses=ERRORS)
    async def health() -> dict:
        """Liveness, for ``maelflow services status``; 'rebuilding' while the index is read back from S3."""
        return {"status": "ok" if cat.ready.is_set() else "rebuilding", "version": __version__}

    @app.get("/settings", tags=["service"], responses=ERRORS)
    async def settings(request: Request) -> dict:
        """What the anemoi-registry client fetches first (anonymously): API URL and S3 URI patterns."""
        s = ctx.settings()
        base = str(request.base_url).rstrip("/")
        return {"registry": {
            "api_url": base + API, "web_url": base,
            "datasets_uri_pattern": f"s3://{s.datasets_bucket}/datasets/{{name}}.zarr",
            "datasets_platform": s.datasets_platform,
            "weights_uri_pattern": f"s3://{s.bucket}/artefacts/weights/{{uuid}}.ckpt",
            "weights_platform": s.weights_platform,
            "plots_uri_pattern": f"s3://{s.bucket}/artefacts/plots/{{expver}}/{{basename}}",
            "artefacts_uri_base": f"s3://{s.bucket}/artefacts/experiments",
        }, "catalogue": {"version": __version__, "anonymous_read": s.anonymous_read,
                         "s3_endpoint_url": ctx.s3_endpoint, "collections": list(COLLECTIONS)}}

    @app.get(API + "/_whoami", tags=["service"], responses=ERRORS)
    async def whoami(request: Request) -> dict:
        """The role of the token sent (null when anonymous)."""
        role, name = ctx.identify(request)
        return {"role": role, "name": name}

    @app.post(API + "/_admin/rebuild-index", tags=["service"], responses=ERRORS)
    async def rebuild_index(request: Request) -> dict:
        """Drop the index and read it back from S3 (admin)."""
        ctx.require(request, "admin")
        return {"entries": await run_in_threadpool(cat.rebuild)}

    # -- lineage ---------------------------------------------------------------------------------
    @app.get(API + "/lineage/{collection}/{key}", tags=["lineage"], responses=ERRORS)
    async def lineage_of(request: Request, collection: Collection,
                         key: str = Path(max_length=200, pattern=KEY_PATTERN),
                         depth: int = Query(4, ge=0, le=10)) -> dict:
        """The lineage graph around one entry: nodes and upstream -> downstream edges."""
        ctx.require(request, "read")
        return cat.lineage(collection.value, key, depth).to_json()

    @app.get(API + "/lineage/{ident}", tags=["lineage"], responses=ERRORS)
    async def lineage_find(request: Request, ident: str = Path(max_length=260),
                           depth: int = Query(4, ge=0, le=10)) -> dict:
        """The lineage of an entry named by key, ``collection:key`` or a training's run_id."""
        ctx.require(request, "read")
        found = cat.find(ident)
        if not found:
            raise NotFound(f"no entry is called '{ident}' in any collection")
        if len(found) > 1:
            raise CatalogueErrorMany(ident, found)
        return cat.lineage(found[0][0], found[0][1], depth).to_json()

    # -- artefacts -------------------------------------------------------------------------------
    @app.put(API + "/artefacts/{path:path}", tags=["artefacts"], responses=ERRORS, openapi_extra=BYTES_BODY)
    async def put_artefact(request: Request, path: str) -> dict:
        """Store a file (plot, config snapshot...) under ``s3://<bucket>/artefacts/<path>`` (write)."""
        ctx.require(request, "write")
        check_artefact_path(path)
        body = await request.body()
        ctype = request.headers.get("content-type", "application/octet-stream")[:100]
        await run_in_threadpool(cat.store.put_artefact, path, body, ctype)
        return {"path": path, "size": len(body), "url": f"s3://{cat.store.bucket}/artefacts/{path}"}

    @app.get(API + "/artefacts/{path:path}", tags=["artefacts"], responses=ERRORS)
    async def get_artefact(request: Request, path: str) -> Response:
        """A stored artefact's bytes."""
        ctx.require(request, "read")
        check_artefact_path(path)
        found = await run_in_threadpool(cat.store.get_artefact, path)
        if found is None:
            raise NotFound(f"no artefact '{path}'")
        return Response(content=found[0], media_type=found[1])

    # -- models ----------------------------------------------------------------------------------
    @app.post(API + "/models/{name}/versions", tags=["models"], status_code=201, responses={**ERRORS, **RECORD},
              openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": {
                  "type": "object", "required": ["weights"], "properties": {
                      "weights": {"type": "string"}, "description": {"type": "string"},
                      "alias": {"type": "string"}}}}}}})
    async def promote(request: Request, name: str = Path(max_length=200, pattern=KEY_PATTERN)) -> Response:
        """Promote a registered checkpoint to a new, immutable version of a model (write)."""
        role, user = ctx.require(request, "write")
        body = await json_body(request)
        if not isinstance(body, dict) or not isinstance(body.get("weights"), str):
            raise BadRequest("the body must be {\"weights\": \"<checkpoint uuid>\"[, \"description\", \"alias\"]}")
        alias = body.get("alias")
        if alias is not None and (not isinstance(alias, str) or not re.match(KEY_PATTERN, alias)):
            raise BadRequest("'alias' must be a name of letters, digits, '.', '_' and '-'")
        description = body.get("description")
        record, version = await run_in_threadpool(
            lambda: cat.promote(name, body["weights"], user=user, role=role, alias=alias,
                                description=description if isinstance(description, str) else None))
        return record_response(record, version, status=201)

    @app.put(API + "/models/{name}/aliases/{alias}", tags=["models"], responses={**ERRORS, **RECORD},
             openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": {
                 "type": "object", "required": ["version"], "properties": {"version": {"type": "integer"}}}}}}})
    async def move_alias(request: Request, name: str = Path(max_length=200, pattern=KEY_PATTERN),
                         alias: str = Path(max_length=64, pattern=KEY_PATTERN)) -> Response:
        """Point an alias (candidate, operational...) at an existing version (write)."""
        role, user = ctx.require(request, "write")
        body = await json_body(request)
        if not isinstance(body, dict) or "version" not in body:
            raise BadRequest("the body must be {\"version\": <number>}")
        record, version = await run_in_threadpool(
            lambda: cat.set_alias(name, alias, body["version"], user=user, role=role))
        return record_response(record, version)

    @app.get(API + "/models/{name}/aliases/{alias}", tags=["models"], responses=ERRORS)
    async def resolve_alias(request: Request, name: str = Path(max_length=200, pattern=KEY_PATTERN),
                            alias: str = Path(max_length=64, pattern=KEY_PATTERN)) -> dict:
        """The version an alias points at, with its checkpoint."""
        ctx.require(request, "read")
        model = cat.record("models", name)
        number = model.get("aliases", {}).get(alias)
        if number is None:
            raise NotFound(f"model '{name}' has no alias '{alias}'")
        return {"model": name, "alias": alias, "version": number, **model["versions"][str(number)]}

    # -- bulk ------------------------------------------------------------------------------------
    @app.post(API + "/_bulk/{collection}", tags=["entries"], status_code=201, responses=ERRORS,
              openapi_extra=ARRAY_BODY)
    async def bulk(request: Request, collection: Collection) -> dict:
        """Create up to 5000 new entries at once (write); all or nothing."""
        role, user = ctx.require(request, "write")
        body = await json_body(request)
        return await run_in_threadpool(lambda: cat.bulk_create(collection.value, body, user=user, role=role))

    # -- collections (the anemoi-registry protocol) ------------------------------------------------
    @app.get(API + "/{collection}", tags=["entries"], responses={**ERRORS, 200: {
        "description": "matching entries", "content": {"application/json": {"schema": {
            "type": "array", "items": {"type": "object"}}}}}})
    async def list_entries(request: Request, collection: Collection,
                           limit: int | None = Query(None, alias="_limit", ge=0, le=100000),
                           offset: int = Query(0, alias="_offset", ge=0, le=10**9)) -> Response:
        """Entries whose fields equal every ``field=value`` query parameter (exact match).

        A field is a top-level field, else the same name under ``metadata``; ``metadata.X`` names the
        nested one. An unknown field matches nothing. Parameters starting with ``_`` are options.
        """
        ctx.require(request, "read")
        filters = {k: v for k, v in request.query_params.items() if not k.startswith("_")}
        if len(filters) > 20:
            raise BadRequest("at most 20 filters")
        texts = cat.list(collection.value, filters, limit, offset)
        return Response(content="[" + ",".join(texts) + "]", media_type="application/json")

    @app.post(API + "/{collection}", tags=["entries"], status_code=201, responses={**ERRORS, 201: {
        "description": "the new entry", "content": {"application/json": {"schema": {"type": "object"}}}}},
              openapi_extra=OBJECT_BODY)
    async def create(request: Request, collection: Collection) -> Response:
        """Register a new entry (write); 409 if its key exists. Tasks get a uuid, status and timestamps."""
        role, user = ctx.require(request, "write")
        body = await json_body(request)
        record, version = await run_in_threadpool(
            lambda: cat.create(collection.value, body, user=user, role=role))
        return record_response(record, version, status=201)

    @app.get(API + "/{collection}/{key}", tags=["entries"], responses={**ERRORS, **RECORD})
    async def get_entry(request: Request, collection: Collection,
                        key: str = Path(max_length=200, pattern=KEY_PATTERN),
                        hidden: str | None = Query(None, alias="_")) -> Response:
        """One entry; ``_`` adds the server's fields (``_original``, ``_version``...). ETag is its version."""
        ctx.require(request, "read")
        row = cat.row(collection.value, key)
        extra = None
        if hidden is not None:
            extra = {"_version": row["version"], "_created": row["created"], "_updated": row["updated"],
                     "_created_by": row["created_by"], "_updated_by": row["updated_by"],
                     "_original": json.loads(row["original"]) if row["original"] else None}
        return record_response(row["record"], row["version"], extra=extra)

    @app.put(API + "/{collection}/{key}", tags=["entries"], responses={**ERRORS, **RECORD, 201: RECORD[200]},
             openapi_extra=OBJECT_BODY)
    async def replace(request: Request, collection: Collection,
                      key: str = Path(max_length=200, pattern=KEY_PATTERN),
                      if_match: str | None = Header(None, alias="If-Match")) -> Response:
        """Create or replace an entry (write); with If-Match, only if its version is still that one."""
        role, user = ctx.require(request, "write")
        expected = parse_if_match(if_match)
        body = await json_body(request)
        record, version, created = await run_in_threadpool(
            lambda: cat.replace(collection.value, key, body, user=user, role=role, if_match=expected))
        return record_response(record, version, status=201 if created else 200)

    @app.patch(API + "/{collection}/{key}", tags=["entries"], responses={**ERRORS, **RECORD},
               openapi_extra=PATCH_BODY)
    async def patch(request: Request, collection: Collection,
                    key: str = Path(max_length=200, pattern=KEY_PATTERN),
                    if_match: str | None = Header(None, alias="If-Match")) -> Response:
        """Apply an RFC 6902 JSON patch atomically (write); a failed ``test`` is a 409. Returns the entry."""
        role, user = ctx.require(request, "write")
        expected = parse_if_match(if_match)
        body = await json_body(request)
        record, version = await run_in_threadpool(
            lambda: cat.patch(collection.value, key, body, user=user, role=role, if_match=expected))
        return record_response(record, version)

    @app.delete(API + "/{collection}/{key}", tags=["entries"], responses=ERRORS)
    async def delete(request: Request, collection: Collection,
                     key: str = Path(max_length=200, pattern=KEY_PATTERN),
                     force: str | None = Query(None, description="accepted for the anemoi client; ignored"),
                     if_match: str | None = Header(None, alias="If-Match")) -> dict:
        """Delete an entry: admin (tasks: write). Refused for a protected entry or a dataset with copies."""
        role, user = ctx.require(request, "write")
        expected = parse_if_match(if_match)
        return await run_in_threadpool(
            lambda: cat.delete(collection.value, key, user=user, role=role, if_match=expected))

    from maelflow_registry import web

    web.add_routes(app, ctx)
    return app


class CatalogueErrorMany(CatalogueError):
    status, title = 409, "ambiguous"

    def __init__(self, ident: str, found: list[tuple[str, str]]):
        super().__init__(f"'{ident}' names {len(found)} entries; say which with collection/key",
                         candidates=[f"{c}/{k}" for c, k in found])


class FastLookups:
    """ASGI middleware answering the hottest request, ``GET /api/v1/<collection>/<key>``, without routing.

    Only the plain success case is answered here (a safe key, read allowed, the entry found, no query
    string): anything else falls through to the FastAPI route, which gives the same answer with its
    full validation and error messages. It saves the router, parameter validation and response
    machinery: about a third of the server's CPU per lookup, which is what the bench's p99 measures.
    """

    LOOKUP = re.compile(r"^/api/v1/(datasets|experiments|weights|trainings|tasks|models)/([A-Za-z0-9][A-Za-z0-9._-]{0,199})$")

    def __init__(self, app, ctx: Context):
        self.app = app
        self.ctx = ctx

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] == "GET" and not scope.get("query_string"):
            match = self.LOOKUP.match(scope["path"])
            if match and ".." not in match.group(2):
                row = self._lookup(scope, match.group(1), match.group(2))
                if row is not None:
                    body = row["record"].encode()
                    await send({"type": "http.response.start", "status": 200, "headers": [
                        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                        (b"etag", f'"{row["version"]}"'.encode())]})
                    await send({"type": "http.response.body", "body": body})
                    return
        await self.app(scope, receive, send)

    def _lookup(self, scope, collection: str, key: str) -> dict | None:
        auth = None
        for name, value in scope.get("headers") or []:
            if name == b"authorization":
                auth = value.decode("latin-1")
                break
        if auth is None or auth in ("Bearer None", "Bearer null", "Bearer"):
            if not self.ctx.settings().anonymous_read:
                return None
        else:
            scheme, _, token = auth.partition(" ")
            if scheme.lower() != "bearer" or self.ctx.tokens().get(hash_token(token.strip())) is None:
                return None
        return self.ctx.catalogue.index.get(collection, key)


class NotReady:
    """ASGI middleware: while the index is rebuilt from S3, answer 503 + Retry-After (except /health).

    A half-built index would give wrong answers (an entry "not found" that exists); 503 is the one
    answer clients are told to retry, and the anemoi-registry client does.
    """

    def __init__(self, app, catalogue: Catalogue):
        self.app = app
        self.catalogue = catalogue

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and not self.catalogue.ready.is_set() and scope.get("path") != "/health":
            body = json.dumps({"error": "rebuilding", "status": 503,
                               "message": "the index is being rebuilt from S3; retry in a few seconds"}).encode()
            await send({"type": "http.response.start", "status": 503, "headers": [
                (b"content-type", b"application/json"), (b"retry-after", b"5"),
                (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
            return
        await self.app(scope, receive, send)


def body_limits(settings: Callable[[], Settings]) -> Callable[[str], int]:
    def limit(path: str) -> int:
        s = settings()
        return s.max_artefact_bytes if path.startswith(API + "/artefacts/") else s.max_body_bytes

    return limit


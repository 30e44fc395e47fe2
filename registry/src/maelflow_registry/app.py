"""The HTTP service assembled: routers, error answers, and the ASGI layers in front of them.

Design choices, and why:
- FastAPI, because its OpenAPI document (``/openapi.json``) is generated from the routes themselves,
  so schemathesis tests exactly what runs. The routes are ``APIRouter``s per resource
  (:mod:`maelflow_registry.api`, :mod:`maelflow_registry.web`); auth is a dependency of each.
- Every request error is a 4xx JSON body ``{"error", "status", "message"}``; the anemoi client retries
  5xx for an hour, so an unexpected exception is the only thing allowed to become a 500.
- Pure ASGI middleware normalises ``//`` (the client's ``entry`` command sends ``/api/v1//datasets/x``),
  authenticates writes and refuses bodies over the size limit before anything reads them (so an
  anonymous caller cannot make the server hold 256 MiB), answers 503 while the index is rebuilt,
  and answers the hottest request (a lookup by key) without routing.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from maelflow_registry import __version__, collections, web
from maelflow_registry.api import API, admin, artefacts, entries, lineage, models, service
from maelflow_registry.api.deps import Context, authorise, identify
from maelflow_registry.catalogue import Catalogue
from maelflow_registry.config import Settings
from maelflow_registry.errors import BadRequest, CatalogueError, TooLarge

LOG = logging.getLogger("maelflow_registry")


def create_app(ctx: Context) -> FastAPI:
    app = FastAPI(title="maelflow catalogue", version=__version__,
                  description="Datasets, experiments, trainings, checkpoints (weights), models and tasks, "
                              "with lineage. Compatible with the anemoi-registry 0.3.4 client.")
    app.state.ctx = ctx

    @app.exception_handler(CatalogueError)
    async def catalogue_error(request: Request, exc: CatalogueError):
        if request.url.path.startswith(API) or request.method != "GET" or "html" not in request.headers.get("accept", ""):
            return JSONResponse(exc.to_json(), status_code=exc.status)
        return web.error_page(request, exc)

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

    # Specific paths first: /api/v1/{collection}/{key} would otherwise claim /api/v1/lineage/x. The
    # routers' routes (prefix, tags and responses already applied) join the application's own list
    # rather than going through include_router: FastAPI 0.165 keeps an included router as a nested
    # one, and walking seven of them cost ~30 us of a ~120 us routed request.
    for module in (service, admin, lineage, artefacts, models, entries, web):
        app.router.routes.extend(module.router.routes)
    web.mount_static(app)
    return app


def asgi(ctx: Context) -> Any:
    """The application behind its ASGI layers: write auth and size limit, not-ready answer, fast lookups."""
    return BodyLimit(NotReady(FastLookups(create_app(ctx), ctx), ctx.catalogue), body_limits(ctx.settings),
                     authenticate=writer_check(ctx))


WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def writer_check(ctx: Context) -> Callable[[dict], None]:
    """Raise 401/403 unless a request's token may write (the routes then check the exact role)."""
    def check(scope: dict) -> None:
        auth = None
        for name, value in scope.get("headers") or []:
            if name == b"authorization":
                auth = value.decode("latin-1")
                break
        authorise(identify(auth, ctx.tokens), "write", ctx.settings)

    return check


class BodyLimit:
    """ASGI middleware in front of everything that reads a body; squashes '//' in paths.

    A write to the API (POST, PUT, PATCH, DELETE under ``/api/v1``) is authenticated here, from its
    headers, before a byte of its body is read: an anonymous or read-only caller gets its 401/403
    at once, whatever it sends, and the body is only drained (read and dropped, a chunk at a time,
    up to a cap) so that the client sees the answer rather than a reset connection. A body over the
    path's limit is refused (413) the same way. Entry bodies (16 MiB at most) are then read whole
    before the application sees them; an artefact upload (up to 256 MiB) is passed through with its
    size counted, and the route streams it to a temporary file, so no request holds it in memory.
    """

    def __init__(self, app, limits: Callable[[str], int], authenticate: Callable[[dict], None] | None = None):
        self.app = app
        self.limits = limits
        self.authenticate = authenticate

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        if "//" in path:
            scope = dict(scope, path=re.sub(r"/{2,}", "/", path))
        path = scope["path"]
        headers = dict(scope.get("headers") or [])
        if self.authenticate is not None and scope.get("method") in WRITE_METHODS and path.startswith(API + "/"):
            try:
                self.authenticate(scope)
            except CatalogueError as exc:
                return await _refuse(receive, send, exc, headers)
        limit = self.limits(path)
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                return await _refuse(receive, send, BadRequest("Content-Length is not a number"), headers, drain=False)
            if size > limit:
                return await _refuse(receive, send, TooLarge(f"the body is {size} bytes; the limit is {limit}"),
                                     headers, drain=size <= DRAIN_CAP)
        if streamed(path):
            return await self.app(scope, counted(receive, limit), send)
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
                return await _refuse(receive, send, TooLarge(f"the body exceeds the limit of {limit} bytes"),
                                     headers, drain=bool(message.get("more_body")), budget=DRAIN_CAP - received)
            chunks.append(message)
            if not message.get("more_body"):
                break

        async def replay():
            if chunks:
                return chunks.pop(0)
            return await receive()

        return await self.app(scope, replay, send)


DRAIN_CAP = 256 * 1024**2


def streamed(path: str) -> bool:
    """Paths whose body the route reads as a stream (artefacts), rather than the middleware whole."""
    return path.startswith(API + "/artefacts/")


def counted(receive, limit: int):
    """``receive`` that raises TooLarge (a 413 from the route) once the body passes ``limit``; the rest
    is drained first, up to a cap, so that the client reads the answer."""
    received = 0

    async def wrapped():
        nonlocal received
        message = await receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > limit:
                if message.get("more_body"):
                    await _drain(receive, DRAIN_CAP - received)
                raise TooLarge(f"the body exceeds the limit of {limit} bytes")
        return message

    return wrapped


async def _drain(receive, budget: int = DRAIN_CAP) -> None:
    while budget > 0:
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body"):
            return
        budget -= len(message.get("body", b""))


async def _refuse(receive, send, error: CatalogueError, headers: dict, *, drain: bool = True,
                  budget: int = DRAIN_CAP) -> None:
    """Answer ``error`` before reading the body, then drop what the client still sends (up to
    ``budget`` bytes, never kept) and close: most clients send their whole body before they read
    the answer, and would otherwise see a reset connection instead of it."""
    body = json.dumps(error.to_json()).encode()
    await send({"type": "http.response.start", "status": error.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    # a client waiting for "100 Continue" sends nothing more; asking for the body would send it one
    if not drain or headers.get(b"expect", b"").lower() == b"100-continue":
        await send({"type": "http.response.body", "body": body})
        return
    await send({"type": "http.response.body", "body": body, "more_body": True})
    await _drain(receive, budget)
    await send({"type": "http.response.body", "body": b""})


class FastLookups:
    """ASGI middleware answering the hottest request, ``GET /api/v1/<collection>/<key>``, without routing.

    Only the plain success case is answered here (a safe key, read allowed, the entry found, no query
    string): anything else falls through to the FastAPI route, which gives the same answer with its
    full validation and error messages. It saves the router, parameter validation and response
    machinery: about a third of the server's CPU per lookup, which is what the bench's p99 measures.
    """

    def __init__(self, app, ctx: Context):
        self.app = app
        self.ctx = ctx
        names = "|".join(re.escape(n) for n in collections.names())
        self.lookup = re.compile(rf"^{API}/({names})/([A-Za-z0-9][A-Za-z0-9._-]{{0,199}})$")

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] == "GET" and not scope.get("query_string"):
            match = self.lookup.match(scope["path"])
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
        try:
            authorise(identify(auth, self.ctx.tokens), "read", self.ctx.settings)
        except CatalogueError:
            return None  # the route gives the 401/403 with its message
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
    """The body limit of a path: artefacts may be larger than entries."""
    def limit(path: str) -> int:
        s = settings()
        return s.max_artefact_bytes if path.startswith(API + "/artefacts/") else s.max_body_bytes

    return limit


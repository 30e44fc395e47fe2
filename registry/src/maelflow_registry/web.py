"""Server-rendered pages: plain HTML, links and GET forms, so they work without any JavaScript.

Search, sorting and paging are query parameters (``?q=&sort=&order=&page=``): every view is a URL
that can be bookmarked, shared and fetched by a test. The lineage picture is an SVG drawn on the
server (:mod:`maelflow_registry.svg`). Pages read through the same auth as the API (the
``PageReader`` dependency); a browser, which cannot send a bearer header by itself, may log in with
a token kept in an HttpOnly cookie. Each registered collection gets a table and an entry page, drawn
by the templates its definition names, with the cells and extras it computes.
"""

from __future__ import annotations

import json
import math
import urllib.parse
from pathlib import Path as FsPath
from typing import Any

from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from starlette.concurrency import run_in_threadpool

from maelflow_registry import __version__, collections, svg
from maelflow_registry.api.deps import COOKIE, CatalogueDep, ContextDep, PageReader, identify
from maelflow_registry.catalogue import Catalogue
from maelflow_registry.collections import Collection
from maelflow_registry.collections.base import human_size
from maelflow_registry.errors import CatalogueError, NotFound
from maelflow_registry.index import ENTRY_SORTS, table_sorts
from maelflow_registry.keys import check_artefact_path, check_key

HERE = FsPath(__file__).parent
templates = Jinja2Templates(directory=str(HERE / "templates"))
PAGE_SIZE = 50
# a page answers errors as HTML for a browser (Accept: text/html) and as JSON otherwise
WEB_ERRORS: dict[int | str, dict] = {
    code: {"description": text, "content": {"text/html": {"schema": {"type": "string"}},
                                            "application/json": {"schema": {"type": "object"}}}}
    for code, text in ((400, "bad request"), (401, "no token while anonymous read is off"),
                       (404, "no such entry"), (422, "invalid parameters"))}

templates.env.filters["size"] = human_size
templates.env.filters["tojson_pretty"] = lambda v: json.dumps(v, indent=2, ensure_ascii=False, default=str)
templates.env.globals["version"] = __version__
templates.env.globals["collections"] = collections.all_collections()  # the navigation bar
templates.env.globals["titles"] = {c.name: c.title for c in collections.all_collections()}

router = APIRouter(tags=["web"], responses=WEB_ERRORS)

Search = Query("", max_length=200)
Order = Query("asc", pattern="^(asc|desc)$")
PageNumber = Query(1, ge=1, le=100000)


def mount_static(app: FastAPI) -> None:
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")


def pages(total: int, page: int) -> dict:
    count = max(1, math.ceil(total / PAGE_SIZE))
    return {"page": page, "pages": count, "total": total}


def error_page(request: Request, exc: CatalogueError) -> HTMLResponse:
    return templates.TemplateResponse(request, "error.html", {"error": exc, "title": exc.title},
                                      status_code=exc.status)


def lineage_svg(cat: Catalogue, collection: str, key: str) -> tuple[str, dict]:
    graph = cat.lineage(collection, key).to_json()
    return svg.render(graph), graph


@router.get("/", include_in_schema=False)
async def home() -> RedirectResponse:
    return RedirectResponse(f"/{collections.names()[0]}", status_code=303)


@router.get("/lineage/{collection}/{key}", response_class=HTMLResponse)
async def lineage_page(caller: PageReader, cat: CatalogueDep, request: Request, collection: str, key: str):
    """The lineage picture of one entry, and its edges as a table."""
    collections.get(collection)
    check_key(key)
    picture, graph = lineage_svg(cat, collection, key)
    return templates.TemplateResponse(request, "lineage.html", {
        "title": f"Lineage of {key}", "collection": collection, "key": key, "svg": picture, "graph": graph})


@router.get("/lineage/{collection}/{key}/picture.svg", responses={200: {
    "content": {"image/svg+xml": {"schema": {"type": "string"}}}}})
async def lineage_picture(caller: PageReader, cat: CatalogueDep, collection: str, key: str) -> Response:
    """The lineage picture alone, as SVG."""
    collections.get(collection)
    check_key(key)
    return Response(lineage_svg(cat, collection, key)[0], media_type="image/svg+xml")


# An artefact is a writer's file shown to every reader: in the browser it gets its own opaque origin
# (CSP sandbox: no script, no cookie, no form), and it may use only its own inline styles and
# data: images, so a report page (self-contained, see maelflow's benchmark report) renders whole
# while an uploaded page can neither run script as the catalogue nor reach anything else.
ARTEFACT_HEADERS = {
    "Content-Security-Policy": "sandbox; default-src 'none'; img-src data:; style-src 'unsafe-inline'",
    "X-Content-Type-Options": "nosniff",
}


@router.get("/artefacts/{path:path}", responses={200: {"content": {"text/html": {"schema": {"type": "string"}}}}})
async def artefact_page(caller: PageReader, cat: CatalogueDep, path: str) -> Response:
    """A stored artefact for the browser (a benchmark report page, a plot), sandboxed."""
    check_artefact_path(path)
    found = await run_in_threadpool(cat.store.get_artefact, path)
    if found is None:
        raise NotFound(f"no artefact '{path}'")
    return Response(content=found[0], media_type=found[1], headers=ARTEFACT_HEADERS)


@router.get("/login", response_class=HTMLResponse, include_in_schema=False)
async def login_form(request: Request):
    return templates.TemplateResponse(request, "login.html", {"title": "Log in", "message": None})


@router.post("/login", response_class=HTMLResponse, include_in_schema=False)
async def login(request: Request, ctx: ContextDep):
    form = urllib.parse.parse_qs((await request.body()).decode(errors="replace"))
    token = (form.get("token") or [""])[0].strip()
    try:
        known = token and identify(f"Bearer {token}", ctx.tokens).role is not None
    except CatalogueError:
        known = False
    if not known:
        return templates.TemplateResponse(request, "login.html", {"title": "Log in",
                                                                 "message": "unknown or revoked token"},
                                          status_code=401)
    response = RedirectResponse(f"/{collections.names()[0]}", status_code=303)
    response.set_cookie(COOKIE, token, httponly=True, samesite="strict")
    return response


@router.get("/logout", include_in_schema=False)
async def logout() -> RedirectResponse:
    response = RedirectResponse(f"/{collections.names()[0]}", status_code=303)
    response.delete_cookie(COOKIE)
    return response


def _add_pages(coll: Collection) -> None:
    """The table and the entry page of one collection, and redirects from its other names."""

    async def list_page(caller: PageReader, cat: CatalogueDep, request: Request, q: str = Search,
                        sort: str = Query(coll.main_key if coll.table else "key", max_length=20),
                        order: str = Order, page: int = PageNumber):
        offset = (page - 1) * PAGE_SIZE
        if coll.table:
            sort = sort if sort in table_sorts(coll) else coll.main_key
            rows, total = cat.index.table_page(coll, q.strip(), sort, order == "desc", PAGE_SIZE, offset)
            context: dict[str, Any] = {"rows": rows, "columns": coll.table_headers}
        else:
            sort = sort if sort in ENTRY_SORTS else "key"
            found, total = cat.index.page(coll.name, q.strip(), sort, order == "desc", PAGE_SIZE, offset)
            context = {"headers": coll.list_headers, "rows": [coll.list_row(r, cat.index) for r in found]}
        template = coll.list_page or ("table.html" if coll.table else "entries.html")
        return templates.TemplateResponse(request, template, {
            "title": coll.title, "collection": coll.name, "q": q, "sort": sort, "order": order,
            **context, **pages(total, page)})

    async def entry_page(caller: PageReader, cat: CatalogueDep, request: Request, key: str):
        check_key(key)
        row = cat.row(coll.name, key)
        record = json.loads(row["record"])
        picture, graph = lineage_svg(cat, coll.name, key) if coll.lineage_on_page else (None, None)
        return templates.TemplateResponse(request, coll.page, {
            "title": coll.page_title(key), "collection": coll.name, "key": key, "record": record, "row": row,
            "svg": picture, "graph": graph, **coll.page_context(key, record, cat.index)})

    async def redirect() -> RedirectResponse:
        return RedirectResponse(f"/{coll.name}", status_code=303)

    list_page.__doc__ = f"The {coll.title.lower()} table: search (q), sort, pages."
    entry_page.__doc__ = f"One of the {coll.title.lower()}, with its lineage."
    router.add_api_route(f"/{coll.name}", list_page, methods=["GET"], response_class=HTMLResponse,
                         name=f"{coll.name}_page")
    router.add_api_route(f"/{coll.name}/{{key}}", entry_page, methods=["GET"], response_class=HTMLResponse,
                         name=f"{coll.name}_entry_page")
    for alias in coll.aliases:
        router.add_api_route(f"/{alias}", redirect, methods=["GET"], include_in_schema=False)


for _coll in collections.all_collections():
    _add_pages(_coll)

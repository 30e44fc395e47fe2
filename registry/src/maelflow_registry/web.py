"""Server-rendered pages: plain HTML, links and GET forms, so they work without any JavaScript.

Search, sorting and paging are query parameters (``?q=&sort=&order=&page=``): every view is a URL
that can be bookmarked, shared and fetched by a test. The lineage picture is an SVG drawn on the
server (:mod:`maelflow_registry.svg`). Pages read through the same auth as the API; a browser,
which cannot send a bearer header by itself, may log in with a token kept in an HttpOnly cookie.
"""

from __future__ import annotations

import json
import math
import urllib.parse
from pathlib import Path as FsPath
from typing import Any

import yaml
from fastapi import FastAPI, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from maelflow_registry import __version__, svg
from maelflow_registry.auth import hash_token
from maelflow_registry.errors import CatalogueError, NotFound
from maelflow_registry.index import DATASET_SORTS, ENTRY_SORTS
from maelflow_registry.keys import TITLES, check_key

HERE = FsPath(__file__).parent
templates = Jinja2Templates(directory=str(HERE / "templates"))
PAGE_SIZE = 50
# a page answers errors as HTML for a browser (Accept: text/html) and as JSON otherwise
WEB_ERRORS: dict[int | str, dict] = {
    code: {"description": text, "content": {"text/html": {"schema": {"type": "string"}},
                                            "application/json": {"schema": {"type": "object"}}}}
    for code, text in ((400, "bad request"), (401, "no token while anonymous read is off"),
                       (404, "no such entry"), (422, "invalid parameters"))}

DATASET_COLUMNS = [("name", "Name"), ("size", "Size"), ("files", "Files"), ("resolution", "Resolution"),
                   ("frequency", "Frequency"), ("rows", "Rows"), ("variables", "Variables"),
                   ("ensembles", "Ensemble members"), ("grid_values", "Values"), ("created", "Created"),
                   ("locations", "Locations"), ("usage", "Usage")]


def human_size(n: Any) -> str:
    if not isinstance(n, (int, float)):
        return ""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def safe_url(url: Any) -> str | None:
    """Only http(s) links are rendered: a record is user data, and 'javascript:' must not become a link."""
    if isinstance(url, str) and urllib.parse.urlsplit(url).scheme in ("http", "https"):
        return url
    return None


templates.env.filters["size"] = human_size
templates.env.filters["tojson_pretty"] = lambda v: json.dumps(v, indent=2, ensure_ascii=False, default=str)
templates.env.globals["version"] = __version__
templates.env.globals["titles"] = TITLES


def get(data: Any, *path: str) -> Any:
    for p in path:
        if not isinstance(data, dict):
            return None
        data = data.get(p)
    return data


def mlflow_link(record: dict) -> str | None:
    md = record.get("metadata") if isinstance(record.get("metadata"), dict) else {}
    for source in (record, md):
        for candidate in (source.get("mlflow_url"), get(source, "mlflow", "url")):
            if safe_url(candidate):
                return candidate
        uri, exp, run = (get(source, "mlflow", "tracking_uri"), get(source, "mlflow", "experiment_id"),
                         get(source, "mlflow", "run_id"))
        if safe_url(uri) and exp is not None and run:
            return f"{uri.rstrip('/')}/#/experiments/{urllib.parse.quote(str(exp))}/runs/{urllib.parse.quote(str(run))}"
    return None


def list_columns(collection: str, row: dict, index: Any) -> list[tuple[Any, str | None]]:
    """(text, link) cells of a row in a non-dataset table."""
    rec, key = row["record"], row["key"]
    md = rec.get("metadata") if isinstance(rec.get("metadata"), dict) else {}
    link = f"/{collection}/{urllib.parse.quote(key)}"
    from maelflow_registry.lineage import datasets_used, refs_of

    if collection == "trainings":
        ckpts = index.produced(refs_of(collection, key, rec))
        return [(key, link), (rec.get("status") or md.get("status") or "", None),
                (rec.get("owner") or md.get("owner") or rec.get("user") or "", None),
                (rec.get("run_id") or md.get("run_id") or "", None), (", ".join(datasets_used(rec)), None),
                (len(ckpts), None), ("MLflow" if mlflow_link(rec) else "", mlflow_link(rec)),
                (row["updated"][:19], None)]
    if collection == "weights":
        return [(key, link), (md.get("run_id") or rec.get("run_id") or "", None),
                (rec.get("training") or md.get("training") or "", None), (", ".join(datasets_used(rec)), None),
                (human_size(md.get("size")), None), (", ".join(sorted(rec.get("locations") or {})), None),
                (row["created"][:19], None)]
    if collection == "models":
        versions = rec.get("versions") or {}
        latest = max(versions, key=lambda n: int(n) if str(n).isdigit() else 0) if versions else None
        aliases = ", ".join(f"{a} → v{v}" for a, v in sorted((rec.get("aliases") or {}).items()))
        return [(key, link), (len(versions), None), (aliases, None),
                (f"v{latest}: {versions[latest].get('weights')}" if latest else "", None),
                (row["updated"][:19], None)]
    if collection == "tasks":
        progress = rec.get("progress") if isinstance(rec.get("progress"), dict) else {}
        pct = progress.get("percentage")
        return [(key, link), (rec.get("action", ""), None), (rec.get("status", ""), None),
                (rec.get("dataset", ""), f"/datasets/{rec['dataset']}" if isinstance(rec.get("dataset"), str) else None),
                (f"{rec.get('source', '')} → {rec.get('destination') or rec.get('location') or ''}", None),
                (f"{pct:.0f} %" if isinstance(pct, (int, float)) else "", None),
                (str(rec.get("created", ""))[:19], None), (str(rec.get("updated", ""))[:19], None)]
    return [(key, link), (rec.get("owner") or md.get("owner") or md.get("user") or "", None),
            (len(rec.get("checkpoints") or []), None), (len(rec.get("plots") or []), None),
            (len(rec.get("runs") or {}), None), (row["updated"][:19], None)]


LIST_HEADERS = {
    "trainings": ["Name", "Status", "Owner", "Run id", "Datasets", "Weights", "MLflow", "Updated"],
    "weights": ["Uuid", "Run id", "Training", "Datasets", "Size", "Locations", "Registered"],
    "models": ["Name", "Versions", "Aliases", "Latest", "Updated"],
    "tasks": ["Uuid", "Action", "Status", "Dataset", "From → to", "Progress", "Created", "Updated"],
    "experiments": ["Expver", "Owner", "Checkpoints", "Plots", "Runs", "Updated"],
}


def pages(total: int, page: int) -> dict:
    count = max(1, math.ceil(total / PAGE_SIZE))
    return {"page": page, "pages": count, "total": total}


def error_page(request: Request, exc: CatalogueError) -> HTMLResponse:
    return templates.TemplateResponse(request, "error.html", {"error": exc, "title": exc.title},
                                      status_code=exc.status)


def dataset_sections(record: dict) -> dict:
    md = record.get("metadata") if isinstance(record.get("metadata"), dict) else {}
    variables = md.get("variables") if isinstance(md.get("variables"), list) else []
    stats = md.get("statistics") if isinstance(md.get("statistics"), dict) else {}
    vmeta = md.get("variables_metadata") if isinstance(md.get("variables_metadata"), dict) else {}
    rows = []
    for i, name in enumerate(variables):
        row = {"name": name, "meta": vmeta.get(name) if isinstance(vmeta.get(name), dict) else {}}
        for stat in ("mean", "stdev", "minimum", "maximum"):
            values = stats.get(stat)
            row[stat] = values[i] if isinstance(values, list) and i < len(values) else None
        rows.append(row)
    recipe = md.get("recipe")
    overview = [(label, md.get(field)) for label, field in (
        ("uuid", "uuid"), ("start date", "start_date"), ("end date", "end_date"), ("frequency", "frequency"),
        ("resolution", "resolution"), ("shape", "shape"), ("dtype", "dtype"), ("chunks", "chunks"),
        ("licence", "licence"), ("attribution", "attribution"), ("total size", "total_size"),
        ("files", "total_number_of_files"), ("anemoi-datasets format", "version")) if md.get(field) is not None]
    return {"variables": rows, "recipe": yaml.safe_dump(recipe, sort_keys=False) if recipe else None,
            "overview": overview, "has_stats": any(stats.get(s) for s in ("mean", "stdev", "minimum", "maximum"))}


def add_routes(app: FastAPI, ctx) -> None:
    cat = ctx.catalogue
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")

    def reader(request: Request):
        return ctx.require(request, "read", cookies=True)

    def lineage_svg(collection: str, key: str) -> tuple[str, dict]:
        graph = cat.lineage(collection, key).to_json()
        return svg.render(graph), graph

    @app.get("/", include_in_schema=False)
    async def home() -> RedirectResponse:
        return RedirectResponse("/datasets", status_code=303)

    @app.get("/checkpoints", include_in_schema=False)
    async def checkpoints() -> RedirectResponse:
        return RedirectResponse("/weights", status_code=303)

    @app.get("/datasets", response_class=HTMLResponse, tags=["web"], responses=WEB_ERRORS)
    async def datasets_page(request: Request, q: str = Query("", max_length=200),
                            sort: str = Query("name", max_length=20), order: str = Query("asc", pattern="^(asc|desc)$"),
                            page: int = Query(1, ge=1, le=100000)):
        """The datasets table: search (q), sort by any column, 50 rows a page."""
        reader(request)
        sort = sort if sort in DATASET_SORTS else "name"
        rows, total = cat.index.dataset_page(q.strip(), sort, order == "desc", PAGE_SIZE, (page - 1) * PAGE_SIZE)
        return templates.TemplateResponse(request, "datasets.html", {
            "title": "Datasets", "rows": rows, "columns": DATASET_COLUMNS, "q": q, "sort": sort, "order": order,
            **pages(total, page)})

    @app.get("/datasets/{name}", response_class=HTMLResponse, tags=["web"], responses=WEB_ERRORS)
    async def dataset_page(request: Request, name: str):
        """A dataset: overview, recipe, variables, locations, statistics and lineage."""
        reader(request)
        check_key(name, "dataset name")
        row = cat.row("datasets", name)
        record = json.loads(row["record"])
        picture, graph = lineage_svg("datasets", name)
        return templates.TemplateResponse(request, "dataset.html", {
            "title": name, "name": name, "collection": "datasets", "key": name, "record": record, "row": row, "svg": picture, "graph": graph,
            "locations": record.get("locations") or {}, **dataset_sections(record)})

    for collection in ("trainings", "weights", "models", "tasks", "experiments"):
        _add_collection_pages(app, ctx, collection, reader, lineage_svg)

    @app.get("/lineage/{collection}/{key}", response_class=HTMLResponse, tags=["web"], responses=WEB_ERRORS)
    async def lineage_page(request: Request, collection: str, key: str):
        """The lineage picture of one entry, and its edges as a table."""
        reader(request)
        if collection not in TITLES:
            raise NotFound(f"unknown collection '{collection[:40]}'")
        check_key(key)
        picture, graph = lineage_svg(collection, key)
        return templates.TemplateResponse(request, "lineage.html", {
            "title": f"Lineage of {key}", "collection": collection, "key": key, "svg": picture, "graph": graph})

    @app.get("/lineage/{collection}/{key}/picture.svg", tags=["web"], responses={**WEB_ERRORS, 200: {
        "content": {"image/svg+xml": {"schema": {"type": "string"}}}}})
    async def lineage_picture(request: Request, collection: str, key: str) -> Response:
        """The lineage picture alone, as SVG."""
        reader(request)
        if collection not in TITLES:
            raise NotFound(f"unknown collection '{collection[:40]}'")
        check_key(key)
        return Response(lineage_svg(collection, key)[0], media_type="image/svg+xml")

    @app.get("/login", response_class=HTMLResponse, include_in_schema=False)
    async def login_form(request: Request):
        return templates.TemplateResponse(request, "login.html", {"title": "Log in", "message": None})

    @app.post("/login", response_class=HTMLResponse, include_in_schema=False)
    async def login(request: Request):
        form = urllib.parse.parse_qs((await request.body()).decode(errors="replace"))
        token = (form.get("token") or [""])[0].strip()
        if not token or ctx.tokens().get(hash_token(token)) is None:
            return templates.TemplateResponse(request, "login.html", {"title": "Log in",
                                                                     "message": "unknown or revoked token"},
                                              status_code=401)
        response = RedirectResponse("/datasets", status_code=303)
        response.set_cookie("catalogue_token", token, httponly=True, samesite="strict")
        return response

    @app.get("/logout", include_in_schema=False)
    async def logout() -> RedirectResponse:
        response = RedirectResponse("/datasets", status_code=303)
        response.delete_cookie("catalogue_token")
        return response


def _add_collection_pages(app: FastAPI, ctx, collection: str, reader, lineage_svg) -> None:
    cat = ctx.catalogue
    title = TITLES[collection]

    async def list_page(request: Request, q: str = Query("", max_length=200),
                        sort: str = Query("key", max_length=20), order: str = Query("asc", pattern="^(asc|desc)$"),
                        page: int = Query(1, ge=1, le=100000)):
        reader(request)
        sort = sort if sort in ENTRY_SORTS else "key"
        rows, total = cat.index.page(collection, q.strip(), sort, order == "desc", PAGE_SIZE, (page - 1) * PAGE_SIZE)
        return templates.TemplateResponse(request, "entries.html", {
            "title": title, "collection": collection, "headers": LIST_HEADERS[collection],
            "rows": [list_columns(collection, r, cat.index) for r in rows], "q": q, "sort": sort, "order": order,
            **pages(total, page)})

    async def entry_page(request: Request, key: str):
        reader(request)
        check_key(key)
        row = cat.row(collection, key)
        record = json.loads(row["record"])
        picture, graph = lineage_svg(collection, key) if collection != "tasks" else (None, None)
        extra: dict[str, Any] = {}
        if collection == "trainings":
            extra["mlflow"] = mlflow_link(record)
            from maelflow_registry.lineage import refs_of

            extra["produced"] = cat.index.produced(refs_of(collection, key, record))
        return templates.TemplateResponse(request, "entry.html", {
            "title": f"{title[:-1] if title.endswith('s') else title} {key}", "collection": collection, "key": key,
            "record": record, "row": row, "svg": picture, "graph": graph, **extra})

    list_page.__doc__ = f"The {title.lower()} table: search (q), sort, pages."
    entry_page.__doc__ = f"One of the {title.lower()}, with its lineage."
    app.add_api_route(f"/{collection}", list_page, methods=["GET"], response_class=HTMLResponse, tags=["web"],
                      responses=WEB_ERRORS,
                      name=f"{collection}_page")
    app.add_api_route(f"/{collection}/{{key}}", entry_page, methods=["GET"], response_class=HTMLResponse,
                      responses=WEB_ERRORS,
                      tags=["web"], name=f"{collection}_entry_page")

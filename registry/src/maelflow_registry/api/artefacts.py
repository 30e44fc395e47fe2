"""Files beside the entries (plots, config snapshots) under ``s3://<bucket>/artefacts/<path>``."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from maelflow_registry.api import API
from maelflow_registry.api.bodies import BYTES_BODY, ERRORS
from maelflow_registry.api.deps import CatalogueDep, Reader, Writer
from maelflow_registry.errors import NotFound
from maelflow_registry.keys import check_artefact_path

router = APIRouter(prefix=API + "/artefacts", tags=["artefacts"], responses=ERRORS)


@router.put("/{path:path}", openapi_extra=BYTES_BODY)
async def put_artefact(caller: Writer, cat: CatalogueDep, request: Request, path: str) -> dict:
    """Store a file (plot, config snapshot...) under ``s3://<bucket>/artefacts/<path>`` (write)."""
    check_artefact_path(path)
    body = await request.body()
    ctype = request.headers.get("content-type", "application/octet-stream")[:100]
    await run_in_threadpool(cat.store.put_artefact, path, body, ctype)
    return {"path": path, "size": len(body), "url": f"s3://{cat.store.bucket}/artefacts/{path}"}


@router.get("/{path:path}")
async def get_artefact(caller: Reader, cat: CatalogueDep, path: str) -> Response:
    """A stored artefact's bytes."""
    check_artefact_path(path)
    found = await run_in_threadpool(cat.store.get_artefact, path)
    if found is None:
        raise NotFound(f"no artefact '{path}'")
    return Response(content=found[0], media_type=found[1])

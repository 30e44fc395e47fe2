"""Files beside the entries (plots, config snapshots) under ``s3://<bucket>/artefacts/<path>``.

An upload may be up to ``max_artefact_bytes`` (256 MiB): it is streamed to a temporary file as it
arrives (the middleware counts it against the limit and has checked the token before any of it was
read) and sent to S3 from there, so a request never holds the whole file in memory.
"""

from __future__ import annotations

import os
import tempfile

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
    ctype = request.headers.get("content-type", "application/octet-stream")[:100]
    fd, tmp = tempfile.mkstemp(prefix="maelflow-artefact-")
    try:
        size = 0
        with os.fdopen(fd, "wb") as fh:
            async for chunk in request.stream():
                if chunk:
                    fh.write(chunk)  # a page-cache write of <= 64 KiB: not worth a thread hop
                    size += len(chunk)
        await run_in_threadpool(cat.store.put_artefact, path, tmp, ctype)
    finally:
        os.unlink(tmp)
    return {"path": path, "size": size, "url": f"s3://{cat.store.bucket}/artefacts/{path}"}


@router.get("/{path:path}")
async def get_artefact(caller: Reader, cat: CatalogueDep, path: str) -> Response:
    """A stored artefact's bytes."""
    check_artefact_path(path)
    found = await run_in_threadpool(cat.store.get_artefact, path)
    if found is None:
        raise NotFound(f"no artefact '{path}'")
    return Response(content=found[0], media_type=found[1])

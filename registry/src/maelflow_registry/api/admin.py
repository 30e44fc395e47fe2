"""Maintenance that needs an admin token: reading the index back from S3, or comparing it with S3."""

from __future__ import annotations

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from maelflow_registry.api import API
from maelflow_registry.api.bodies import ERRORS
from maelflow_registry.api.deps import Admin, CatalogueDep

router = APIRouter(prefix=API + "/_admin", tags=["service"], responses=ERRORS)


@router.post("/rebuild-index")
async def rebuild_index(caller: Admin, cat: CatalogueDep) -> dict:
    """Drop the index and read it back from S3 (admin)."""
    return {"entries": await run_in_threadpool(cat.rebuild)}


@router.post("/reconcile")
async def reconcile(caller: Admin, cat: CatalogueDep) -> dict:
    """Compare the index with S3's listing now (admin): entries whose document is gone are dropped,
    documents the index lacks are indexed (if valid). Returns how many of each."""
    return await run_in_threadpool(cat.reconcile)

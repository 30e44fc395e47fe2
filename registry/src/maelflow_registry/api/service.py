"""Liveness, the settings the anemoi-registry client fetches first, and who a token is."""

from __future__ import annotations

from fastapi import APIRouter, Request

from maelflow_registry import __version__, collections
from maelflow_registry.api import API
from maelflow_registry.api.bodies import ERRORS
from maelflow_registry.api.deps import Anyone, CatalogueDep, ContextDep

router = APIRouter(tags=["service"], responses=ERRORS)


@router.get("/health")
async def health(cat: CatalogueDep) -> dict:
    """Liveness, for ``maelflow services status``; 'rebuilding' while the index is read back from S3."""
    return {"status": "ok" if cat.ready.is_set() else "rebuilding", "version": __version__}


@router.get("/settings")
async def settings(request: Request, ctx: ContextDep) -> dict:
    """What the anemoi-registry client fetches first (anonymously): API URL and S3 URI patterns.

    Everything the client uploads itself (datasets, weights, plots, experiment artefacts) goes to
    the datasets bucket, which its write keys may write; the catalogue's own bucket (the documents
    an index rebuild trusts, and the files sent through ``/artefacts``) is written by this service
    only, with keys no client gets."""
    s = ctx.settings()
    base = str(request.base_url).rstrip("/")
    return {"registry": {
        "api_url": base + API, "web_url": base,
        "datasets_uri_pattern": f"s3://{s.datasets_bucket}/datasets/{{name}}.zarr",
        "datasets_platform": s.datasets_platform,
        "weights_uri_pattern": f"s3://{s.datasets_bucket}/artefacts/weights/{{uuid}}.ckpt",
        "weights_platform": s.weights_platform,
        "plots_uri_pattern": f"s3://{s.datasets_bucket}/artefacts/plots/{{expver}}/{{basename}}",
        "artefacts_uri_base": f"s3://{s.datasets_bucket}/artefacts/experiments",
    }, "catalogue": {"version": __version__, "anonymous_read": s.anonymous_read,
                     "s3_endpoint_url": ctx.s3_endpoint, "collections": collections.names()}}


@router.get(API + "/_whoami")
async def whoami(caller: Anyone) -> dict:
    """The role of the token sent (null when anonymous)."""
    return {"role": caller.role, "name": caller.name}

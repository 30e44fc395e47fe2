"""The lineage graph around an entry, named by collection and key, or by key or run_id alone."""

from __future__ import annotations

from fastapi import APIRouter, Path, Query

from maelflow_registry.api import API
from maelflow_registry.api.bodies import ERRORS
from maelflow_registry.api.deps import CatalogueDep, CollectionName, Key, Reader
from maelflow_registry.errors import Ambiguous, NotFound

router = APIRouter(prefix=API + "/lineage", tags=["lineage"], responses=ERRORS)

Depth = Query(4, ge=0, le=10)


@router.get("/{collection}/{key}")
async def lineage_of(caller: Reader, cat: CatalogueDep, collection: CollectionName, key: Key,
                     depth: int = Depth) -> dict:
    """The lineage graph around one entry: nodes and upstream -> downstream edges."""
    return cat.lineage(collection.value, key, depth).to_json()


@router.get("/{ident}")
async def lineage_find(caller: Reader, cat: CatalogueDep, ident: str = Path(max_length=260),
                       depth: int = Depth) -> dict:
    """The lineage of an entry named by key, ``collection:key`` or a training's run_id."""
    found = cat.find(ident)
    if not found:
        raise NotFound(f"no entry is called '{ident}' in any collection")
    if len(found) > 1:
        raise Ambiguous(ident, found)
    return cat.lineage(found[0][0], found[0][1], depth).to_json()

"""Builds the running service from a workspace: S3 store, index (rebuilt if new), settings, tokens.

``maelflow catalogue serve`` calls :func:`serve`; tests and the bench may call :func:`build` to get
the ASGI application without a socket.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from maelflow.services.base import LOOPBACK
from maelflow.workspace import Workspace
from maelflow_registry.auth import TokenStore
from maelflow_registry.catalogue import Catalogue
from maelflow_registry.config import Paths, Watched, load_settings
from maelflow_registry.index import Index
from maelflow_registry.store import Store

LOG = logging.getLogger("maelflow_registry")


def open_catalogue(ws: Workspace, threads: int = 32, rebuild: bool = True) -> tuple[Catalogue, Paths, dict]:
    """The catalogue of a workspace, its files, and the S3 service's details; S3 must be running.

    An index that never finished a rebuild (new, deleted, or cut short) is rebuilt from S3 here,
    unless ``rebuild`` is false (the server does it in the background, see :func:`build`).
    """
    from maelflow.s3 import s3_client
    from maelflow.services.stack import discover

    paths = Paths(ws)
    paths.dir.mkdir(parents=True, exist_ok=True)
    settings = Watched(paths.settings, lambda: load_settings(paths))
    s3_info = discover(ws, "s3").extra
    client = s3_client(s3_info["endpoint_url"], s3_info["access_key"], s3_info["secret_key"],
                       region=s3_info.get("region", "us-east-1"), max_pool_connections=threads,
                       connect_timeout=5, read_timeout=30, max_attempts=3)
    store = Store(client, settings.get().bucket)
    store.ensure_bucket()
    index = Index(paths.index)
    catalogue = Catalogue(store, index, settings.get)
    if rebuild and not index.is_complete():
        count = catalogue.rebuild()
        LOG.warning("new index at %s: %d entries read from s3://%s", paths.index, count, store.bucket)
    return catalogue, paths, s3_info


def build(ws: Workspace) -> Any:
    from maelflow_registry.app import BodyLimit, Context, FastLookups, NotReady, body_limits, create_app

    catalogue, paths, s3_info = open_catalogue(ws, rebuild=False)
    if not catalogue.index.is_complete():
        # rebuild while already answering: /health says so (a start is not held up by 100 000 S3
        # reads) and everything else gets 503 + Retry-After, which the anemoi client retries
        catalogue.ready.clear()

        def rebuild() -> None:
            try:
                count = catalogue.rebuild()
                LOG.warning("index at %s rebuilt from s3://%s: %d entries", paths.index, catalogue.store.bucket, count)
            except Exception:
                LOG.exception("rebuilding the index from S3 failed; restart the catalogue to try again")
                return
            catalogue.ready.set()

        threading.Thread(target=rebuild, name="rebuild-index", daemon=True).start()
    settings = Watched(paths.settings, lambda: load_settings(paths))
    tokens = Watched(paths.tokens, lambda: TokenStore(paths).by_hash())
    ctx = Context(catalogue, settings.get, tokens.get, s3_endpoint=s3_info["endpoint_url"])
    return BodyLimit(NotReady(FastLookups(create_app(ctx), ctx), catalogue), body_limits(settings.get))


def serve(ws: Workspace, port: int, host: str = LOOPBACK) -> None:
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = build(ws)
    LOG.warning("catalogue of %s on http://%s:%d", ws.root, host, port)
    # one worker: the index's write lock and the token/settings caches are per process anyway, and a
    # lookup costs microseconds; access logs off because at thousands of lookups a second they cost more
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False, workers=1,
                timeout_keep_alive=30)

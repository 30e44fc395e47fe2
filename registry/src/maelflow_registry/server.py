"""The running catalogue, made from what its caller gives: a directory of files and an S3 store.

The library decides nothing about where it runs: the caller (maelflow's glue,
``maelflow.services.catalogue``) chooses the :class:`~maelflow_registry.config.Paths`, makes the
:class:`~maelflow_registry.store.Store` for the bucket the settings name, and runs the ASGI
application from :func:`build` under a server of its choice. The server compares its index with
S3's listing every ``reconcile_seconds`` (see :meth:`~maelflow_registry.catalogue.Catalogue.reconcile`). Tests and the bench may call
:func:`open_catalogue` to work on the index without a socket.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from maelflow_registry.api.deps import Context
from maelflow_registry.app import asgi
from maelflow_registry.auth import TokenStore
from maelflow_registry.catalogue import Catalogue
from maelflow_registry.config import Paths, Watched, load_settings
from maelflow_registry.index import Index
from maelflow_registry.store import Store

LOG = logging.getLogger("maelflow_registry")


def open_catalogue(paths: Paths, store: Store, *, rebuild: bool = True) -> Catalogue:
    """The catalogue kept in ``paths`` over ``store`` (whose bucket is made if missing).

    An index that never finished a rebuild (new, deleted, or cut short) is rebuilt from S3 here,
    unless ``rebuild`` is false (the server does it in the background, see :func:`build`).
    """
    paths.dir.mkdir(parents=True, exist_ok=True)
    settings = Watched(paths.settings, lambda: load_settings(paths))
    store.ensure_bucket()
    index = Index(paths.index)
    catalogue = Catalogue(store, index, settings.get)
    if rebuild and not index.is_complete():
        count = catalogue.rebuild()
        LOG.warning("new index at %s: %d entries read from s3://%s", paths.index, count, store.bucket)
    return catalogue


def build(paths: Paths, store: Store, *, s3_endpoint: str | None = None) -> Any:
    """The ASGI application; ``s3_endpoint`` is what ``/settings`` tells clients to upload to."""
    catalogue = open_catalogue(paths, store, rebuild=False)
    if not catalogue.index.is_complete():
        # rebuild while already answering: /health says so (a start is not held up by 100 000 S3
        # reads) and everything else gets 503 + Retry-After, which the anemoi client retries
        catalogue.ready.clear()

        def rebuild() -> None:
            try:
                count = catalogue.rebuild()
                LOG.warning("index at %s rebuilt from s3://%s: %d entries", paths.index, store.bucket, count)
            except Exception:
                LOG.exception("rebuilding the index from S3 failed; restart the catalogue to try again")
                return
            catalogue.ready.set()

        threading.Thread(target=rebuild, name="rebuild-index", daemon=True).start()
    threading.Thread(target=_reconcile_loop, args=(catalogue,), name="reconcile", daemon=True).start()
    tokens = Watched(paths.tokens, lambda: TokenStore(paths).by_hash())
    return asgi(Context(catalogue, tokens.get, s3_endpoint=s3_endpoint))


def _reconcile_loop(catalogue: Catalogue) -> None:
    """Every ``reconcile_seconds``, compare the index with S3's listing (S3 may change behind our back)."""
    while True:
        seconds = catalogue.settings.reconcile_seconds
        time.sleep(seconds if isinstance(seconds, (int, float)) and seconds > 0 else 60)
        if not (isinstance(seconds, (int, float)) and seconds > 0) or not catalogue.ready.is_set():
            continue
        try:
            found = catalogue.reconcile()
        except Exception:  # noqa: BLE001 - S3 down for a while: try again next time
            LOG.exception("comparing the index with S3 failed; trying again in %ss", seconds)
            continue
        if any(found.values()):
            LOG.warning("index reconciled with S3: %s", found)

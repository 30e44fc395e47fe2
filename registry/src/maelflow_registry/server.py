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


def open_index(paths: Paths, index: str | None = None) -> Index:
    """The index: SQLite in ``paths`` (the default), or PostgreSQL when ``index`` is a
    ``postgresql://`` connection string (several processes share it; :mod:`maelflow_registry.pg_index`)."""
    from maelflow_registry import pg_index

    if index and pg_index.is_url(index):
        return pg_index.PgIndex(index)
    if index:
        raise ValueError(f"the catalogue index must be a postgresql:// connection string, not {index[:60]!r}")
    return Index(paths.index)


def open_catalogue(paths: Paths, store: Store, *, rebuild: bool = True, index: str | None = None) -> Catalogue:
    """The catalogue kept in ``paths`` over ``store`` (whose bucket is made if missing).

    An index that never finished a rebuild (new, deleted, or cut short) is rebuilt from S3 here,
    unless ``rebuild`` is false (the server does it in the background, see :func:`build`).
    ``index``: see :func:`open_index`.
    """
    paths.dir.mkdir(parents=True, exist_ok=True)
    settings = Watched(paths.settings, lambda: load_settings(paths))
    store.ensure_bucket()
    idx = open_index(paths, index)
    catalogue = Catalogue(store, idx, settings.get)
    if rebuild and not idx.is_complete():
        count = catalogue.rebuild(if_incomplete=True)
        LOG.warning("new index at %s: %d entries read from s3://%s", idx.location, count, store.bucket)
    return catalogue


def build(paths: Paths, store: Store, *, s3_endpoint: str | None = None, index: str | None = None) -> Any:
    """The ASGI application; ``s3_endpoint`` is what ``/settings`` tells clients to upload to.

    Several processes may each build one over the same PostgreSQL ``index``: the first to start
    rebuilds a new index from S3, the others find it built (:meth:`Catalogue.rebuild`)."""
    catalogue = open_catalogue(paths, store, rebuild=False, index=index)
    if not catalogue.index.is_complete():
        # rebuild while already answering: /health says so (a start is not held up by 100 000 S3
        # reads) and everything else gets 503 + Retry-After, which the anemoi client retries
        catalogue.ready.clear()

        def rebuild() -> None:
            try:
                count = catalogue.rebuild(if_incomplete=True)
                LOG.warning("index at %s rebuilt from s3://%s: %d entries", catalogue.index.location,
                            store.bucket, count)
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

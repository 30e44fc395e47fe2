"""The catalogue as a managed service of the workspace stack (``maelflow services up``), and its glue.

It runs ``maelflow catalogue serve`` in the background on a free loopback port, after the S3 service
(its store of record): starting the catalogue alone starts S3 first.

The catalogue itself is a library (``maelflow_registry``) that is handed its files and its S3 store;
this module decides them for a workspace: the files in ``<workspace>/catalogue/``, the store on the
workspace's S3 service in the bucket the catalogue's settings name, and uvicorn to serve it.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import signal
import sys
import urllib.request
from typing import TYPE_CHECKING, Any, Sequence

from maelflow.s3 import object_store
from maelflow.services.base import LOOPBACK, ManagedService, ServiceError, http_healthy, wait_until
from maelflow.workspace import Workspace, catalogue_paths
from maelflow_registry.config import Settings, load_settings, server_limits
from maelflow_registry.store import Store

if TYPE_CHECKING:
    from maelflow_registry.catalogue import Catalogue

LOG = logging.getLogger("maelflow_registry")


def open_store(ws: Workspace, settings: Settings) -> tuple[Store, str]:
    """The catalogue's S3 store (the workspace's S3 service, the settings' bucket) and its endpoint URL.

    The store uses the catalogue role's keys and server (the only ones that may write its bucket);
    the endpoint URL, which ``/settings`` gives clients to upload datasets to, is the datasets
    writer's. Raises ServiceError when the S3 service is not up.
    """
    from maelflow.services.stack import s3_settings

    objects = object_store(s3_settings(ws, "catalogue"), settings.bucket, connect_timeout=5, read_timeout=30,
                           max_retries=3)
    return Store(objects), s3_settings(ws, "write")["endpoint_url"]


# where the index is: a postgresql:// connection string (its password in a passfile), or unset for
# SQLite in the workspace. Production sets it in the service's unit (docs/deployment.md).
INDEX_ENV = "MAELFLOW_CATALOGUE_INDEX"
WORKSPACE_ENV = "MAELFLOW_WORKSPACE"


def index_location(ws: Workspace) -> str | None:
    """The catalogue's index: $MAELFLOW_CATALOGUE_INDEX, else the one the running (or last) server of
    this workspace used, else None (SQLite in the workspace)."""
    return os.environ.get(INDEX_ENV) or CatalogueService(ws).state().get("index") or None


def open_catalogue(ws: Workspace, rebuild: bool = True, index: str | None = None) -> "Catalogue":
    """The workspace's catalogue without a server (``rebuild-index``, the bench); S3 must be up."""
    from maelflow_registry.server import open_catalogue as open_  # the service's parts: FastAPI and all

    paths = catalogue_paths(ws)
    store, _ = open_store(ws, load_settings(paths))
    return open_(paths, store, rebuild=rebuild, index=index or index_location(ws))


def serve(ws: Workspace, port: int, host: str = LOOPBACK, workers: int = 1, index: str | None = None) -> None:
    """Run the workspace's catalogue in the foreground (``maelflow catalogue serve``).

    ``workers`` > 1 runs that many processes behind the one port (uvicorn's supervisor restarts one
    that dies); they share the index, which is then best PostgreSQL (``index``, a ``postgresql://``
    connection string). Each process reads tokens and settings from the workspace's files.
    """
    import uvicorn  # heavy, and only the serving process needs it

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    index = index or index_location(ws)
    CatalogueService(ws).save_state(index=index)
    LOG.warning("catalogue of %s on http://%s:%d (%d worker%s, index %s)", ws.root, host, port, workers,
                "s" if workers > 1 else "", "PostgreSQL" if index else "SQLite")
    # access logs off because at thousands of lookups a second they cost more than the lookups
    options = dict(host=host, port=port, log_level="warning", access_log=False, timeout_keep_alive=30)
    options.update(server_limits(load_settings(catalogue_paths(ws))))   # a flood gets 503, not the process
    if workers <= 1:
        uvicorn.run(app_for(ws, index), workers=1, **options)
        return
    os.environ[WORKSPACE_ENV] = str(ws.root)
    os.environ[INDEX_ENV] = index or ""
    uvicorn.run("maelflow.services.catalogue:worker_app", factory=True, workers=workers, **options)


def app_for(ws: Workspace, index: str | None) -> Any:
    from maelflow_registry.server import build

    paths = catalogue_paths(ws)
    store, endpoint = open_store(ws, load_settings(paths))
    return build(paths, store, s3_endpoint=endpoint, index=index)


def _redact(index: str | None) -> str | None:
    from maelflow_registry.pg_index import redact

    return redact(index) if index else None


def worker_app() -> Any:
    """The application of one worker process (uvicorn's factory; ``serve`` set the environment)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return app_for(Workspace.resolve(os.environ[WORKSPACE_ENV]), os.environ.get(INDEX_ENV) or None)


class CatalogueService(ManagedService):
    name = "catalogue"
    start_timeout = 60.0  # the first start of a workspace with many entries rebuilds the index from S3

    def check_available(self) -> None:
        missing = [m for m in ("fastapi", "uvicorn", "jinja2", "jsonpatch") if importlib.util.find_spec(m) is None]
        if missing:
            raise ServiceError(f"the catalogue needs {', '.join(missing)}: pip install {' '.join(missing)} "
                               "(into maelflow's environment)")

    def up(self):
        from maelflow.services.s3 import S3Service

        from maelflow.services.profile import is_external

        s3 = S3Service(self.ws)
        if not is_external(self.ws, "s3") and not (s3.running() and s3._safe_healthy()):
            s3.up()
        super().up()
        # a lost index is rebuilt in the background while the server already answers /health; give a
        # small catalogue the time to finish, so that the caller's first request is not a 503
        # (with several workers, each answers for itself: wait until a few answers in a row are 'ready')
        wait_until(lambda: all(self.index_state() == "ready" for _ in range(self.workers())),
                   self.ready_timeout, interval=0.1)
        return self.status()

    def workers(self) -> int:
        return int(self.state().get("workers") or 1)

    def postgres_index(self) -> str | None:
        """The workspace's PostgreSQL (``services up --with postgres``) as the index, when it runs;
        a catalogue that used it refuses to start on SQLite without it (its SQLite file is stale)."""
        from maelflow.services.postgres import PostgresService

        pg = PostgresService(self.ws)
        if pg.running() and pg._safe_healthy():
            return pg.ensure_database("catalogue")
        if self.state().get("index"):
            raise ServiceError("the catalogue of this workspace keeps its index in the workspace's PostgreSQL, "
                               "which is not running", hint="maelflow services up --with postgres")
        return None

    ready_timeout = 30.0

    def index_state(self) -> str | None:
        """'ready', or 'rebuilding' while the index is read back from S3; None when not answering."""
        port = self.state().get("port")
        try:
            with urllib.request.urlopen(f"http://{LOOPBACK}:{port}/health", timeout=2) as resp:
                status = json.loads(resp.read()).get("status")
        except (OSError, ValueError):
            return None
        return "ready" if status == "ok" else status

    def command(self, port: int) -> tuple[Sequence[str], dict[str, str]]:
        index = self.postgres_index()
        workers = 2 if index else 1  # on PostgreSQL, as in production: several processes, one address
        self.save_state(index=index, workers=workers)
        env = {"PYTHONUNBUFFERED": "1", INDEX_ENV: index or ""}
        return [sys.executable, "-m", "maelflow", "catalogue", "serve", "--workspace", str(self.ws.root),
                "--port", str(port), "--workers", str(workers)], env

    def _terminate(self, pid: int, grace: float = 10.0) -> None:
        """The uvicorn supervisor stops its workers on SIGTERM; whatever is left of the process group
        (started in its own session, so only ours) is cleared after it."""
        super()._terminate(pid, grace)
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def healthy(self) -> bool:
        return http_healthy(self.state().get("port"))

    def extra(self) -> dict[str, Any]:
        url = self.url()
        paths = catalogue_paths(self.ws)
        return {"index_state": self.index_state(), "api_url": f"{url}/api/v1", "web_url": url, "settings_url": f"{url}/settings",
                "openapi_url": f"{url}/openapi.json", "workers": self.workers(),
                "index": _redact(self.state().get("index")) or str(paths.index),
                "bucket": load_settings(paths).bucket,
                "anemoi_client": "maelflow catalogue client-config --role write (see docs/catalogue.md)"}

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
import sys
import urllib.request
from typing import TYPE_CHECKING, Any, Sequence

from maelflow.ewc import workspace_settings
from maelflow.s3 import object_store
from maelflow.services.base import LOOPBACK, ManagedService, ServiceError, http_healthy, wait_until
from maelflow.workspace import Workspace, catalogue_paths
from maelflow_registry.config import Settings, load_settings
from maelflow_registry.store import Store

if TYPE_CHECKING:
    from maelflow_registry.catalogue import Catalogue

LOG = logging.getLogger("maelflow_registry")


def open_store(ws: Workspace, settings: Settings) -> tuple[Store, str]:
    """The catalogue's S3 store (the workspace's S3 service, the settings' bucket) and its endpoint URL.

    Raises ServiceError when the S3 service is not up.
    """
    s3 = workspace_settings(ws)
    objects = object_store(s3, settings.bucket, connect_timeout=5, read_timeout=30, max_retries=3)
    return Store(objects), s3["endpoint_url"]


def open_catalogue(ws: Workspace, rebuild: bool = True) -> "Catalogue":
    """The workspace's catalogue without a server (``rebuild-index``, the bench); S3 must be up."""
    from maelflow_registry.server import open_catalogue as open_  # the service's parts: FastAPI and all

    paths = catalogue_paths(ws)
    store, _ = open_store(ws, load_settings(paths))
    return open_(paths, store, rebuild=rebuild)


def serve(ws: Workspace, port: int, host: str = LOOPBACK) -> None:
    """Run the workspace's catalogue in the foreground (``maelflow catalogue serve``)."""
    import uvicorn  # heavy, and only the serving process needs it

    from maelflow_registry.server import build

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    paths = catalogue_paths(ws)
    store, endpoint = open_store(ws, load_settings(paths))
    app = build(paths, store, s3_endpoint=endpoint)
    LOG.warning("catalogue of %s on http://%s:%d", ws.root, host, port)
    # one worker: the index's write lock and the token/settings caches are per process anyway, and a
    # lookup costs microseconds; access logs off because at thousands of lookups a second they cost more
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False, workers=1,
                timeout_keep_alive=30)


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

        s3 = S3Service(self.ws)
        if not (s3.running() and s3._safe_healthy()):
            s3.up()
        super().up()
        # a lost index is rebuilt in the background while the server already answers /health; give a
        # small catalogue the time to finish, so that the caller's first request is not a 503
        wait_until(lambda: self.index_state() == "ready", self.ready_timeout, interval=0.1)
        return self.status()

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
        return [sys.executable, "-m", "maelflow", "catalogue", "serve", "--workspace", str(self.ws.root),
                "--port", str(port)], {"PYTHONUNBUFFERED": "1"}

    def healthy(self) -> bool:
        return http_healthy(self.state().get("port"))

    def extra(self) -> dict[str, Any]:
        url = self.url()
        paths = catalogue_paths(self.ws)
        return {"index_state": self.index_state(), "api_url": f"{url}/api/v1", "web_url": url, "settings_url": f"{url}/settings",
                "openapi_url": f"{url}/openapi.json", "index": str(paths.index),
                "bucket": load_settings(paths).bucket,
                "anemoi_client": "maelflow catalogue client-config --role write (see docs/catalogue.md)"}

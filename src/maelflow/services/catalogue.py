"""The catalogue as a managed service of the workspace stack (``maelflow services up``).

It runs ``maelflow catalogue serve`` in the background on a free loopback port, after the S3 service
(its store of record): starting the catalogue alone starts S3 first.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import urllib.request
from typing import Any, Sequence

from maelflow.services.base import LOOPBACK, ManagedService, ServiceError, wait_until, http_healthy


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
        from maelflow_registry.config import Paths, load_settings

        paths = Paths(self.ws)
        return {"index_state": self.index_state(), "api_url": f"{url}/api/v1", "web_url": url, "settings_url": f"{url}/settings",
                "openapi_url": f"{url}/openapi.json", "index": str(paths.index),
                "bucket": load_settings(paths).bucket,
                "anemoi_client": "maelflow catalogue client-config --role write (see docs/catalogue.md)"}

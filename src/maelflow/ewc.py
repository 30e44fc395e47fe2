"""Where the European Weather Cloud object store is, for code on the server side or on a site.

Beside the server, the EWC is the workspace's S3 service (or, in production, its configured
endpoint). A job on a site cannot read the server's workspace, so deploy leaves the endpoint and
keys in a file only the site user can read (``<site root>/.maelflow/ewc.json``, mode 0600), and the
job reads them there: the same convention a user follows on a real site with their own EWC keys.

The workspace's store has a key pair per role (``maelflow.services.s3``): ``read`` (the datasets,
read-only: what a site and a read-only client get), ``write`` (the datasets, read-write: publish and
the workspace's own transfers) and ``catalogue`` (the catalogue's bucket: its service only). Every
caller names the role it needs; nothing hands out more.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from maelflow.workspace import Workspace

DEFAULT_BUCKET = "ewc"
ROLES = ("read", "write", "catalogue")
SITE_ROLE = "read"   # what deploy leaves on a site: a job there reads datasets, never writes the store


def site_credentials_path(site_root: str) -> str:
    return f"{site_root.rstrip('/')}/.maelflow/ewc.json"


def settings_from_service(extra: dict[str, Any], role: str = "write") -> dict[str, Any]:
    """EWC settings of ``role`` from the workspace S3 service's description (``ServiceInfo.extra``).

    A description without roles (an external endpoint with one key pair) serves every role."""
    if role not in ROLES:
        raise ValueError(f"unknown S3 role {role!r}; known: {', '.join(ROLES)}")
    roles = extra.get("roles")
    if roles:
        extra = roles[role]
    return {"endpoint_url": extra["endpoint_url"], "access_key": extra["access_key"],
            "secret_key": extra["secret_key"], "region": extra.get("region", "us-east-1"),
            "bucket": extra.get("bucket", DEFAULT_BUCKET),
            # an external endpoint (the services profile): its CA bundle and addressing style
            **{k: extra[k] for k in ("ca_bundle", "addressing") if extra.get(k)}}


def site_settings(site_root: str) -> dict[str, Any] | None:
    """The site's credentials file, when it is readable from here (on the site itself)."""
    path = Path(site_credentials_path(site_root))
    if path.is_file() and os.access(path, os.R_OK):
        return json.loads(path.read_text())
    return None


def workspace_settings(ws: Workspace, role: str = "write") -> dict[str, Any]:
    from maelflow.services.stack import discover

    return settings_from_service(discover(ws, "s3").extra, role)


def role_for_bucket(extra: dict[str, Any], bucket: str | None) -> str:
    """The role whose server serves ``bucket`` (the catalogue's bucket: ``catalogue``; else ``write``)."""
    for role in ("write", "catalogue"):
        if bucket in (extra.get("roles", {}).get(role, {}).get("buckets") or ()):
            return role
    return "write"


def settings_for_job(ws: Workspace, site_root: str | None, role: str = "write") -> dict[str, Any]:
    """The site's credentials file when the job has one (read-only keys), else the workspace's S3
    service with ``role``'s keys."""
    return (site_settings(site_root) if site_root else None) or workspace_settings(ws, role)


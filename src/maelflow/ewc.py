"""Where the European Weather Cloud object store is, for code on the server side or on a site.

Beside the server, the EWC is the workspace's S3 service (or, in production, its configured
endpoint). A job on a site cannot read the server's workspace, so deploy leaves the endpoint and
keys in a file only the site user can read (``<site root>/.maelflow/ewc.json``, mode 0600), and the
job reads them there: the same convention a user follows on a real site with their own EWC keys.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from maelflow.workspace import Workspace

DEFAULT_BUCKET = "ewc"


def site_credentials_path(site_root: str) -> str:
    return f"{site_root.rstrip('/')}/.maelflow/ewc.json"


def settings_from_service(extra: dict[str, Any]) -> dict[str, Any]:
    """EWC settings from the workspace S3 service's description (``ServiceInfo.extra``)."""
    return {"endpoint_url": extra["endpoint_url"], "access_key": extra["access_key"],
            "secret_key": extra["secret_key"], "region": extra.get("region", "us-east-1"),
            "bucket": extra.get("bucket", DEFAULT_BUCKET)}


def site_settings(site_root: str) -> dict[str, Any] | None:
    """The site's credentials file, when it is readable from here (on the site itself)."""
    path = Path(site_credentials_path(site_root))
    if path.is_file() and os.access(path, os.R_OK):
        return json.loads(path.read_text())
    return None


def workspace_settings(ws: Workspace) -> dict[str, Any]:
    from maelflow.services.stack import discover

    return settings_from_service(discover(ws, "s3").extra)


def settings_for_job(ws: Workspace, site_root: str | None) -> dict[str, Any]:
    """The site's credentials file when the job has one, else the workspace's S3 service."""
    return (site_settings(site_root) if site_root else None) or workspace_settings(ws)


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

from maelflow.s3 import object_store, role_for_bucket, settings_from_service
from maelflow.workspace import Workspace

SITE_ROLE = "read"   # what deploy leaves on a site: a job there reads datasets, never writes the store


def site_credentials_path(site_root: str) -> str:
    return f"{site_root.rstrip('/')}/.maelflow/ewc.json"


def site_settings(site_root: str) -> dict[str, Any] | None:
    """The site's credentials file, when it is readable from here (on the site itself)."""
    path = Path(site_credentials_path(site_root))
    if path.is_file() and os.access(path, os.R_OK):
        return json.loads(path.read_text())
    return None


def settings_for_job(ws: Workspace, site_root: str | None, role: str = "write") -> dict[str, Any]:
    """The site's credentials file when the job has one (read-only keys), else the workspace's S3
    service with ``role``'s keys."""
    from maelflow.services.stack import s3_settings

    return (site_settings(site_root) if site_root else None) or s3_settings(ws, role)


def workspace_store(ws: Workspace, bucket: str | None = None, prefix: str = "", *, role: str | None = None,
                    **options: Any) -> Any:
    """A store of the workspace's embedded S3 service (options as :func:`maelflow.s3.object_store`);
    raises ServiceError when the service is not up.

    ``role``: whose keys and server (read, write, catalogue); by default the one that serves
    ``bucket``: the catalogue's server for its bucket, the datasets writer otherwise."""
    from maelflow.services.stack import discover

    extra = discover(ws, "s3").extra
    return object_store(settings_from_service(extra, role or role_for_bucket(extra, bucket)), bucket, prefix,
                        **options)

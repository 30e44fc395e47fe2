"""The one place that connects to ecFlow servers, so every caller gets the same connection policy.

The ecflow Client's defaults retry a failed connection after 10 s; a command-line user would see a
hang. Here a failure is retried once after 1 s, then reported. The workspace's own server admits
only its owner (a white list and a password file, services/ecflow.py): its clients carry the
owner's password from the workspace.
"""

from __future__ import annotations

import os
from typing import Any

from maelflow.workspace import Workspace


def client_at(host: str, port: int | str, passwd_file: str | os.PathLike[str] | None = None) -> Any:
    """An ``ecflow.Client`` for any server (the embedded one, or a production one on a data bridge);
    ``passwd_file`` is an ecFlow password file (``<user> <host> <port> <password>`` lines)."""
    from maelflow.services.ecflow import make_client

    return make_client(host, int(port), attempts=2, retry_period=1, passwd_file=passwd_file)


def client_for(ws: Workspace) -> Any:
    """A client for the workspace's own server; ServiceError says how to start it when it is down."""
    from maelflow.services.stack import discover

    info = discover(ws, "ecflow")
    return client_at(info.extra["host"], info.extra["port"], info.extra.get("passwd_file"))

"""The catalogue client for this workspace: its running service, with the workspace's own write token.

Suite tasks, the transfer worker and ``maelflow lineage`` on the workspace's host need no set-up:
the URL comes from the service stack, and the token is made once (write role, named
``maelflow-tasks``) and kept 0600 beside the index. The client itself is the registry library's.
"""

from __future__ import annotations

from maelflow.services import stack
from maelflow.workspace import Workspace, catalogue_paths
from maelflow_registry.auth import TokenStore
from maelflow_registry.client import CatalogueClient

TASKS_TOKEN = "maelflow-tasks"


def service_token(ws: Workspace) -> str:
    """The workspace's own write token for maelflow's tasks, made on first use."""
    return TokenStore(catalogue_paths(ws)).service_token(name=TASKS_TOKEN)


def client(ws: Workspace, token: str | None = None) -> CatalogueClient:
    """A client of the workspace's running catalogue; raises ServiceError when it is not up."""
    info = stack.discover(ws, "catalogue")
    if info.extra.get("mode") == "external":  # the services profile's catalogue: its token, its CA
        client = CatalogueClient(info.url, token or info.extra.get("token"))
        if info.extra.get("ca_bundle"):
            client.session.verify = info.extra["ca_bundle"]
        return client
    return CatalogueClient(info.url, token or service_token(ws))

"""Values that site and dataset files may name as ``{placeholder}``: they differ per workspace.

``{workspace}`` is the workspace folder; ``{maelflow}`` the maelflow command of this installation;
``{hpc_*}`` describe the loopback HPC site of the workspace (its SSH port, key, user and home are
only known once ``maelflow services up --with-hpc`` has run).
"""

from __future__ import annotations

from maelflow.workspace import Workspace

HINTS = {
    "hpc_": "the loopback HPC site is not set up in this workspace: run 'maelflow services up --with-hpc'",
}


def placeholders_for(ws: Workspace) -> dict[str, str]:
    from maelflow.installation import maelflow_command

    values = {"workspace": str(ws.root), "maelflow": maelflow_command()}
    if ws.path("hpc", "site.json").exists():
        from maelflow.services.hpc import LoopbackHpc

        site = LoopbackHpc(ws)
        info = site.connection_info()
        if info.get("port"):
            values.update({"hpc_port": str(info["port"]), "hpc_identity": info["identity_file"],
                           "hpc_known_hosts": info["known_hosts"], "hpc_user": info["user"],
                           "hpc_home": info["home"] or "", "hpc_root": str(site.site_root() or "")})
    return values


def hint(name: str) -> str:
    for prefix, text in HINTS.items():
        if name.startswith(prefix):
            return text
    return "unknown placeholder"

"""The loopback HPC site's ``{hpc_*}`` placeholders, for maelflow's config loader.

configs/sites/localhpc.yaml names the workspace's SSH port, key, known_hosts, user and home, which
exist only once ``maelflow services up --with-hpc`` has run. maelflow asks every provider of the
``maelflow.placeholders`` entry-point group at every config load, so this one imports the site's
module only when the workspace has a site.
"""

from __future__ import annotations

from maelflow.workspace import Workspace


class LoopbackSitePlaceholders:
    prefix = "hpc_"
    hint = "the loopback HPC site is not set up in this workspace: run 'maelflow services up --with-hpc'"

    def values(self, ws: Workspace) -> dict[str, str]:
        if not ws.path("hpc", "site.json").exists():
            return {}
        from maelflow_sandbox.hpc import LoopbackHpc

        site = LoopbackHpc(ws)
        info = site.connection_info()
        if not info.get("port"):
            return {}
        return {"hpc_port": str(info["port"]), "hpc_identity": info["identity_file"],
                "hpc_known_hosts": info["known_hosts"], "hpc_user": info["user"],
                "hpc_home": info["home"] or "", "hpc_root": str(site.site_root() or "")}


PROVIDER = LoopbackSitePlaceholders()

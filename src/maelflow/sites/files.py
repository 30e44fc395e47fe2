"""Reading a site's files from the server side: locally for the local site, over SSH otherwise.

Server-side tasks (syncing offline MLflow runs, registering checkpoints) read what a job left on
the site's filesystem without caring where the site is.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from maelflow.config.loader import ResolvedExperiment


class SiteFiles:
    def __init__(self, rx: ResolvedExperiment, site: str):
        self.site = rx.sites[site]
        self.name = site
        self._conn = None

    @property
    def local(self) -> bool:
        return self.site.connection.type == "local"

    def connection(self):
        if self._conn is None:
            from maelflow.sites.connections import connect

            self._conn = connect(self.name, self.site)
        return self._conn

    def read_bytes(self, path: str) -> bytes | None:
        if self.local:
            p = Path(path)
            return p.read_bytes() if p.is_file() else None
        s = self.connection()
        return s.read_bytes(path) if s.exists(path) else None

    def files_under(self, path: str) -> list[str]:
        """Relative paths of the files under ``path`` (empty when it does not exist)."""
        if self.local:
            root = Path(path)
            return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) if root.is_dir() else []
        res = self.connection().run(f"find {shlex.quote(path)} -type f -printf '%P\\n' 2>/dev/null || true", timeout=60)
        return sorted(line for line in res.stdout.splitlines() if line)

    def checksums(self, paths: list[str]) -> dict[str, tuple[int, str]]:
        """(size, SHA-256) of each file, computed where the file is (one remote command for all)."""
        if not paths:
            return {}
        if self.local:
            from maelflow_transfer.manifest import sha256_file

            return {p: (Path(p).stat().st_size, sha256_file(Path(p))) for p in paths}
        quoted = " ".join(shlex.quote(p) for p in paths)
        res = self.connection().run(f"for f in {quoted}; do printf '%s ' $(stat -c %s \"$f\"); sha256sum \"$f\"; done",
                                 timeout=600)
        out: dict[str, tuple[int, str]] = {}
        for line in res.stdout.splitlines():
            size, digest, name = line.split(" ", 2)
            out[name.strip().lstrip("*")] = (int(size), digest)
        return out

    def fetch_tree(self, path: str, dest: Path) -> int:
        """Copy the tree at ``path`` into ``dest`` (same relative layout); returns the file count."""
        files = self.files_under(path)
        for rel in files:
            data = self.read_bytes(f"{path.rstrip('/')}/{rel}")
            if data is None:
                continue
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        return len(files)

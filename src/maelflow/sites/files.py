"""Reading a site's files from the server side, through the site's connection.

Server-side tasks (syncing offline MLflow runs, registering checkpoints) read what a job left on
the site's filesystem without caring where the site is. Every name a site lists is checked before
it is used as a path here: a run folder on a shared filesystem is not ours to trust.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from maelflow.config.loader import ResolvedExperiment
from maelflow_transfer.paths import inside, listing_entry


class SiteFiles:
    def __init__(self, rx: ResolvedExperiment, site: str):
        self.site = rx.sites[site]
        self.name = site
        self._conn = None

    def connection(self):
        if self._conn is None:
            from maelflow.sites.connections import connect

            self._conn = connect(self.name, self.site)
        return self._conn

    @property
    def local(self) -> bool:
        """The site's files are on this machine (read in place, no copy)."""
        return bool(getattr(self.connection(), "local", False))

    def read_bytes(self, path: str) -> bytes | None:
        conn = self.connection()
        return conn.read_bytes(path) if conn.exists(path) else None

    def files_under(self, path: str) -> list[str]:
        """Relative paths of the files under ``path`` (empty when it does not exist), each checked."""
        res = self.connection().run(f"find {shlex.quote(path)} -type f -printf '%P\\0' 2>/dev/null || true",
                                    timeout=60)
        return sorted(listing_entry(rel, f"{self.name}:{path}") for rel in res.stdout.split("\0") if rel)

    def checksums(self, paths: list[str]) -> dict[str, tuple[int, str]]:
        """(size, SHA-256) of each file, computed where the file is (one command for all)."""
        if not paths:
            return {}
        quoted = " ".join(shlex.quote(p) for p in paths)
        res = self.connection().run(
            f"for f in {quoted}; do printf '%s\\0' \"$f\" \"$(stat -c %s \"$f\")\" "
            f"\"$(sha256sum < \"$f\" | cut -d' ' -f1)\"; done", timeout=600)
        fields = res.stdout.split("\0")
        return {fields[i]: (int(fields[i + 1]), fields[i + 2]) for i in range(0, len(fields) - 2, 3)}

    def fetch_tree(self, path: str, dest: Path) -> int:
        """Copy the tree at ``path`` into ``dest`` (same relative layout); returns the file count."""
        files = self.files_under(path)
        for rel in files:
            data = self.read_bytes(f"{path.rstrip('/')}/{rel}")
            if data is None:
                continue
            dest.mkdir(parents=True, exist_ok=True)
            target = inside(dest, rel)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        return len(files)

"""Where a site's own installation of maelflow (the site part ``maelflow site setup`` installs) lives:
read by the job header's choice of command (``container.maelflow_of``), by setup, check and deploy."""

from __future__ import annotations

RECORD = "maelflow-site.json"     # setup's record in the venv, written last


def venv_path(site) -> str:
    return (site.install.venv or f"{site.paths.root.rstrip('/')}/venv").rstrip("/")


def site_part_command(site) -> str:
    return f"{venv_path(site)}/bin/maelflow"


def record_path(site) -> str:
    """Setup's record on the site, written last: its presence means the site part is installed and verified."""
    return f"{venv_path(site)}/{RECORD}"

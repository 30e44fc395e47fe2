"""maelflow's catalogue: datasets, trainings, checkpoints, models and tasks, with lineage.

S3 holds one JSON document per entry (the store of record); a SQLite index answers queries and can be
rebuilt from S3 alone; a FastAPI service speaks the anemoi-registry protocol and serves web pages.
See docs/catalogue.md. Importing this package is cheap: the server parts load only when used.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["CatalogueClient", "__version__"]


def __getattr__(name: str):
    if name == "CatalogueClient":
        from maelflow_registry.client import CatalogueClient

        return CatalogueClient
    raise AttributeError(name)

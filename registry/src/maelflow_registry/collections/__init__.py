"""The catalogue's collections: one declarative definition per file, registered here.

Adding a collection is one file (a :class:`Collection` subclass and a module-level ``collection``
instance, see ``weights.py``) and one line in ``BUILTIN``; another distribution may instead name its
instance in the ``maelflow_registry.collections`` entry-point group. Everything else (the API's
routes and fast lookups, the index, lineage, the web pages and the navigation) is built from this
registry. The order of ``BUILTIN`` is the order of the navigation bar and of ``/settings``.
See docs/extending.md, "A catalogue collection".
"""

from __future__ import annotations

import re
from importlib.metadata import entry_points

from maelflow_registry.collections import benchmarks, datasets, experiments, forecasts, models, tasks, trainings, weights
from maelflow_registry.collections.base import Collection
from maelflow_registry.errors import NotFound

__all__ = ["Collection", "all_collections", "find", "get", "names", "register"]

BUILTIN: tuple[Collection, ...] = (datasets.collection, trainings.collection, weights.collection,
                                   models.collection, forecasts.collection, experiments.collection, tasks.collection,
                                   benchmarks.collection)
GROUP = "maelflow_registry.collections"

NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,39}$")  # also an SQLite table name and a URL segment
# names the service or the index already uses for something else
RESERVED = frozenset({"api", "static", "login", "logout", "lineage", "artefacts", "health", "settings", "docs",
                      "redoc", "openapi", "entries", "fields", "edges", "identities", "meta"})

_REGISTRY: dict[str, Collection] = {}


def register(collection: Collection) -> Collection:
    """Add a collection (at start-up, before the application or the index is made)."""
    name = getattr(collection, "name", None)
    if not isinstance(name, str) or not NAME_RE.match(name) or name in RESERVED:
        raise ValueError(f"collection name {name!r} is not allowed: lower-case letters, digits and '_', "
                         f"not one of {', '.join(sorted(RESERVED))}")
    taken = {alias for c in _REGISTRY.values() for alias in (c.name, *c.aliases)}
    if name in _REGISTRY or {name, *collection.aliases} & taken:
        raise ValueError(f"collection {name!r} (or one of its aliases) is already registered")
    _REGISTRY[name] = collection
    return collection


def _load() -> None:
    for collection in BUILTIN:
        register(collection)
    for ep in sorted(entry_points(group=GROUP), key=lambda ep: ep.name):
        register(ep.load())


def all_collections() -> list[Collection]:
    return list(_REGISTRY.values())


def names() -> list[str]:
    return list(_REGISTRY)


def find(name: str) -> Collection | None:
    return _REGISTRY.get(name)


def get(name: str) -> Collection:
    """The collection called ``name``; 404 otherwise."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise NotFound(f"unknown collection '{str(name)[:60]}'; the collections are: {', '.join(_REGISTRY)}") from None


_load()

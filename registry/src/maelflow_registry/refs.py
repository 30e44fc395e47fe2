"""References (the ends of lineage edges) and where anemoi records name datasets, runs and checkpoints.

An edge end is a *reference*: ``datasets:NAME``, ``weights:UUID``, ``trainings:NAME``, or
``trainings@run_id:RUN`` (the training whose ``run_id`` is RUN, registered or not yet). References
are resolved when the graph is drawn (:mod:`maelflow_registry.lineage`), so the order in which
entries are registered does not matter. The readers here are shared by the collections'
``edges()``: anemoi-training puts the same facts in several places, and each is looked at once.
"""

from __future__ import annotations

import os
from typing import Any, Iterator

from maelflow_registry.keys import KEY_RE


def ref(collection: str, key: str) -> str:
    return f"{collection}:{key}"


def run_ref(run_id: str) -> str:
    return f"trainings@run_id:{run_id}"


class Edges:
    """The (upstream, relation, downstream) edges one entry declares: in order, once each, no self-loop."""

    def __init__(self) -> None:
        self._edges: dict[tuple[str, str, str], None] = {}

    def add(self, src: str, rel: str, dst: str) -> None:
        if src != dst:
            self._edges[(src, rel, dst)] = None

    def __iter__(self) -> Iterator[tuple[str, str, str]]:
        return iter(self._edges)


def dig(data: Any, *path: str) -> Any:
    """``data[p0][p1]...``, or None where a step is missing or not an object."""
    for part in path:
        if not isinstance(data, dict):
            return None
        data = data.get(part)
    return data


def metadata(record: dict) -> dict:
    md = record.get("metadata")
    return md if isinstance(md, dict) else {}


def first_key(*values: Any) -> str | None:
    """The first value that is usable as a key (a safe path segment)."""
    for v in values:
        if isinstance(v, str) and v and KEY_RE.match(v) and len(v) <= 200 and ".." not in v:
            return v
    return None


def dataset_name(value: Any) -> str | None:
    """A dataset name from what a config may hold: a name, a path to a .zarr, or {dataset: ...}."""
    if isinstance(value, dict):
        value = value.get("dataset") or value.get("name")
    if not isinstance(value, str) or not value:
        return None
    base = os.path.basename(value.rstrip("/"))
    for suffix in (".zarr", ".zip"):
        if base.endswith(suffix):
            base = base[: -len(suffix)]
    return first_key(base)


def datasets_used(record: dict) -> list[str]:
    """Dataset names a training or checkpoint record mentions, in the places anemoi puts them."""
    md = metadata(record)
    found: list[Any] = []
    for source in (record, md):
        for fieldname in ("datasets", "dataset"):
            value = source.get(fieldname)
            if isinstance(value, list):
                found.extend(value)
            elif isinstance(value, str):
                found.append(value)
    ds = md.get("dataset")
    if isinstance(ds, dict):  # anemoi-training: the anemoi-datasets metadata of the training data
        args = dig(ds, "arguments", "args")
        if isinstance(args, list):
            found.extend(args)
        found.append(dig(ds, "arguments", "kwargs", "dataset"))
        found.append(ds.get("name"))
    for stage in ("training", "validation", "test"):
        found.append(dig(md, "config", "dataloader", stage, "dataset"))
    found.append(dig(md, "config", "hardware", "files", "dataset"))
    names: dict[str, None] = {}
    for value in found:
        for item in value if isinstance(value, list) else [value]:
            name = dataset_name(item)
            if name:
                names[name] = None
    return list(names)


def uuids(values: Any) -> list[str]:
    """Checkpoint uuids from a list of uuids or of {"uuid": ...} objects."""
    out = []
    if isinstance(values, (list, tuple)):
        for v in values:
            key = first_key(v.get("uuid") if isinstance(v, dict) else v)
            if key:
                out.append(key)
    return out

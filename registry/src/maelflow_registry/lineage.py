"""Lineage: edges derived from what entries already carry, and the graph around one entry.

Nobody has to declare lineage separately (the anemoi-registry client never does): a checkpoint's
metadata names its run (``run_id``), its parent checkpoint (``parent_uuid``), the run it was forked
from (``fork_run_id``) and the datasets it was trained on; a training names its datasets and
checkpoints; an experiment lists checkpoints; a model version names its checkpoint. Each entry's
edges are recomputed whenever it is written, and stored in the index with the entry that declared
them as owner, so rewriting or deleting that entry replaces exactly its own edges.

An edge end is a *reference*: ``datasets:NAME``, ``weights:UUID``, ``trainings:NAME``, or
``trainings@run_id:RUN`` (the training whose ``run_id`` is RUN, registered or not yet). References
are resolved when the graph is drawn, so the order in which entries are registered does not matter.
Edges point downstream: dataset -> training -> checkpoint -> model/experiment.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Protocol

from maelflow_registry.keys import KEY_RE

# column order of the lineage picture
COLUMNS = {"datasets": 0, "trainings": 1, "weights": 2, "experiments": 3, "models": 3, "tasks": 4}
MAX_NODES = 150


def ref(collection: str, key: str) -> str:
    return f"{collection}:{key}"


def run_ref(run_id: str) -> str:
    return f"trainings@run_id:{run_id}"


def _get(data: Any, *path: str) -> Any:
    for part in path:
        if not isinstance(data, dict):
            return None
        data = data.get(part)
    return data


def _first_str(*values: Any) -> str | None:
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
    return _first_str(base)


def datasets_used(record: dict) -> list[str]:
    """Dataset names a training or checkpoint record mentions, in the places anemoi puts them."""
    md = record.get("metadata") if isinstance(record.get("metadata"), dict) else {}
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
        args = _get(ds, "arguments", "args")
        if isinstance(args, list):
            found.extend(args)
        found.append(_get(ds, "arguments", "kwargs", "dataset"))
        found.append(ds.get("name"))
    for stage in ("training", "validation", "test"):
        found.append(_get(md, "config", "dataloader", stage, "dataset"))
    found.append(_get(md, "config", "hardware", "files", "dataset"))
    names: dict[str, None] = {}
    for value in found:
        if isinstance(value, list):
            for item in value:
                name = dataset_name(item)
                if name:
                    names[name] = None
            continue
        name = dataset_name(value)
        if name:
            names[name] = None
    return list(names)


def _uuids(values: Any) -> list[str]:
    out = []
    if isinstance(values, (list, tuple)):
        for v in values:
            key = _first_str(v.get("uuid") if isinstance(v, dict) else v)
            if key:
                out.append(key)
    return out


def run_ids(collection: str, record: dict) -> list[str]:
    """The runs a training *is* (only trainings are identified by their run_id)."""
    if collection != "trainings":
        return []
    md = record.get("metadata") if isinstance(record.get("metadata"), dict) else {}
    rid = _first_str(record.get("run_id"), md.get("run_id"), _get(md, "config", "training", "run_id"))
    return [rid] if rid else []


def refs_of(collection: str, key: str, record: dict) -> list[str]:
    """Every reference that designates this entry."""
    return [ref(collection, key)] + [run_ref(r) for r in run_ids(collection, record)]


def derive_edges(collection: str, key: str, record: dict) -> list[tuple[str, str, str]]:
    """(upstream reference, relation, downstream reference) declared by one entry."""
    me = ref(collection, key)
    md = record.get("metadata") if isinstance(record.get("metadata"), dict) else {}
    edges: dict[tuple[str, str, str], None] = {}

    def add(src: str, rel: str, dst: str) -> None:
        if src != dst:
            edges[(src, rel, dst)] = None

    if collection == "weights":
        training = _first_str(record.get("training"), md.get("training"))
        run = _first_str(record.get("run_id"), md.get("run_id"), _get(md, "config", "training", "run_id"))
        producer = ref("trainings", training) if training else (run_ref(run) if run else None)
        if producer:
            add(producer, "produced", me)
        for name in datasets_used(record):
            # the run consumed the dataset; without a known run the checkpoint itself is the consumer
            add(ref("datasets", name), "trained-on", producer or me)
        parent = _first_str(record.get("parent_uuid"), md.get("parent_uuid"))
        if parent:
            add(ref("weights", parent), "parent-of", me)
        fork = _first_str(record.get("fork_run_id"), md.get("fork_run_id"), record.get("fork"),
                          _get(md, "config", "training", "fork_run_id"))
        if fork and producer:
            add(run_ref(fork), "forked-into", producer)
    elif collection == "trainings":
        for name in datasets_used(record):
            add(ref("datasets", name), "trained-on", me)
        for src in (record, md):
            for fieldname in ("checkpoints", "weights"):
                for uuid in _uuids(src.get(fieldname)):
                    add(me, "produced", ref("weights", uuid))
        fork = _first_str(record.get("fork_run_id"), md.get("fork_run_id"), record.get("fork"), md.get("fork"),
                          _get(md, "config", "training", "fork_run_id"))
        if fork:
            add(run_ref(fork), "forked-into", me)
        parent = _first_str(record.get("parent_uuid"), md.get("parent_uuid"))
        if parent:
            add(ref("weights", parent), "started-from", me)
    elif collection == "experiments":
        for uuid in _uuids(record.get("checkpoints")):
            add(ref("weights", uuid), "evaluated-in", me)
    elif collection == "models":
        versions = record.get("versions") if isinstance(record.get("versions"), dict) else {}
        for number, version in versions.items():
            uuid = _first_str(version.get("weights")) if isinstance(version, dict) else None
            if uuid:
                add(ref("weights", uuid), f"promoted-v{number}", me)
    elif collection == "datasets":
        for fieldname in ("derived_from", "parents"):
            for value in (record.get(fieldname), md.get(fieldname)):
                for item in (value if isinstance(value, list) else [value]):
                    name = dataset_name(item)
                    if name:
                        add(ref("datasets", name), "derived-into", me)
    elif collection == "tasks":
        name = dataset_name(record.get("dataset"))
        if name:
            add(ref("datasets", name), "task", me)
    return list(edges)


class GraphSource(Protocol):
    """What the graph walk needs from the index."""

    def edges_touching(self, refs: Iterable[str]) -> list[tuple[str, str, str]]: ...

    def resolve(self, reference: str) -> list[tuple[str, str, dict]]: ...


@dataclass
class Graph:
    root: str
    nodes: dict[str, dict] = field(default_factory=dict)
    edges: list[dict] = field(default_factory=list)
    truncated: bool = False

    def to_json(self) -> dict:
        return {"root": self.root, "nodes": list(self.nodes.values()), "edges": self.edges,
                "truncated": self.truncated}


def _label(collection: str, key: str, record: dict | None) -> str:
    if record is None:
        return key
    if collection == "trainings" and isinstance(record.get("status"), str):
        return f"{key} ({record['status']})"
    if collection == "models":
        aliases = record.get("aliases") if isinstance(record.get("aliases"), dict) else {}
        if aliases:
            return f"{key} [{', '.join(f'{a}=v{v}' for a, v in sorted(aliases.items()))}]"
    return key


def build_graph(source: GraphSource, collection: str, key: str, record: dict, depth: int = 4,
                max_nodes: int = MAX_NODES) -> Graph:
    """Breadth-first walk, both directions, from one entry; unresolved references become 'missing' nodes."""
    root = ref(collection, key)
    graph = Graph(root=root)
    alias: dict[str, str] = {}  # reference -> node id

    def add_node(coll: str, k: str, rec: dict | None, reference: str | None = None) -> str:
        node_id = ref(coll, k) if rec is not None or reference is None else reference
        if node_id not in graph.nodes:
            graph.nodes[node_id] = {"id": node_id, "collection": coll, "key": k, "label": _label(coll, k, rec),
                                    "missing": rec is None, "column": COLUMNS.get(coll, 4)}
        if rec is not None:
            for r in refs_of(coll, k, rec):
                alias[r] = node_id
        return node_id

    def resolve(reference: str) -> list[str]:
        if reference in alias:
            return [alias[reference]]
        found = source.resolve(reference)
        if found:
            return [add_node(c, k, r) for c, k, r in found]
        coll, _, rest = reference.partition(":")
        coll = coll.split("@")[0]
        label = f"run {rest}" if "@run_id" in reference else rest
        node_id = add_node(coll, label, None, reference)
        alias[reference] = node_id
        return [node_id]

    add_node(collection, key, record)
    frontier = [root]
    expanded: set[str] = set()
    seen_edges: set[tuple[str, str, str]] = set()
    for _ in range(max(depth, 0)):
        if not frontier:
            break
        refs = [r for r, nid in alias.items() if nid in frontier]
        next_frontier: list[str] = []
        for src, rel, dst in source.edges_touching(refs):
            for s in resolve(src):
                for d in resolve(dst):
                    if (s, rel, d) in seen_edges or s == d:
                        continue
                    seen_edges.add((s, rel, d))
                    graph.edges.append({"source": s, "target": d, "relation": rel})
                    for n in (s, d):
                        if n not in frontier and n not in next_frontier:
                            next_frontier.append(n)
            if len(graph.nodes) >= max_nodes:
                graph.truncated = True
                break
        if graph.truncated:
            break
        expanded.update(frontier)
        frontier = [n for n in next_frontier if n not in expanded]
    return graph

"""Lineage: the graph around one entry, walked from the edges that entries declare.

Nobody has to declare lineage separately (the anemoi-registry client never does): each collection
derives the edges an entry implies from what it already carries (a checkpoint's metadata names its
run, parent checkpoint and datasets; a training names its datasets and checkpoints; a model version
names its checkpoint; see :mod:`maelflow_registry.collections`). Each entry's edges are recomputed
whenever it is written, and stored in the index with the entry that declared them as owner, so
rewriting or deleting that entry replaces exactly its own edges. Edge ends are references
(:mod:`maelflow_registry.refs`), resolved here when the graph is drawn. Edges point downstream:
dataset -> training -> checkpoint -> model/experiment.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Protocol

from maelflow_registry import collections
from maelflow_registry.refs import ref

MAX_NODES = 150


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


def build_graph(source: GraphSource, collection: str, key: str, record: dict, depth: int = 4,
                max_nodes: int = MAX_NODES) -> Graph:
    """Breadth-first walk, both directions, from one entry; unresolved references become 'missing' nodes."""
    root = ref(collection, key)
    graph = Graph(root=root)
    alias: dict[str, str] = {}  # reference -> node id

    def add_node(name: str, k: str, rec: dict | None, reference: str | None = None) -> str:
        coll = collections.find(name)  # None: a reference to a collection not registered here
        node_id = ref(name, k) if rec is not None or reference is None else reference
        if node_id not in graph.nodes:
            graph.nodes[node_id] = {"id": node_id, "collection": name, "key": k,
                                    "label": coll.label(k, rec) if coll and rec is not None else k,
                                    "missing": rec is None, "column": coll.column if coll else 4}
        if rec is not None:
            for r in coll.refs(k, rec) if coll else [node_id]:
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

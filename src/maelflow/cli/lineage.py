"""``maelflow lineage ID``: where an entry came from and what was made from it, as a tree.

ID is a key of any collection (a dataset name, a checkpoint uuid, a training name, a model), a
``collection/key``, or a training's run_id. The graph comes from the running catalogue of the
workspace (or ``--url``), so this command shows exactly what the web page draws.
"""

from __future__ import annotations

import json

import click

from maelflow.cli.options import resolve_workspace, workspace_option


def _client(workspace: str | None, url: str | None, token: str | None):
    from maelflow_registry.client import CatalogueClient

    if url:
        return CatalogueClient(url, token)
    from maelflow import catalogue
    from maelflow.services.base import ServiceError

    try:
        return catalogue.client(resolve_workspace(workspace), token=token)
    except ServiceError as exc:
        raise click.ClickException(str(exc)) from None


def render_tree(graph: dict):
    """A rich Tree: the entry, then 'upstream' and 'downstream' branches followed edge by edge."""
    from rich.markup import escape
    from rich.tree import Tree

    nodes = {n["id"]: n for n in graph["nodes"]}
    ups: dict[str, list[tuple[str, str]]] = {}
    downs: dict[str, list[tuple[str, str]]] = {}
    for e in graph["edges"]:
        downs.setdefault(e["source"], []).append((e["relation"], e["target"]))
        ups.setdefault(e["target"], []).append((e["relation"], e["source"]))

    def label(node_id: str, relation: str | None = None) -> str:
        n = nodes[node_id]
        text = f"[bold]{n['collection']}[/]/{escape(n['label'])}"
        if n["missing"]:
            text += " [yellow](not registered)[/]"
        return f"[dim]{escape(relation)}[/] {text}" if relation else text

    def grow(branch, node_id: str, links: dict, seen: set[str]) -> None:
        for relation, other in sorted(links.get(node_id, [])):
            child = branch.add(label(other, relation))
            if other not in seen:
                grow(child, other, links, seen | {other})

    root = graph["root"]
    tree = Tree(label(root))
    if ups.get(root):
        grow(tree.add("[cyan]upstream[/]"), root, ups, {root})
    if downs.get(root):
        grow(tree.add("[cyan]downstream[/]"), root, downs, {root})
    if not graph["edges"]:
        tree.add("[dim]no lineage recorded[/]")
    return tree


@click.command(name="lineage")
@click.argument("ident", metavar="ID")
@workspace_option
@click.option("--collection", default=None, help="Say which collection ID is in, when a key is ambiguous.")
@click.option("--depth", type=click.IntRange(0, 10), default=4, show_default=True, help="How many edges to follow.")
@click.option("--url", default=None, envvar="MAELFLOW_CATALOGUE_URL", help="A catalogue URL instead of the workspace's.")
@click.option("--token", default=None, envvar="MAELFLOW_CATALOGUE_TOKEN", help="Bearer token (read role).")
@click.option("--json", "as_json", is_flag=True, help="Print the graph as JSON.")
def command(ident: str, workspace: str | None, collection: str | None, depth: int, url: str | None,
            token: str | None, as_json: bool) -> None:
    """Show the lineage of ID: dataset -> training -> checkpoint -> model."""
    from maelflow_registry.client import CatalogueClientError

    client = _client(workspace, url, token)
    try:
        graph = client.lineage(ident, collection=collection, depth=depth)
    except CatalogueClientError as exc:
        extra = ""
        if isinstance(exc.body, dict) and exc.body.get("candidates"):
            extra = "; candidates: " + ", ".join(exc.body["candidates"])
        raise click.ClickException(exc.message + extra) from None
    if as_json:
        click.echo(json.dumps(graph, indent=2))
        return
    from rich.console import Console

    Console().print(render_tree(graph))

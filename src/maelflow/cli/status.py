"""maelflow status: the node tree with states, labels, meters and events, as in ecFlow UI."""

from __future__ import annotations

import json

import click
from rich.tree import Tree

from maelflow.cli.common import console
from maelflow.cli.options import resolve_workspace, workspace_option

# ecFlow UI's default state colours
COLOURS = {"unknown": "grey50", "complete": "yellow", "queued": "cyan", "submitted": "turquoise2",
           "active": "green", "aborted": "red", "suspended": "orange3"}


def _meter_bar(value: int, lo: int, hi: int, width: int = 10) -> str:
    frac = 0 if hi <= lo else (value - lo) / (hi - lo)
    full = round(max(0.0, min(1.0, frac)) * width)
    return "█" * full + "░" * (width - full)


def render(node: dict, parent: Tree | None = None) -> Tree:
    state = "suspended" if node.get("suspended") else node["state"]
    text = f"[{COLOURS.get(state, 'white')}]■[/] [bold]{node['name']}[/] [{COLOURS.get(state, 'white')}]{state}[/]"
    if node.get("try_no"):
        text += f" [dim]try {node['try_no']}[/]"
    for name, m in node.get("meters", {}).items():
        text += f"  {name} {_meter_bar(m['value'], m['min'], m['max'])} {m['value']}/{m['max']}"
    for name, value in node.get("events", {}).items():
        text += f"  [{'green' if value else 'dim'}]⚑ {name}[/]"
    if node.get("trigger"):
        text += f"  [dim]trigger {node['trigger']}[/]"
    if node.get("complete"):
        text += f"  [dim]complete if {node['complete']}[/]"
    for name, lim in node.get("limits", {}).items():
        text += f"  [dim]limit {name} {lim['value']}/{lim['limit']}[/]"
    branch = parent.add(text) if parent is not None else Tree(text)
    for name, value in node.get("labels", {}).items():
        if value:
            branch.add(f"[magenta]{name}[/]: {value}", highlight=False)
    if node.get("aborted_reason") and node["state"] == "aborted":
        branch.add(f"[red]why: {node['aborted_reason']}[/]", highlight=False)
        if node.get("resubmissions_left"):
            branch.add(f"[yellow]resubmitted at the relay's next pass ({node['resubmissions_left']} left)[/]",
                       highlight=False)
    for child in node.get("children", []):
        render(child, branch)
    return branch


def follow(client, suite: str, timeout: float, interval: float = 2.0) -> str:
    """Print each task's state changes until the suite settles (``maelflow.suite.follow``); returns
    the final state."""
    from maelflow.suite.follow import follow as follow_suite

    def show(n: dict) -> None:
        extra = f"  ({n['aborted_reason']})" if n["state"] == "aborted" else ""
        console.print(f"  {n['path']}: [{COLOURS.get(n['state'], 'white')}]{n['state']}[/]{extra}", highlight=False)

    state, last = follow_suite(client, suite, timeout, interval, on_task=show)
    console.print(render(last))
    return state


@click.command("status")
@click.argument("suite", required=False)
@workspace_option
@click.option("--json", "as_json", is_flag=True, help="Print the node tree as JSON.")
def command(suite: str | None, workspace: str | None, as_json: bool) -> None:
    """Show SUITE (or every suite) on the workspace's ecFlow server."""
    from maelflow.ecf import client_for
    from maelflow.suite.server import tree

    data = tree(client_for(resolve_workspace(workspace)), suite)
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    if not data["suites"]:
        console.print(f"server {data['server_state']}: no suites loaded")
    for s in data["suites"]:
        console.print(render(s))

"""Waiting on a real ecflow_server from tests."""

from __future__ import annotations

import time

from maelflow.suite.server import find, tree


def wait_for(client, path: str, states: set[str], timeout: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout
    node = None
    while time.monotonic() < deadline:
        node = find(tree(client, path.split("/")[1]), path)
        if node and node["state"] in states:
            return node
        time.sleep(0.5)
    raise AssertionError(f"{path} did not reach {states} in {timeout:.0f} s; last: {node}")

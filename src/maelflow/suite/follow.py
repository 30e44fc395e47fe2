"""Following a running suite until nothing more will happen in it by itself.

ecFlow shows a suite ``aborted`` as soon as any one task aborts (the most significant state of its
children), while other branches may still be running, a task ecFlow retries (``ECF_TRIES``) is about
to be submitted again, or a job stopped at its time limit waits for the relay's resubmission pass.
An operator who asked ``deploy --wait`` wants the end of the run, not its first bad news: so a suite
is *settled* when it is complete, or when it is aborted, no task has resubmissions left after a
time-limit abort (the tree's ``resubmissions_left``: the relay will requeue it, however long its
pass takes), and no task has been submitted or active for two polls in a row (a retry passes
through ``submitted`` between them).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

RUNNING = frozenset({"submitted", "active"})


def tasks(node: dict) -> Iterator[dict]:
    """Every task under ``node`` (a node of ``maelflow.suite.server.tree``), in suite order."""
    stack = [node]
    while stack:
        n = stack.pop()
        if n["kind"] == "task":
            yield n
        stack.extend(reversed(n.get("children", [])))


def still_moving(suite: dict) -> bool:
    """A task runs, or waits to be resubmitted after its time limit."""
    return any(t["state"] in RUNNING or t.get("resubmissions_left") for t in tasks(suite))


def follow(client, suite: str, timeout: float, interval: float = 2.0,
           on_task: Callable[[dict], None] | None = None) -> tuple[str, dict]:
    """Poll ``suite`` until it settles or ``timeout`` seconds pass; ``on_task(node)`` is called for
    each task whose state changed since the last poll. Returns the final state (``complete``,
    ``aborted`` or ``timed out``) and the suite's last node tree."""
    from maelflow.suite.server import tree

    deadline = time.monotonic() + timeout
    seen: dict[str, str] = {}
    quiet_aborted = 0
    while True:
        s = tree(client, suite)["suites"][0]
        for t in tasks(s):
            if seen.get(t["path"]) != t["state"]:
                seen[t["path"]] = t["state"]
                if on_task is not None:
                    on_task(t)
        if s["state"] == "complete":
            return "complete", s
        quiet_aborted = quiet_aborted + 1 if s["state"] == "aborted" and not still_moving(s) else 0
        if quiet_aborted >= 2:
            return "aborted", s
        if time.monotonic() > deadline:
            return "timed out", s
        time.sleep(interval)

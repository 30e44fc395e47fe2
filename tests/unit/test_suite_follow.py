"""When `deploy --wait` stops following a suite: complete, or aborted with nothing left running.

The polls are scripted node trees in the shape `maelflow.suite.server.tree` returns (what the ecFlow
client reads); tests/integration cover the real server.
"""

from __future__ import annotations

import pytest

from maelflow.suite import follow as follow_mod

pytestmark = pytest.mark.unit


def suite(state: str, resubmissions_left: int = 0, **tasks: str) -> dict:
    fam = [{"kind": "task", "name": n, "path": f"/s/f/{n}", "state": st, "children": []} for n, st in tasks.items()]
    if resubmissions_left:
        fam[0]["resubmissions_left"] = resubmissions_left
    return {"kind": "suite", "name": "s", "path": "/s", "state": state,
            "children": [{"kind": "family", "name": "f", "path": "/s/f", "state": state, "children": fam}]}


def run(monkeypatch, polls: list[dict], timeout: float = 60) -> tuple[str, dict, list[tuple[str, str]], int]:
    seen: list[tuple[str, str]] = []
    calls = {"n": 0}

    def tree(client, name):
        i = min(calls["n"], len(polls) - 1)
        calls["n"] += 1
        return {"suites": [polls[i]]}

    monkeypatch.setattr("maelflow.suite.server.tree", tree)
    state, last = follow_mod.follow(None, "s", timeout, interval=0, on_task=lambda t: seen.append((t["name"], t["state"])))
    return state, last, seen, calls["n"]


def test_an_abort_while_another_branch_runs_is_followed_to_the_end(monkeypatch):
    polls = [suite("active", a="active", b="active"),
             suite("aborted", a="aborted", b="active"),     # ecFlow shows the suite aborted already
             suite("aborted", a="aborted", b="active"),
             suite("aborted", a="aborted", b="complete"),
             suite("aborted", a="aborted", b="complete")]
    state, last, seen, calls = run(monkeypatch, polls)
    assert state == "aborted" and calls == 5
    assert ("b", "complete") in seen and [t["state"] for t in follow_mod.tasks(last)] == ["aborted", "complete"]


def test_a_retried_task_passing_through_submitted_is_not_an_end(monkeypatch):
    polls = [suite("aborted", a="aborted"), suite("active", a="submitted"), suite("active", a="active"),
             suite("complete", a="complete")]
    state, _, seen, _ = run(monkeypatch, polls)
    assert state == "complete" and seen == [("a", "aborted"), ("a", "submitted"), ("a", "active"), ("a", "complete")]


def test_a_time_limit_abort_waits_for_its_resubmission_however_long_the_relay_takes(monkeypatch):
    waiting = suite("aborted", resubmissions_left=2, a="aborted")
    polls = [waiting] * 6 + [suite("active", a="submitted"), suite("complete", a="complete")]
    state, _, seen, calls = run(monkeypatch, polls)
    assert state == "complete" and calls == 8 and ("a", "submitted") in seen
    # its last resubmission used: the abort is the end
    state, _, _, calls = run(monkeypatch, [suite("aborted", a="aborted")] * 3)
    assert state == "aborted" and calls == 2


def test_timeout_is_reported_as_such(monkeypatch):
    state, _, _, _ = run(monkeypatch, [suite("active", a="active")], timeout=0)
    assert state == "timed out"

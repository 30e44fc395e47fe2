"""What `maelflow status` shows an operator of a task that will not stay as it is: a complete
expression (a skipped fine-tuning cycle), a time-limit abort the relay is about to resubmit."""

from __future__ import annotations

import pytest
from rich.console import Console

from maelflow.cli.status import render

pytestmark = pytest.mark.unit


def shown(node: dict) -> str:
    console = Console(record=True, width=200)
    console.print(render(node))
    return console.export_text()


def test_a_time_limit_abort_says_it_will_be_resubmitted_and_a_plain_abort_does_not():
    task = {"name": "train", "state": "aborted", "aborted_reason": "TIMEOUT∶ the SLURM time limit of job 7 was reached",
            "resubmissions_left": 2, "labels": {}, "events": {}, "meters": {}}
    text = shown(task)
    assert "why: TIMEOUT∶ the SLURM time limit of job 7" in text
    assert "resubmitted at the relay's next pass (2 left)" in text
    assert "resubmitted" not in shown({**task, "resubmissions_left": 0, "aborted_reason": "exit 1"})


def test_a_complete_expression_is_shown_beside_the_trigger():
    text = shown({"name": "ft_gate", "state": "complete", "trigger": "ft_evaluate == complete",
                  "complete": "ft_warmstart:skip", "events": {"promoted": False}})
    assert "trigger ft_evaluate == complete" in text and "complete if ft_warmstart:skip" in text

"""Abort reasons must survive ecFlow's definition format (see maelflow.reporting.abort_text)."""

import pytest

from maelflow.reporting import Reporter, abort_text

pytestmark = pytest.mark.unit


def test_colons_and_hashes_never_reach_the_task_line():
    text = abort_text("DistNetworkError: port: 50171,\n code: -98 # at rendezvous.py:199")
    assert ":" not in text and "#" not in text and "\n" not in text
    assert text == "DistNetworkError\u2236 port\u2236 50171, code\u2236 -98 %23 at rendezvous.py\u2236199"


def test_the_reason_file_fits_the_header_and_stays_utf8(tmp_path):
    path = tmp_path / "why"
    Reporter({"MAELFLOW_ABORT_FILE": str(path)}).abort_reason("x:" * 500)
    data = path.read_bytes()
    assert len(data) <= 400 and data.decode("utf-8").startswith("x\u2236x\u2236")

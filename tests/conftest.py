"""Shared test helpers: a private config root built from the project's own configs."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def write_yaml(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture
def config_root(tmp_path) -> Path:
    """A copy of configs/ that a test may change without touching the project's files."""
    root = tmp_path / "configs"
    shutil.copytree(REPO / "configs", root)
    return root


# suite tests about scheduling, killing or relaying need a dataset, not its build with
# anemoi-datasets (which the demo test and test_anemoi do): they use the numpy-made synth-small-numpy-10p0-2020-2020-6h-v1
FAST_DATASET = "synth-small-numpy-10p0-2020-2020-6h-v1"
PREBUILT = "training.tiny.datasets=[synth-small-numpy-10p0-2020-2020-6h-v1]"


def pytest_collection_modifyitems(config, items):
    """Every test is a unit or an integration test: CI selects by these markers
    (``-m "unit or integration"``), so a test with neither would silently never run there."""
    unmarked = [item.nodeid for item in items
                if not any(item.get_closest_marker(m) for m in ("unit", "integration"))]
    if unmarked:
        raise pytest.UsageError("tests without a unit or integration marker (CI would never run them): "
                                + ", ".join(unmarked[:10]) + (" ..." if len(unmarked) > 10 else ""))
    # tests of the current anemoi line run in their own environment (.venv-anemoi17, which .ci/run
    # makes and runs them in); in an environment with another anemoi-training they are deselected
    current = [item for item in items if item.get_closest_marker("anemoi_current")]
    if current and not _current_anemoi_installed():
        items[:] = [item for item in items if not item.get_closest_marker("anemoi_current")]
        config.hook.pytest_deselected(items=current)


def _current_anemoi_installed() -> bool:
    from maelflow.training.anemoi_versions import AnemoiVersionError, LINES, installed_version, line_for

    version = installed_version()
    try:
        return version is not None and line_for(version) is LINES[-1]
    except AnemoiVersionError:
        return False


@pytest.fixture(autouse=True)
def _mlflow_tracking_uri_stays_per_test():
    """``mlflow.set_tracking_uri`` also sets ``MLFLOW_TRACKING_URI`` in this process's environment, so a
    test that logs in-process would point every later test of the same xdist worker (and the
    commands it starts) at its own, by then stopped, server."""
    import os

    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before


LEDGERS = Path("/tmp") / f"maelflow-test-ledgers-{__import__('os').getuid()}"


def pytest_configure(config):
    """The session's service ledger (``maelflow.services.base.LEDGER_ENV``), after stopping what a
    killed earlier session left running: its fixtures never reached their teardown, and its
    servers, sshd and slurmd would otherwise hold ports and CPU until the machine restarts.
    Only the controller does this (xdist workers inherit the ledger through the environment)."""
    import os

    from maelflow.services.base import LEDGER_ENV, pid_alive, process_start, reap_ledger

    if hasattr(config, "workerinput"):
        return
    LEDGERS.mkdir(mode=0o700, exist_ok=True)
    for ledger in LEDGERS.glob("*.ledger"):
        owner, _, start = ledger.stem.partition("-")
        if owner.isdigit() and start.isdigit() and pid_alive(int(owner)) \
                and process_start(int(owner)) == int(start):
            continue            # a session still running (another terminal, another helper)
        stopped = reap_ledger(ledger)
        if stopped:
            print(f"stopped {len(stopped)} service processes a killed test session left running: {stopped}")
        ledger.unlink(missing_ok=True)
    own = LEDGERS / f"{os.getpid()}-{process_start(os.getpid())}.ledger"
    own.touch()
    config._maelflow_ledger = own
    os.environ[LEDGER_ENV] = str(own)


def pytest_unconfigure(config):
    own = getattr(config, "_maelflow_ledger", None)
    if own is not None:
        own.unlink(missing_ok=True)

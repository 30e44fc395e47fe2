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

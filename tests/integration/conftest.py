"""Fixtures that start real services in throw-away workspaces and always stop them again."""

from __future__ import annotations

from typing import Callable, Iterator

import pytest

from maelflow.services import stack as stack_mod
from maelflow.services.base import ServiceInfo
from maelflow.workspace import Workspace


@pytest.fixture
def workspace(tmp_path) -> Workspace:
    """A fresh, empty workspace for one test."""
    return Workspace(tmp_path / "ws")


@pytest.fixture(scope="session")
def stack(tmp_path_factory) -> Iterator[tuple[Workspace, dict[str, ServiceInfo]]]:
    """The default stack (ecflow, s3, mlflow), shared by every test that only uses it.

    Tests that stop or restart services must use their own workspace (see ``services``).
    """
    ws = Workspace(tmp_path_factory.mktemp("stack"))
    try:
        yield ws, stack_mod.up(ws)
    finally:
        stack_mod.down(ws)


@pytest.fixture
def services() -> Iterator[Callable[..., dict[str, ServiceInfo]]]:
    """``services(ws, "ecflow", "s3")`` starts those services in ``ws``; all are stopped at teardown."""
    started: list[Workspace] = []

    def start(ws: Workspace, *names: str) -> dict[str, ServiceInfo]:
        started.append(ws)
        return stack_mod.up(ws, names=names or None)

    yield start
    for ws in started:
        stack_mod.down(ws)


@pytest.fixture(scope="module")
def hpc_stack(tmp_path_factory) -> Iterator[Workspace]:
    """The default stack plus the loopback HPC site (sshd + SLURM as the site user), for one test
    module; the site's folders go with it."""
    from maelflow_sandbox import hpc

    ws = Workspace(tmp_path_factory.mktemp("hpcstack") / "ws")
    try:
        stack_mod.up(ws, extra=["hpc"])
        yield ws
    finally:
        stack_mod.down(ws)
        hpc.forget(ws)

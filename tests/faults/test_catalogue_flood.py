"""The catalogue server under a flood of connections, and ``maelflow catalogue reconcile`` (issue 17).

The real service (``maelflow catalogue serve`` under uvicorn) in a workspace of its own whose
settings allow few connections: past ``max_connections`` uvicorn answers 503 at once instead of
taking more work (``limit_concurrency``), it serves again once the flood is gone, and an idle
keep-alive connection is closed after ``keep_alive_seconds``. The reconcile command runs the
registry's own reconcile pass against the real S3 documents, as the server does on its timer.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest

from maelflow.services import stack as stack_mod
from maelflow.services.catalogue import open_store
from maelflow.workspace import Workspace, catalogue_paths
from maelflow_registry.auth import TokenStore
from maelflow_registry.config import Settings, load_settings, save_settings
from tests.integration.test_catalogue_support import CatalogueEnv, dataset_name, dataset_record

pytestmark = pytest.mark.integration

MAX_CONNECTIONS = 4


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    ws = Workspace(tmp_path_factory.mktemp("catalogue-flood"))
    paths = catalogue_paths(ws)
    save_settings(paths, Settings(max_connections=MAX_CONNECTIONS, keep_alive_seconds=1, reconcile_seconds=0))
    try:
        infos = stack_mod.up(ws, names=["s3", "catalogue"])
        env = CatalogueEnv(ws, infos["catalogue"].url)
        env.tokens["write"] = TokenStore(paths).create("write", name="flood-write")[0]
        yield env
    finally:
        stack_mod.down(ws)


def _address(env) -> tuple[str, int]:
    u = urllib.parse.urlsplit(env.url)
    return u.hostname, u.port


def _get(env, path: str = "/health") -> int:
    try:
        with urllib.request.urlopen(env.url.rstrip("/") + path, timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_a_flood_of_connections_gets_503_and_the_server_serves_again_after(env):
    assert _get(env) == 200
    flood = [socket.create_connection(_address(env), timeout=10) for _ in range(MAX_CONNECTIONS + 4)]
    try:
        time.sleep(0.3)                                   # the server has accepted them all
        assert _get(env) == 503                           # refused at once: no more work taken
    finally:
        for s in flood:
            s.close()
    deadline = time.monotonic() + 10
    while _get(env) != 200:
        assert time.monotonic() < deadline, "the catalogue did not serve again after the flood"
        time.sleep(0.2)


def test_an_idle_keep_alive_connection_is_closed(env):
    host, port = _address(env)
    with socket.create_connection((host, port), timeout=10) as s:
        s.sendall(f"GET /health HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
        first = s.recv(65536)
        assert first.startswith(b"HTTP/1.1 200")
        t0 = time.monotonic()
        rest = b""
        while True:                                        # the server closes it: recv returns b""
            chunk = s.recv(65536)
            if not chunk:
                break
            rest += chunk
        assert time.monotonic() - t0 < 5                   # keep_alive_seconds=1, not uvicorn's default


def test_reconcile_command_drops_an_entry_whose_document_is_gone(env):
    c = env.client("write")
    name = dataset_name("reconciled")
    c.create("datasets", dataset_record(name))
    store = open_store(env.ws, load_settings(catalogue_paths(env.ws)))[0]
    store.delete_document("datasets", name)
    run = subprocess.run([sys.executable, "-m", "maelflow", "catalogue", "reconcile", "--json",
                          "--workspace", str(env.ws.root)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    found = json.loads(run.stdout)
    assert found["lost"] == 1 and found["added"] == 0 and found["bucket"] == "catalogue"
    assert _get(env, f"/api/v1/datasets/{name}") == 404
    again = subprocess.run([sys.executable, "-m", "maelflow", "catalogue", "reconcile", "--workspace",
                            str(env.ws.root)], capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "0 entries dropped" in again.stdout, again.stdout + again.stderr

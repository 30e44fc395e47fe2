"""The embedded stack against the real ecflow_server, rclone S3 and MLflow server."""

from __future__ import annotations

import json
import time
import uuid

import pytest
from click.testing import CliRunner

from maelflow.cli.main import cli
from maelflow.ecf import client_for
from maelflow.ewc import workspace_store
from maelflow.s3 import object_store
from maelflow.services import stack as stack_mod
from maelflow.services.base import ServiceError, pid_alive, port_is_free

pytestmark = pytest.mark.integration

DEFAULT = ("ecflow", "s3", "mlflow")


def listeners(port: int) -> list[str]:
    """Local addresses (hex, as in /proc/net/tcp*) of the sockets listening on ``port``."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = open(table).read().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            fields = line.split()
            addr, hex_port = fields[1].rsplit(":", 1)
            if fields[3] == "0A" and int(hex_port, 16) == port:  # 0A = LISTEN
                found.append(addr)
    return found


def port_of(info) -> int:
    return int(info.url.rsplit(":", 1)[1])


def test_up_gives_healthy_services_on_loopback_only(stack):
    ws, infos = stack
    assert set(DEFAULT) <= set(infos)
    for name in DEFAULT:
        info = infos[name]
        assert info.healthy and pid_alive(info.pid), (name, info)
        addrs = listeners(port_of(info))
        assert addrs == ["0100007F"], f"{name} listens on {addrs}, want 127.0.0.1 only"


def test_up_twice_is_idempotent(stack):
    ws, infos = stack
    again = stack_mod.up(ws)
    for name in DEFAULT:
        assert (again[name].pid, again[name].url) == (infos[name].pid, infos[name].url)


def test_s3_round_trip_and_wrong_key_refused(stack):
    import obstore
    from obstore.exceptions import PermissionDeniedError

    ws, infos = stack
    s3 = workspace_store(ws)
    key = f"tests/{uuid.uuid4().hex}/hello.txt"
    obstore.put(s3, key, b"hello ewc")
    assert bytes(obstore.get(s3, key).bytes()) == b"hello ewc"
    assert [o["path"] for o in obstore.list(s3, key.rsplit("/", 1)[0]).collect()] == [key]
    assert set(infos["s3"].extra) >= {"endpoint_url", "bucket", "access_key", "secret_key"}
    for bucket in ("ewc", "catalogue"):                   # made as folders before the server started
        obstore.list_with_delimiter(workspace_store(ws, bucket))

    extra = infos["s3"].extra
    intruder = object_store({**extra, "secret_key": "not-the-secret"}, max_retries=0)
    with pytest.raises(PermissionDeniedError, match="403"):
        obstore.get(intruder, key)


def test_s3_concurrent_puts_into_one_folder_stay_readable(stack):
    """rclone 1.75.1/1.75.2 could leave an object written by concurrent PUTs into one folder
    unreadable for the life of the server (its entry pointing at a vanished temporary file); the
    pinned rclone must serve every acknowledged object, at worst after a short read-after-write
    window that the stage's re-reads ride out."""
    from concurrent.futures import ThreadPoolExecutor

    import obstore

    ws, _ = stack
    s3 = workspace_store(ws)
    base = f"tests/{uuid.uuid4().hex}"
    payloads = {f"{base}/r{r}/data/{i}.0": bytes([r, i]) * 5_000 for r in range(12) for i in range(42)}

    def read_back(key: str) -> bytes:
        for _ in range(20):
            try:
                got = bytes(obstore.get(s3, key).bytes())
                if got == payloads[key]:
                    return got
            except Exception:                              # noqa: BLE001 - the window, retried below
                pass
            time.sleep(0.1)
        return b""

    with ThreadPoolExecutor(8) as pool:
        for r in range(12):
            keys = [k for k in payloads if k.startswith(f"{base}/r{r}/")]
            list(pool.map(lambda k: obstore.put(s3, k, payloads[k]), keys))
            unreadable = [k for k, got in zip(keys, pool.map(read_back, keys)) if got != payloads[k]]
            assert not unreadable, f"acknowledged objects unreadable after 2 s: {unreadable}"


def test_mlflow_experiment_run_metric(stack):
    from mlflow import MlflowClient

    ws, infos = stack
    client = MlflowClient(tracking_uri=infos["mlflow"].url)
    exp_id = client.create_experiment(f"test-{uuid.uuid4().hex[:8]}")
    run = client.create_run(exp_id)
    client.log_metric(run.info.run_id, "loss", 0.25, step=1)
    client.set_terminated(run.info.run_id)
    assert client.get_run(run.info.run_id).data.metrics["loss"] == 0.25


def test_status_json_through_cli(stack):
    ws, infos = stack
    result = CliRunner().invoke(cli, ["services", "status", "--workspace", str(ws.root), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    for name in DEFAULT:
        assert {"url", "pid", "healthy"} <= set(data[name])
        assert data[name]["healthy"] is True and data[name]["pid"] == infos[name].pid
    assert data["s3"]["secret_key"].startswith("***") and data["s3"]["endpoint_url"] == infos["s3"].url
    shown = json.loads(CliRunner().invoke(cli, ["services", "status", "--workspace", str(ws.root), "--json",
                                                "--show-secrets"]).output)
    assert shown["s3"]["secret_key"] == infos["s3"].extra["secret_key"]


def test_ecflow_client_for_workspace(stack):
    ws, _ = stack
    ci = client_for(ws)
    ci.sync_local()
    assert str(ci.get_defs().get_server_state()) == "RUNNING"


def test_restart_keeps_suite_objects_and_credentials_then_down_stops_all(workspace, services):
    import ecflow

    first = services(workspace, "ecflow", "s3")
    ci = client_for(workspace)
    defs = ecflow.Defs()
    defs.add_suite("keepme").add_task("t1")
    ci.load(defs)
    import obstore

    obstore.put(workspace_store(workspace), "kept.txt", b"still here")

    stopped = stack_mod.down(workspace)
    for name in ("ecflow", "s3"):
        assert stopped[name].detail == f"stopped (pid {first[name].pid})"
        assert not pid_alive(first[name].pid)
        assert port_is_free(port_of(first[name]))
    with pytest.raises(ServiceError, match="maelflow services up"):
        client_for(workspace)

    second = services(workspace, "ecflow", "s3")
    assert second["ecflow"].url == first["ecflow"].url  # same port, so the same checkpoint file
    ci = client_for(workspace)
    ci.sync_local()
    server = ci.get_defs()
    assert [s.name() for s in server.suites] == ["keepme"]
    assert str(server.get_server_state()) == "RUNNING"
    assert second["s3"].extra["secret_key"] == first["s3"].extra["secret_key"]
    assert bytes(obstore.get(workspace_store(workspace), "kept.txt").bytes()) == b"still here"


def test_down_through_cli_stops_every_pid(workspace, services):
    started = services(workspace, *DEFAULT)
    t0 = time.monotonic()
    result = CliRunner().invoke(cli, ["services", "down", "--workspace", str(workspace.root)])
    assert result.exit_code == 0, result.output
    assert time.monotonic() - t0 < 30
    for name in DEFAULT:
        assert f"{name}: stopped (pid {started[name].pid})" in result.output
        assert not pid_alive(started[name].pid)
    status = stack_mod.status(workspace)
    assert not any(info.running for info in status.values())

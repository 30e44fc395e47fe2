"""Per-role S3 keys of the workspace store (issue 17, item 3) against the real servers.

rclone has no per-key policy, so each role is its own ``rclone serve s3`` of its own buckets
(``maelflow.services.s3``): these tests send real signed requests with each role's keys and check
what the server does, and what reaches the data folder.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import pytest
from click.testing import CliRunner

from maelflow.cli.main import cli
from maelflow.s3 import settings_from_service
from maelflow.ewc import workspace_store
from maelflow.s3 import object_store
from maelflow.services import stack as stack_mod

pytestmark = pytest.mark.integration


def _roles(ws) -> dict:
    return stack_mod.discover(ws, "s3").extra["roles"]


def _store(settings: dict, bucket: str | None = None):
    return object_store(settings, bucket, max_retries=0)


def _read_eventually(store, key: str, seconds: float = 5.0) -> bytes:
    """The read server sees the writer's objects once its listing expires (READ_DIR_CACHE)."""
    import obstore

    deadline = time.monotonic() + seconds
    while True:
        try:
            return bytes(obstore.get(store, key).bytes())
        except FileNotFoundError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _refused(call) -> str:
    """The error text of a request the server must refuse (any non-2xx answer)."""
    with pytest.raises(Exception) as caught:   # noqa: PT011 - obstore maps 403/404/500 to different classes
        call()
    return str(caught.value)


def test_roles_have_their_own_keys_servers_and_buckets(stack):
    ws, _ = stack
    roles = _roles(ws)
    assert set(roles) == {"read", "write", "catalogue"}
    assert len({r["access_key"] for r in roles.values()}) == 3
    assert len({r["endpoint_url"] for r in roles.values()}) == 3
    assert roles["read"]["buckets"] == roles["write"]["buckets"]
    assert "ewc" in roles["write"]["buckets"] and roles["catalogue"]["buckets"] == ["catalogue"]
    # one role's key is not accepted by another role's server
    import obstore

    crossed = {**roles["write"], "access_key": roles["read"]["access_key"], "secret_key": roles["read"]["secret_key"]}
    assert "InvalidAccessKeyId" in _refused(lambda: obstore.list_with_delimiter(_store(crossed)))


def test_read_only_key_reads_but_cannot_write_or_delete(stack):
    import obstore

    ws, _ = stack
    roles = _roles(ws)
    data_dir = Path(stack_mod.discover(ws, "s3").extra["data_dir"])
    key = f"tests/{uuid.uuid4().hex}/obj.bin"
    obstore.put(_store(roles["write"]), key, b"published")
    reader = _store(roles["read"])
    assert _read_eventually(reader, key) == b"published"
    assert [o["path"] for o in obstore.list(reader, key.rsplit("/", 1)[0]).collect()] == [key]

    new = key.replace("obj.bin", "planted.bin")
    text = _refused(lambda: obstore.put(reader, new, b"planted"))
    assert "PUT" in text and ("500" in text or "403" in text)     # rclone 1.75 --read-only: 500 InternalError
    _refused(lambda: obstore.put(reader, key, b"overwritten"))
    _refused(lambda: obstore.delete(reader, key))
    assert not (data_dir / "ewc" / new).exists()
    assert (data_dir / "ewc" / key).read_bytes() == b"published"
    assert bytes(obstore.get(_store(roles["write"]), key).bytes()) == b"published"


def test_only_the_catalogue_key_writes_the_catalogue_bucket(stack):
    import obstore

    ws, _ = stack
    roles = _roles(ws)
    data_dir = Path(stack_mod.discover(ws, "s3").extra["data_dir"])
    key = f"entries/test-{uuid.uuid4().hex}.json"
    for role in ("write", "read"):
        text = _refused(lambda: obstore.put(_store(roles[role], "catalogue"), key, b"{}"))
        assert "NoSuchBucket" in text or "404" in text, text
    assert not (data_dir / "catalogue" / key).exists()
    # and the catalogue's key has no datasets bucket
    _refused(lambda: obstore.put(_store(roles["catalogue"], "ewc"), f"tests/{uuid.uuid4().hex}", b"x"))
    obstore.put(_store(roles["catalogue"], "catalogue"), key, b"{}")
    assert (data_dir / "catalogue" / key).read_bytes() == b"{}"
    obstore.delete(_store(roles["catalogue"], "catalogue"), key)
    # the one place that makes S3 clients picks the catalogue's server for its bucket
    assert workspace_store(ws, "catalogue") is not None
    obstore.list_with_delimiter(workspace_store(ws, "catalogue"), "entries/")


def test_client_config_read_role_gets_read_only_keys(stack, tmp_path):
    ws, infos = stack
    stack_mod.up(ws, names=["catalogue"])
    roles = _roles(ws)
    for role, expected in (("read", "read"), ("write", "write")):
        folder = tmp_path / role
        result = CliRunner().invoke(cli, ["catalogue", "client-config", "--workspace", str(ws.root),
                                          "--role", role, "--dir", str(folder)])
        assert result.exit_code == 0, result.output
        secrets = (folder / "settings.secrets.toml").read_text()
        public = (folder / "settings.toml").read_text()
        assert f'access_key_id = "{roles[expected]["access_key"]}"' in secrets
        assert roles["catalogue"]["access_key"] not in secrets
        assert roles[expected]["endpoint_url"] in public
    read_only = settings_from_service(stack_mod.discover(ws, "s3").extra, "read")
    import obstore

    _refused(lambda: obstore.put(_store(read_only), f"tests/{uuid.uuid4().hex}", b"x"))


def test_services_status_hides_every_roles_secret(stack):
    ws, _ = stack
    result = CliRunner().invoke(cli, ["services", "status", "--workspace", str(ws.root), "--json"])
    assert result.exit_code == 0, result.output
    shown = json.loads(result.output)["s3"]
    for role, settings in shown["roles"].items():
        assert settings["secret_key"].startswith("***"), role
    for role, settings in _roles(ws).items():
        assert settings["secret_key"] not in result.output


def test_a_site_gets_only_the_read_only_keys(stack, tmp_path):
    """What deploy (and a stage on a site's login node) leaves in ``<site root>/.maelflow/ewc.json``:
    the read role's keys, with which the job can read the datasets and write nothing."""
    import obstore

    from maelflow.datasets.settings import load_site
    from maelflow.datasets.stage import ensure_site_credentials
    from maelflow.sites.connections import connect

    ws, _ = stack
    root = tmp_path / "site-root"
    site = load_site("local", ws, (f"paths.root={root}",))
    path = ensure_site_credentials(ws, connect("local", site), site)
    placed = json.loads(Path(path).read_text())
    assert (Path(path).stat().st_mode & 0o777) == 0o600
    roles = _roles(ws)
    assert placed["access_key"] == roles["read"]["access_key"]
    assert placed["endpoint_url"] == roles["read"]["endpoint_url"]
    assert placed["access_key"] not in {roles["write"]["access_key"], roles["catalogue"]["access_key"]}
    _refused(lambda: obstore.put(_store(placed), f"tests/{uuid.uuid4().hex}", b"from a site"))
    obstore.list_with_delimiter(_store(placed))

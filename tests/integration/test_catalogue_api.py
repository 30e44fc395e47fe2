"""The catalogue's REST API against the real service and the real rclone S3 server.

Covers the anemoi-registry conventions (filters, default containers, task stamps, '//' paths), the
4xx answers to bad requests with proof that nothing was written, authorisation, concurrent
writers, models, lineage, artefacts, and an index deleted and rebuilt from S3 alone.
"""

from __future__ import annotations

import datetime
import json
import subprocess
import sys
import threading
import uuid

import pytest
import requests
from click.testing import CliRunner

from maelflow.cli.main import cli
from maelflow_registry.client import CatalogueClientError
from maelflow_registry.store import entry_object
from tests.integration.test_catalogue_support import BACKENDS, dataset_name, dataset_record, shared_env

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module", params=BACKENDS)
def env(tmp_path_factory, pytestconfig, request):
    return shared_env(tmp_path_factory, pytestconfig, request.param)


def test_settings_are_anonymous_and_point_at_this_server(env):
    resp = requests.get(env.url + "/settings", headers={"Authorization": "Bearer None"}, timeout=10)
    assert resp.status_code == 200
    reg = resp.json()["registry"]
    assert reg["api_url"] == env.api and reg["web_url"] == env.url
    assert reg["weights_uri_pattern"].format(uuid="U") == "s3://ewc/artefacts/weights/U.ckpt"  # client-writable
    assert "{name}" in reg["datasets_uri_pattern"]


def test_services_status_json_gives_the_catalogue_url(env):
    result = CliRunner().invoke(cli, ["services", "status", "--json", "--workspace", str(env.ws.root)])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)["catalogue"]
    assert info["healthy"] and info["url"] == env.url and info["api_url"] == env.api


def test_create_get_list_filters_and_defaults(env):
    c = env.client("write")
    name = dataset_name("crud")
    created = c.create("datasets", dataset_record(name))
    assert created["locations"] == {}  # default container: the client's `add /locations/x` needs it
    with pytest.raises(CatalogueClientError) as dup:
        c.create("datasets", dataset_record(name))
    assert dup.value.status == 409
    assert [d["name"] for d in c.list("datasets", name=name)] == [name]
    assert [d["name"] for d in c.list("datasets", uuid=f"uuid-{name}")] == [name]  # metadata.uuid
    assert c.list("datasets", name=name, status="nope") == []
    assert c.list("datasets", no_such_field="x") == []
    assert c.list("weights", name=name, type="training") == []  # unknown filter matches nothing
    # the client's `entry` command sends a double slash
    status, body = env.raw("GET", f"/api/v1//datasets/{name}")
    assert status == 200 and body["name"] == name
    hidden = c.get("datasets", name, hidden=True)
    assert hidden["_version"] == 1 and hidden["_original"]["name"] == name
    assert "_version" not in c.get("datasets", name)


def test_tasks_get_uuid_status_and_naive_utc_stamps_that_move_on_patch(env):
    c = env.client("write")
    task = c.create("tasks", {"action": "transfer_dataset", "source": "ewc", "destination": "x", "dataset": "d"})
    assert task["status"] == "queued" and task["action"] == "transfer-dataset"
    created = datetime.datetime.fromisoformat(task["created"])
    assert created.tzinfo is None and abs((datetime.datetime.utcnow() - created).total_seconds()) < 60
    after = c.patch("tasks", task["uuid"], [{"op": "add", "path": "/status", "value": "running"}])
    assert after["updated"] > task["updated"] and after["created"] == task["created"]
    ownership = [{"op": "test", "path": "/status", "value": "queued"},
                 {"op": "replace", "path": "/status", "value": "running"}]
    with pytest.raises(CatalogueClientError) as err:
        c.patch("tasks", task["uuid"], ownership)
    assert err.value.status == 409 and "test" in err.value.message
    assert c.delete("tasks", task["uuid"])["deleted"] == task["uuid"]  # write role may delete tasks


def _bad_requests(env, name: str):
    big = json.dumps(dataset_record(name, blob="x" * (17 * 1024 * 1024))).encode()
    json_h = {"Content-Type": "application/json"}
    return {
        "no token": ("POST", "/api/v1/datasets", json.dumps(dataset_record(name)).encode(), json_h),
        "read token on a write": ("POST", "/api/v1/datasets", json.dumps(dataset_record(name)).encode(),
                                  {**json_h, **env.headers("read")}),
        "unknown token": ("POST", "/api/v1/datasets", json.dumps(dataset_record(name)).encode(),
                          {**json_h, "Authorization": "Bearer mfc_not-a-token"}),
        "path traversal in a key": ("PUT", "/api/v1/datasets/..%2F..%2Fentries%2Fx",
                                    json.dumps(dataset_record(name)).encode(), {**json_h, **env.headers("admin")}),
        "dot-dot key": ("PUT", "/api/v1/weights/..", json.dumps({"uuid": ".."}).encode(),
                        {**json_h, **env.headers("admin")}),
        "traversal in an artefact path": ("PUT", "/api/v1/artefacts/plots/../../entries/datasets/x.json", b"{}",
                                          env.headers("admin")),
        "traversal in a body key": ("POST", "/api/v1/weights", json.dumps({"uuid": "../../escape"}).encode(),
                                    {**json_h, **env.headers("admin")}),
        "malformed JSON": ("POST", "/api/v1/datasets", b'{"name": "' + name.encode() + b'",',
                           {**json_h, **env.headers("admin")}),
        "NaN in JSON": ("POST", "/api/v1/datasets", b'{"name": "' + name.encode() + b'", "x": NaN}',
                        {**json_h, **env.headers("admin")}),
        "JSON array for an entry": ("POST", "/api/v1/datasets", b"[1, 2]", {**json_h, **env.headers("admin")}),
        "oversized body": ("POST", "/api/v1/datasets", big, {**json_h, **env.headers("admin")}),
        "bad dataset name": ("POST", "/api/v1/datasets", json.dumps(dataset_record("Not_A Good/Name")).encode(),
                             {**json_h, **env.headers("admin")}),
        "dataset name off the convention": ("POST", "/api/v1/datasets", json.dumps(dataset_record("my-data")).encode(),
                                            {**json_h, **env.headers("admin")}),
        "patch that is not a list": ("PATCH", f"/api/v1/datasets/{dataset_name('crud')}", b'{"op": "add"}',
                                     {**json_h, **env.headers("admin")}),
        "patch of a server field": ("PATCH", f"/api/v1/datasets/{dataset_name('crud')}",
                                    b'[{"op": "add", "path": "/_original", "value": 1}]',
                                    {**json_h, **env.headers("admin")}),
        "bad location name": ("PATCH", f"/api/v1/datasets/{dataset_name('crud')}",
                              b'[{"op": "add", "path": "/locations/a.b", "value": {"path": "/x"}}]',
                              {**json_h, **env.headers("admin")}),
        "bad If-Match": ("PUT", f"/api/v1/datasets/{dataset_name('crud')}", json.dumps(dataset_record(name)).encode(),
                         {**json_h, **env.headers("admin"), "If-Match": "banana"}),
    }


@pytest.mark.parametrize("case", ["no token", "read token on a write", "unknown token", "path traversal in a key",
                                  "dot-dot key", "traversal in an artefact path", "traversal in a body key",
                                  "malformed JSON", "NaN in JSON", "JSON array for an entry", "oversized body",
                                  "bad dataset name", "dataset name off the convention", "patch that is not a list",
                                  "patch of a server field", "bad location name", "bad If-Match"])
def test_bad_requests_get_a_4xx_with_a_message_and_write_nothing(env, case):
    name = dataset_name("refused")
    if case.startswith(("patch", "bad location", "bad If")):
        try:
            env.client("write").create("datasets", dataset_record(dataset_name("crud")))
        except CatalogueClientError:
            pass
    before = env.s3_entries()
    before_crud = env.client("read").get("datasets", dataset_name("crud")) if case.startswith(("patch", "bad")) else None
    method, path, body, headers = _bad_requests(env, name)[case]
    status, answer = env.raw(method, path, body, headers)
    assert 400 <= status < 500, (case, status, answer)
    assert isinstance(answer, dict) and answer.get("message"), (case, answer)
    assert env.s3_entries() == before, f"{case}: S3 changed"
    assert env.client("read").list("datasets", name=name) == []
    if before_crud is not None:
        assert env.client("read").get("datasets", dataset_name("crud")) == before_crud


def test_roles_and_deletion_rules(env):
    admin, write = env.client("admin"), env.client("write")
    name = dataset_name("delete")
    write.create("datasets", dataset_record(name, protected_note="x"))
    write.add_location("datasets", name, "ewc", f"s3://ewc/datasets/{name}.zarr")
    with pytest.raises(CatalogueClientError) as err:
        write.delete("datasets", name)
    assert err.value.status == 403 and "admin" in err.value.message
    with pytest.raises(CatalogueClientError) as err:
        admin.delete("datasets", name)
    assert err.value.status == 409 and "last" in err.value.message
    with pytest.raises(CatalogueClientError) as err:  # a deletion task for the only copy is refused
        write.create("tasks", {"action": "delete-dataset", "location": "ewc", "dataset": name})
    assert err.value.status == 409 and "last copy" in err.value.message
    with pytest.raises(CatalogueClientError) as err:  # protecting needs admin
        write.patch("datasets", name, [{"op": "add", "path": "/protected", "value": True}])
    assert err.value.status == 403
    admin.patch("datasets", name, [{"op": "add", "path": "/protected", "value": True},
                                   {"op": "remove", "path": "/locations/ewc"}])
    with pytest.raises(CatalogueClientError) as err:
        admin.delete("datasets", name)
    assert err.value.status == 409 and "protected" in err.value.message
    admin.patch("datasets", name, [{"op": "replace", "path": "/protected", "value": False}])
    assert admin.delete("datasets", name)["deleted"] == name
    assert not admin.exists("datasets", name)
    assert entry_object("datasets", name) not in env.s3_entries()


def test_revoked_token_is_refused_and_anonymous_read_is_a_setting(env):
    runner = CliRunner()
    made = runner.invoke(cli, ["catalogue", "token", "create", "--role", "read", "--name", "short-lived", "--json",
                               "--workspace", str(env.ws.root)])
    token = json.loads(made.output)["token"]
    stored = (env.ws.path("catalogue", "tokens.json")).read_text()
    assert token not in stored  # only its hash is kept
    assert env.ws.path("catalogue", "tokens.json").stat().st_mode & 0o777 == 0o600
    headers = {"Authorization": f"Bearer {token}"}
    assert requests.get(env.api + "/_whoami", headers=headers, timeout=10).json()["role"] == "read"
    revoked = runner.invoke(cli, ["catalogue", "token", "revoke", "short-lived", "--workspace", str(env.ws.root)])
    assert revoked.exit_code == 0, revoked.output
    assert requests.get(env.api + "/datasets", headers=headers, timeout=10).status_code == 401

    off = runner.invoke(cli, ["catalogue", "settings", "--no-anonymous-read", "--workspace", str(env.ws.root)])
    assert off.exit_code == 0, off.output
    try:
        resp = requests.get(env.api + "/datasets", timeout=10)
        assert resp.status_code == 401 and "token" in resp.json()["message"]
        assert requests.get(env.url + "/datasets", timeout=10).status_code == 401
        assert requests.get(env.api + "/datasets", headers=env.headers("read"), timeout=10).status_code == 200
        assert requests.get(env.url + "/settings", timeout=10).status_code == 200  # the client bootstraps from it
    finally:
        runner.invoke(cli, ["catalogue", "settings", "--anonymous-read", "--workspace", str(env.ws.root)])


def test_concurrent_appends_and_version_checks_lose_no_update(env):
    c = env.client("write")
    expver = "conc" + uuid.uuid4().hex[:6]
    c.create("experiments", {"expver": expver, "metadata": {"expver": expver}, "runs": {}})
    errors: list[Exception] = []

    def append(i: int) -> None:
        try:
            env.client("write").patch("experiments", expver, [
                {"op": "add", "path": "/checkpoints/-", "value": {"uuid": f"ck-{i}", "path": f"/p/{i}"}}])
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=append, args=(i,)) for i in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    record = c.get("experiments", expver)
    assert sorted(x["uuid"] for x in record["checkpoints"]) == sorted(f"ck-{i}" for i in range(24))
    doc = env.s3_document("experiments", expver)
    assert doc["record"] == record and doc["version"] == 25

    # two writers read the same version; the second one's write must not silently win
    first, version = c.get_with_version("experiments", expver)
    second, same = c.get_with_version("experiments", expver)
    first["status"] = "by-first"
    second["status"] = "by-second"
    c.replace("experiments", expver, first, if_version=version)
    with pytest.raises(CatalogueClientError) as err:
        c.replace("experiments", expver, second, if_version=same)
    assert err.value.status == 412
    assert c.get("experiments", expver)["status"] == "by-first"
    assert env.s3_document("experiments", expver)["record"]["status"] == "by-first"


def test_models_have_immutable_versions_and_movable_aliases(env):
    c = env.client("write")
    with pytest.raises(CatalogueClientError) as err:
        c.promote("m-unknown", "no-such-checkpoint")
    assert err.value.status == 422
    for u in ("mk-1", "mk-2"):
        c.register_checkpoint(u, {"uuid": u, "run_id": "run-models"})
    c.promote("aifs-test", "mk-1", alias="operational")
    model = c.promote("aifs-test", "mk-2", alias="candidate")
    assert set(model["versions"]) == {"1", "2"}
    assert c.resolve_alias("aifs-test", "operational")["weights"] == "mk-1"
    c.set_alias("aifs-test", "operational", 2)
    assert c.resolve_alias("aifs-test", "operational")["weights"] == "mk-2"
    with pytest.raises(CatalogueClientError) as err:
        c.patch("models", "aifs-test", [{"op": "replace", "path": "/versions/1/weights", "value": "mk-2"}])
    assert err.value.status == 409 and "immutable" in err.value.message
    with pytest.raises(CatalogueClientError) as err:
        c.set_alias("aifs-test", "operational", 7)
    assert err.value.status == 422


def test_lineage_graph_api_and_cli(env):
    c = env.client("write")
    ds = dataset_name("lineage")
    c.create("datasets", dataset_record(ds))
    c.register_training("lin-train", run_id="run-lin", datasets=[ds], status="finished")
    c.register_checkpoint("lin-ck1", {"uuid": "lin-ck1", "run_id": "run-lin",
                                      "dataset": {"arguments": {"args": [f"/data/{ds}.zarr"]}}})
    c.register_checkpoint("lin-ck2", {"uuid": "lin-ck2", "run_id": "run-fork", "parent_uuid": "lin-ck1",
                                      "config": {"training": {"fork_run_id": "run-lin"}}})
    c.promote("lin-model", "lin-ck2", alias="candidate")
    graph = c.lineage(ds)
    edges = {(e["source"], e["relation"], e["target"]) for e in graph["edges"]}
    assert (f"datasets:{ds}", "trained-on", "trainings:lin-train") in edges
    assert ("trainings:lin-train", "produced", "weights:lin-ck1") in edges
    assert ("weights:lin-ck1", "parent-of", "weights:lin-ck2") in edges
    assert ("weights:lin-ck2", "promoted-v1", "models:lin-model") in edges
    assert ("trainings:lin-train", "forked-into", "trainings@run_id:run-fork") in edges
    assert c.lineage("run-lin")["root"] == "trainings:lin-train"  # a run_id names its training
    result = CliRunner().invoke(cli, ["lineage", "lin-ck1", "--workspace", str(env.ws.root)])
    assert result.exit_code == 0, result.output
    for word in ("upstream", "downstream", ds[:20], "lin-train", "lin-ck2", "lin-model"):
        assert word in result.output, (word, result.output)
    missing = CliRunner().invoke(cli, ["lineage", "no-such-thing", "--workspace", str(env.ws.root)])
    assert missing.exit_code != 0 and "no entry" in missing.output


def test_artefacts_round_trip(env):
    c = env.client("write")
    c.put_artefact("plots/exp1/loss.png", b"\x89PNG fake", "image/png")
    assert env.client("read").get_artefact("plots/exp1/loss.png") == b"\x89PNG fake"
    with pytest.raises(CatalogueClientError) as err:
        env.client("read").put_artefact("plots/x.png", b"x")
    assert err.value.status == 403


def _answers(env) -> dict:
    """Everything a reader can see: every list, every entry (with server fields), lineage, web tables."""
    c = env.client("read")
    out: dict = {}
    for coll in ("datasets", "experiments", "weights", "trainings", "tasks", "models"):
        items = c.list(coll)
        out[coll] = items
        key = {"datasets": "name", "experiments": "expver", "trainings": "name", "models": "name"}.get(coll, "uuid")
        for item in items:
            out[f"{coll}/{item[key]}"] = c.get(coll, item[key], hidden=True)
            if coll != "tasks":
                out[f"lineage {coll}/{item[key]}"] = c.lineage(item[key], collection=coll)
    for page in ("/datasets?sort=usage&order=desc", "/datasets?q=lineage", "/trainings", "/weights", "/models"):
        out[page] = env.get(page, role="read").text
    out["filtered"] = c.list("datasets", uuid=f"uuid-{dataset_name('lineage')}")
    return out


def test_index_deleted_and_rebuilt_from_s3_gives_the_same_answers(env):
    from maelflow.services import stack as stack_mod

    c = env.client("write")
    ds = dataset_name("rebuild")
    c.create("datasets", dataset_record(ds))
    c.add_location("datasets", ds, "ewc", f"s3://ewc/datasets/{ds}.zarr")
    c.register_training("rb-train", run_id="run-rb", datasets=[ds])
    c.register_checkpoint("rb-ck", {"uuid": "rb-ck", "run_id": "run-rb"})
    c.create("tasks", {"action": "transfer-dataset", "source": "ewc", "destination": "lumi", "dataset": ds})
    before = _answers(env)
    assert before[f"datasets/{ds}"]["locations"]

    # 1. the service stopped, its index deleted, started again: it rebuilds from S3 alone
    stack_mod.down(env.ws, names=["catalogue"])
    env.drop_index()
    info = stack_mod.up(env.ws, names=["catalogue"])["catalogue"]
    assert info.url == env.url  # same port: clients' settings stay valid
    assert _answers(env) == before

    # 2. rebuilt in place while running, by the command line
    result = subprocess.run([sys.executable, "-m", "maelflow", "catalogue", "rebuild-index", "--workspace",
                             str(env.ws.root)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert _answers(env) == before

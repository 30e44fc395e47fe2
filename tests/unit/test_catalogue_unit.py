"""The catalogue's rules that need no server: keys, records, patches, lineage edges, the index, tokens."""

from __future__ import annotations

import datetime
import json
import stat

import pytest

from maelflow_registry import collections, lineage, records, svg
from maelflow_registry.auth import TokenStore, hash_token, role_allows
from maelflow_registry.catalogue import check_patch
from maelflow_registry.collections.datasets import name_problems as dataset_name_problems
from maelflow_registry.config import Paths, Settings, load_settings, save_settings
from maelflow_registry.errors import BadRequest, Conflict, PreconditionFailed, Unprocessable
from maelflow_registry.index import Index
from maelflow_registry.keys import check_artefact_path, check_key
from maelflow_registry.store import FORMAT

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("key", ["..", "../etc", "a/b", "a\\b", "", ".hidden", "-x", "a..b", "x" * 201, "a b",
                                 "ä", "a%2Fb", "a\x00b", None, 3])
def test_unsafe_keys_are_refused(key):
    with pytest.raises(BadRequest):
        check_key(key)


@pytest.mark.parametrize("key", ["aifs-od-an-oper-0001-mars-o96-2016-2023-6h-v6", "a5275e04-0000-0000-a0f6-be19591b09fe",
                                 "i4df", "run_1.2"])
def test_safe_keys_pass(key):
    assert check_key(key) == key


@pytest.mark.parametrize("path", ["../x", "plots/../../entries/x.json", "a//b", "/abs", "a/./b", "a/" * 13 + "b", ""])
def test_artefact_paths_cannot_traverse(path):
    with pytest.raises(BadRequest):
        check_artefact_path(path)


def test_dataset_naming_policy():
    assert dataset_name_problems("aifs-ea-an-oper-0001-mars-o96-1979-2022-6h-v6", "anemoi") == []
    assert dataset_name_problems("aifs-ea-an-oper-0001-mars-20p0-1979-1979-6h-v0-testing", "anemoi") == []
    assert dataset_name_problems("My_Data", "anemoi")
    assert dataset_name_problems("era5", "anemoi")
    assert dataset_name_problems("era5", "relaxed") == []


def new_record(collection, body, key_from_url=None):
    return collections.get(collection).new_record(body, key_from_url)


def validate(collection, key, record, old, **kw):
    return collections.get(collection).validate(key, record, old, **kw)


def edges(collection, key, record):
    return collections.get(collection).edges(key, record)


def test_new_records_get_the_defaults_the_client_relies_on():
    key, ds = new_record("datasets", {"name": "n", "metadata": {}})
    assert key == "n" and ds["locations"] == {}
    _, exp = new_record("experiments", {"expver": "i4df"})
    assert exp["plots"] == [] and exp["checkpoints"] == []
    key, task = new_record("tasks", {"action": "Transfer_Dataset"})
    assert task["uuid"] == key and task["status"] == "queued" and task["action"] == "transfer-dataset"
    stamp = datetime.datetime.fromisoformat(task["created"])
    assert stamp.tzinfo is None  # naive UTC: the anemoi worker subtracts it from utcnow()
    key, training = new_record("trainings", {"metadata": {"x": 1}}, key_from_url="social-mutt")
    assert key == "social-mutt" and training["name"] == "social-mutt"  # PUT without a name field
    _, stripped = new_record("datasets", {"name": "n", "_original": {}, "_version": 9})
    assert "_original" not in stripped and "_version" not in stripped
    with pytest.raises(BadRequest):
        new_record("datasets", {"metadata": {}})
    with pytest.raises(BadRequest):
        new_record("trainings", {"name": "a"}, key_from_url="b")
    with pytest.raises(BadRequest):
        new_record("datasets", ["not", "an", "object"])


def test_model_versions_are_immutable_and_aliases_must_point_somewhere():
    old = {"name": "m", "versions": {"1": {"weights": "a"}}, "aliases": {"operational": 1}}
    moved = {"name": "m", "versions": {"1": {"weights": "a"}, "2": {"weights": "b"}}, "aliases": {"operational": 2}}
    validate("models", "m", moved, old)
    with pytest.raises(Conflict):
        validate("models", "m", {"name": "m", "versions": {"1": {"weights": "b"}}, "aliases": {}}, old)
    with pytest.raises(Conflict):
        validate("models", "m", {"name": "m", "versions": {}, "aliases": {}}, old)
    with pytest.raises(Unprocessable):
        validate("models", "m", {"name": "m", "versions": {"1": {"weights": "a"}}, "aliases": {"x": 3}}, None)


def test_validate_refuses_changing_the_key_and_bad_locations():
    with pytest.raises(BadRequest):
        validate("datasets", "a", {"name": "b"}, None)
    with pytest.raises(BadRequest):
        validate("weights", "u", {"uuid": "u", "locations": {"a/b": {"path": "x"}}}, None)
    with pytest.raises(BadRequest):
        validate("weights", "u", {"uuid": "u", "locations": {"ewc": "s3://x"}}, None)
    with pytest.raises(BadRequest):
        validate("datasets", "Bad_Name", {"name": "Bad_Name"}, None, creating=True)


@pytest.mark.parametrize("ops", [{"op": "add"}, [{"op": "frobnicate", "path": "/a"}], [{"op": "add", "path": "a"}],
                                 [{"op": "add", "path": "/a"}], [{"op": "move", "path": "/a"}],
                                 [{"op": "add", "path": "/_original", "value": 1}], ["add"]])
def test_malformed_patches_are_refused(ops):
    with pytest.raises(BadRequest):
        check_patch(ops)


def test_filter_fields_fall_back_to_metadata():
    pairs = dict((f, v) for f, v in records.filter_fields(
        {"name": "n", "status": "ok", "metadata": {"uuid": "U", "status": "hidden", "n": 3, "flag": True}}))
    assert pairs["uuid"] == "U" and pairs["metadata.uuid"] == "U"
    assert pairs["status"] == "ok" and pairs["metadata.status"] == "hidden"
    assert pairs["n"] == "3" and pairs["flag"] == "true"
    assert records.query_values("True") == ["True", "true"]


def test_lineage_edges_from_a_checkpoint_and_a_training():
    ck = {"uuid": "c2", "metadata": {"run_id": "r2", "parent_uuid": "c1",
                                     "dataset": {"arguments": {"args": ["/data/ds-a.zarr", {"dataset": "ds-b"}]}},
                                     "config": {"training": {"fork_run_id": "r1"}}}}
    found = set(edges("weights", "c2", ck))
    assert ("trainings@run_id:r2", "produced", "weights:c2") in found
    assert ("datasets:ds-a", "trained-on", "trainings@run_id:r2") in found
    assert ("datasets:ds-b", "trained-on", "trainings@run_id:r2") in found
    assert ("weights:c1", "parent-of", "weights:c2") in found
    assert ("trainings@run_id:r1", "forked-into", "trainings@run_id:r2") in found
    tr = {"name": "t", "run_id": "r1", "datasets": ["ds-a"], "checkpoints": [{"uuid": "c1"}]}
    assert set(edges("trainings", "t", tr)) == {("datasets:ds-a", "trained-on", "trainings:t"),
                                                ("trainings:t", "produced", "weights:c1")}
    assert collections.get("trainings").refs("t", tr) == ["trainings:t", "trainings@run_id:r1"]
    model = {"name": "m", "versions": {"1": {"weights": "c2"}}}
    assert edges("models", "m", model) == [("weights:c2", "promoted-v1", "models:m")]


def _doc(collection, key, record, version=1):
    return {"format": FORMAT, "collection": collection, "key": key, "version": version, "created": "2026-01-01T00:00:00",
            "updated": "2026-01-01T00:00:00", "record": record, "original": record}


def test_index_version_check_filters_graph_and_rebuild(tmp_path):
    index = Index(tmp_path / "index.sqlite")
    with index.write() as tx:
        tx.put(_doc("datasets", "ds-a", {"name": "ds-a", "metadata": {"uuid": "U", "shape": [4, 2, 1, 9]}}), None)
        tx.put(_doc("trainings", "t", {"name": "t", "run_id": "r1", "datasets": ["ds-a"]}), None)
        tx.put(_doc("weights", "c1", {"uuid": "c1", "metadata": {"run_id": "r1"}}), None)
    with pytest.raises(Conflict):
        with index.write() as tx:
            tx.put(_doc("datasets", "ds-a", {"name": "ds-a"}), None)
    with pytest.raises(PreconditionFailed):
        with index.write() as tx:
            tx.put(_doc("datasets", "ds-a", {"name": "ds-a"}, version=3), 2)
    assert [json.loads(r)["name"] for r in index.list("datasets", {"uuid": "U"}, 10)] == ["ds-a"]
    assert index.list("datasets", {"uuid": "nope"}, 10) == []
    assert index.list("weights", {"name": "x", "type": "training"}, 10) == []
    graph = lineage.build_graph(index, "datasets", "ds-a", {"name": "ds-a"}).to_json()
    assert {(e["source"], e["target"]) for e in graph["edges"]} == {("datasets:ds-a", "trainings:t"),
                                                                   ("trainings:t", "weights:c1")}
    rows, total = index.table_page(collections.get("datasets"), "", "usage", True, 10, 0)
    assert total == 1 and rows[0]["usage"] == 1 and rows[0]["rows"] == 4 and rows[0]["grid_values"] == 9
    snapshot = [index.get(c, k) for c, k in (("datasets", "ds-a"), ("trainings", "t"), ("weights", "c1"))]
    docs = [_doc("datasets", "ds-a", json.loads(snapshot[0]["record"])), _doc("trainings", "t", json.loads(snapshot[1]["record"])),
            _doc("weights", "c1", json.loads(snapshot[2]["record"]))]
    assert index.rebuild(docs) == 3
    assert [index.get(c, k) for c, k in (("datasets", "ds-a"), ("trainings", "t"), ("weights", "c1"))] == snapshot
    assert index.find_any("r1") == [("trainings", "t")]


def test_tokens_are_stored_hashed_with_owner_only_permissions(tmp_path):
    paths = Paths(tmp_path / "catalogue")
    store = TokenStore(paths)
    token, info = store.create("write", name="ci")
    text = paths.tokens.read_text()
    assert token not in text and hash_token(token) in text
    assert stat.S_IMODE(paths.tokens.stat().st_mode) == 0o600
    assert store.by_hash()[hash_token(token)].role == "write"
    assert [t.name for t in store.revoke("ci")] == ["ci"]
    assert store.by_hash() == {}
    with pytest.raises(ValueError):
        store.create("root")
    assert role_allows("admin", "write") and not role_allows("read", "write") and not role_allows(None, "read")


def test_settings_round_trip(tmp_path):
    paths = Paths(tmp_path / "catalogue")
    assert load_settings(paths) == Settings()
    save_settings(paths, Settings(anonymous_read=False))
    assert load_settings(paths).anonymous_read is False


def test_svg_escapes_labels_and_links_registered_nodes():
    graph = {"root": "datasets:a", "edges": [{"source": "datasets:a", "target": "trainings:<x>", "relation": "trained-on"}],
             "nodes": [{"id": "datasets:a", "collection": "datasets", "key": "a", "label": "a", "missing": False, "column": 0},
                       {"id": "trainings:<x>", "collection": "trainings", "key": "<x>", "label": "<script>",
                        "missing": True, "column": 1}]}
    out = svg.render(graph)
    assert "<script>" not in out and "&lt;script&gt;" in out
    assert 'href="/datasets/a"' in out and out.count("<a ") == 1


def test_token_and_settings_commands_need_no_server(tmp_path):
    from click.testing import CliRunner

    from maelflow.cli.main import cli

    runner = CliRunner()
    ws = ["--workspace", str(tmp_path / "ws")]
    made = runner.invoke(cli, ["catalogue", "token", "create", "--role", "admin", "--name", "ops", "--json", *ws])
    assert made.exit_code == 0, made.output
    token = json.loads(made.output)["token"]
    assert token.startswith("mfc_")
    listed = runner.invoke(cli, ["catalogue", "token", "list", *ws])
    assert "ops" in listed.output and token not in listed.output
    assert runner.invoke(cli, ["catalogue", "token", "revoke", "ops", *ws]).exit_code == 0
    assert runner.invoke(cli, ["catalogue", "token", "revoke", "ops", *ws]).exit_code != 0
    shown = runner.invoke(cli, ["catalogue", "settings", "--no-anonymous-read", "--json", *ws])
    assert json.loads(shown.output)["anonymous_read"] is False
    assert "lineage" in runner.invoke(cli, ["--help"]).output


def test_requests_get_503_with_retry_after_while_the_index_is_rebuilt():
    import asyncio
    import threading

    from maelflow_registry.app import NotReady

    class Cat:
        ready = threading.Event()

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    def call(path: str) -> tuple[int, dict]:
        sent: list[dict] = []

        async def send(message):
            sent.append(message)

        async def receive():
            return {"type": "http.request", "body": b""}

        asyncio.run(NotReady(app, Cat)({"type": "http", "path": path, "method": "GET"}, receive, send))
        return sent[0]["status"], dict(sent[0]["headers"])

    status, headers = call("/api/v1/datasets")
    assert status == 503 and headers[b"retry-after"] == b"5"
    assert call("/health")[0] == 200
    Cat.ready.set()
    assert call("/api/v1/datasets")[0] == 200

"""Collections as declarations: a new one is one file plus its registration, and the whole service follows.

A collection from another distribution (registered through the ``maelflow_registry.collections``
entry-point group, in a subprocess so the registry of this one stays as it is) gets the API, the
fast lookups, the index, its lineage edges and its web pages; and one token parser decides for the
routes and the fast lookups alike. The application is driven in-process through ASGI, over an
in-memory store: no S3 or socket is needed.
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from maelflow_registry import collections
from maelflow_registry.auth import TokenStore
from maelflow_registry.config import Paths

pytestmark = pytest.mark.unit


class MemoryStore:
    """The Store's interface over a dictionary."""

    bucket = "catalogue"

    def __init__(self):
        self.docs: dict[tuple[str, str], dict] = {}

    def ensure_bucket(self) -> None:
        pass

    def put_document(self, doc: dict) -> None:
        self.docs[(doc["collection"], doc["key"])] = json.loads(json.dumps(doc))

    def delete_document(self, collection: str, key: str) -> None:
        self.docs.pop((collection, key), None)

    def iter_documents(self):
        return iter(list(self.docs.values()))


def call(app, method: str, path: str, headers: dict | None = None, body: bytes = b"") -> tuple[int, bytes]:
    sent: list[dict] = []

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message):
        sent.append(message)

    raw = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    raw.append((b"content-length", str(len(body)).encode()))
    path, _, query = path.partition("?")
    scope = {"type": "http", "method": method, "path": path, "raw_path": path.encode(), "root_path": "",
             "query_string": query.encode(), "headers": raw, "scheme": "http", "http_version": "1.1",
             "server": ("127.0.0.1", 80), "client": ("127.0.0.1", 1)}
    asyncio.run(app(scope, receive, send))
    return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])


def serve(paths: Paths):
    """The application over an empty in-memory store, its index built first (not in the background)."""
    from maelflow_registry.server import build, open_catalogue

    store = MemoryStore()
    open_catalogue(paths, store)
    return build(paths, store)


def test_service_token_is_made_once_and_kept_private(tmp_path):
    paths = Paths(tmp_path / "catalogue")
    first = TokenStore(paths).service_token(name="tasks")
    assert TokenStore(paths).service_token(name="tasks") == first
    assert stat.S_IMODE(paths.service_token.stat().st_mode) == 0o600
    assert [(t.name, t.role) for t in TokenStore(paths).list()] == [("tasks", "write")]


def test_registration_refuses_reserved_and_taken_names():
    class Clash(collections.Collection):
        name, main_key, title, singular = "weights", "uuid", "X", "X"

    with pytest.raises(ValueError):
        collections.register(Clash())
    Clash.name = "edges"  # an index table
    with pytest.raises(ValueError):
        collections.register(Clash())
    Clash.name, Clash.aliases = "fresh", ("checkpoints",)  # the weights' alias
    with pytest.raises(ValueError):
        collections.register(Clash())
    assert "fresh" not in collections.names()


def test_one_token_parser_for_routes_and_fast_lookups(tmp_path):
    paths = Paths(tmp_path / "catalogue")
    tokens = TokenStore(paths)
    write = tokens.create("write")[0]
    app = serve(paths)
    status, _ = call(app, "PUT", "/api/v1/trainings/t1", {"authorization": f"Bearer {write}"},
                     json.dumps({"run_id": "r1"}).encode())
    assert status == 201
    # the fast path (no query string) and the routed one (a query string) answer alike
    for suffix in ("", "?_x=1"):
        path = "/api/v1/trainings/t1" + suffix
        assert call(app, "GET", path)[0] == 200
        assert call(app, "GET", path, {"authorization": "Bearer None"})[0] == 200
        assert call(app, "GET", path, {"authorization": f"bearer {write}"})[0] == 200
        assert call(app, "GET", path, {"authorization": "Bearer mfc_unknown"})[0] == 401
        assert call(app, "GET", path, {"authorization": f"Basic {write}"})[0] == 401
    paths.settings.write_text(json.dumps({"anonymous_read": False}))
    assert call(app, "GET", "/api/v1/trainings/t1")[0] == 401
    assert call(app, "GET", "/api/v1/trainings/t1", {"authorization": f"Bearer {write}"})[0] == 200
    assert call(app, "GET", "/trainings/t1", {"cookie": f"catalogue_token={write}"})[0] == 200  # pages only
    assert call(app, "GET", "/api/v1/trainings/t1", {"cookie": f"catalogue_token={write}"})[0] == 401


PLUGIN = '''
"""Notes: a collection from another distribution."""

from maelflow_registry.collections import Collection
from maelflow_registry.refs import Edges, ref


class Notes(Collection):
    name = "notes"
    main_key = "slug"
    title, singular = "Notes", "Note"
    defaults = {"tags": list}
    column = 3
    table = {"words": "INTEGER"}
    table_headers = (("slug", "Slug"), ("words", "Words"), ("usage", "Usage"))

    def check(self, key, record, old, *, settings, creating):
        from maelflow_registry.errors import BadRequest

        if not isinstance(record.get("text"), str):
            raise BadRequest("a note needs a 'text'")

    def edges(self, key, record):
        out = Edges()
        if isinstance(record.get("about"), str):
            out.add(ref("datasets", record["about"]), "noted-in", ref(self.name, key))
        return list(out)

    def table_row(self, record, created):
        return {"words": len(record["text"].split())}


collection = Notes()
'''

DRIVER = '''
import json, sys
sys.path.insert(0, sys.argv[2])
from test_catalogue_collections import call, serve
from maelflow_registry import collections
from maelflow_registry.auth import TokenStore
from maelflow_registry.config import Paths

paths = Paths(sys.argv[1])
write = TokenStore(paths).create("write")[0]
app = serve(paths)
h = {"authorization": "Bearer " + write}
out = {"names": collections.names()}
out["bad"] = call(app, "POST", "/api/v1/notes", h, json.dumps({"slug": "n1"}).encode())[0]
status, body = call(app, "POST", "/api/v1/notes", h, json.dumps({"slug": "n1", "text": "two words",
                                                                   "about": "ds-a"}).encode())
out["created"] = [status, json.loads(body)]
out["fast"] = call(app, "GET", "/api/v1/notes/n1")[0]
out["list"] = json.loads(call(app, "GET", "/api/v1/notes?about=ds-a")[1])
out["lineage"] = json.loads(call(app, "GET", "/api/v1/lineage/notes/n1")[1])["edges"]
out["page"] = call(app, "GET", "/notes/n1")[0]
out["table"] = call(app, "GET", "/notes?sort=words")[0]
out["nav"] = b'href="/notes"' in call(app, "GET", "/datasets")[1]
out["settings"] = json.loads(call(app, "GET", "/settings")[1])["catalogue"]["collections"]
print(json.dumps(out))
'''


def test_a_collection_registered_through_the_entry_point_group_gets_the_whole_service(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "notes_collection.py").write_text(textwrap.dedent(PLUGIN))
    info = site / "notes_collection-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: notes-collection\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[maelflow_registry.collections]\nnotes = notes_collection:collection\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-c", DRIVER, str(tmp_path / "catalogue"), str(Path(__file__).parent)],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["names"][-1] == "notes"
    assert out["bad"] == 400
    assert out["created"] == [201, {"slug": "n1", "text": "two words", "about": "ds-a", "tags": []}]
    assert out["fast"] == 200 and [n["slug"] for n in out["list"]] == ["n1"]
    assert out["lineage"] == [{"source": "datasets:ds-a", "target": "notes:n1", "relation": "noted-in"}]
    assert out["page"] == 200 and out["table"] == 200 and out["nav"]
    assert "notes" in out["settings"]


def test_a_benchmark_names_its_runs_and_trainings_and_refuses_bad_paths():
    from maelflow_registry.collections.benchmarks import collection as benchmarks, report_link
    from maelflow_registry.config import Settings
    from maelflow_registry.errors import BadRequest, Unprocessable

    record = {"name": "demo-q4-7-1", "trainings": ["demo-tiny-7"], "report": "benchmarks/demo-q4-7-1/index.html",
              "runs": [{"run_id": "abc", "site": "local"}, {"run_id": "def", "site": "lumi"}]}
    benchmarks.check("demo-q4-7-1", record, None, settings=Settings(), creating=True)
    assert sorted(benchmarks.edges("demo-q4-7-1", record)) == sorted([
        ("trainings:demo-tiny-7", "benchmarked-in", "benchmarks:demo-q4-7-1"),
        ("trainings@run_id:abc", "benchmarked-in", "benchmarks:demo-q4-7-1"),
        ("trainings@run_id:def", "benchmarked-in", "benchmarks:demo-q4-7-1")])
    assert report_link(record) == "/artefacts/benchmarks/demo-q4-7-1/index.html"
    with pytest.raises(BadRequest):
        benchmarks.check("x", {**record, "report": "../../etc/passwd"}, None, settings=Settings(), creating=True)
    with pytest.raises(Unprocessable, match="run_id"):
        benchmarks.check("x", {**record, "runs": [{"site": "local"}]}, None, settings=Settings(), creating=True)

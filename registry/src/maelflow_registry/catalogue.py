"""The catalogue's rules in one place: S3 first, then the index, guarded by the entry's version.

Every write goes the same way (:meth:`Catalogue.write`): take the index's write lock, read the
entry's current version, compute the new record (create, replace or JSON-patch), validate it, write
the S3 document carrying the new version, then update the index row if the version is still the
one read, and commit. If S3 fails nothing changes; if the process dies between the S3 write and the
commit, S3 holds the newer document and a rebuild (or the next write of that entry) catches up.

End-to-end "no lost update" between clients that read, think, and write back is offered two ways:
the ``If-Match: "<version>"`` header (answers carry ``ETag: "<version>"``), and JSON-patch ``test``
operations (what the anemoi-registry client uses for task ownership and plots).

Nothing here names a collection: what differs between them (key field, defaults, rules, who may
delete) comes from their definitions in :mod:`maelflow_registry.collections`.
"""

from __future__ import annotations

import copy
import json
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import jsonpatch
import jsonpointer

from maelflow_registry import collections, lineage, records
from maelflow_registry.auth import role_allows
from maelflow_registry.config import Settings
from maelflow_registry.errors import BadRequest, Conflict, Forbidden, NotFound, PreconditionFailed
from maelflow_registry.index import Index
from maelflow_registry.keys import check_key
from maelflow_registry.store import FORMAT, Store

LOG = logging.getLogger("maelflow_registry")

PATCH_OPS = ("add", "remove", "replace", "move", "copy", "test")


class Catalogue:
    def __init__(self, store: Store, index: Index, settings: Callable[[], Settings] = Settings):
        self.store = store
        self.index = index
        self._settings = settings
        self.ready = threading.Event()  # cleared while the index is rebuilt in the background
        self.ready.set()

    @property
    def settings(self) -> Settings:
        return self._settings()

    # -- reads -----------------------------------------------------------------------------------
    def row(self, collection: str, key: str) -> dict:
        collections.get(collection)
        check_key(key)
        row = self.index.get(collection, key)
        if row is None:
            raise NotFound(f"no {collection} entry '{key}'")
        return row

    def record(self, collection: str, key: str) -> dict:
        return json.loads(self.row(collection, key)["record"])

    def list(self, collection: str, filters: dict[str, str], limit: int | None = None, offset: int = 0) -> list[str]:
        collections.get(collection)
        cap = self.settings.list_limit
        limit = cap if limit is None else limit
        if limit < 0 or offset < 0:
            raise BadRequest("_limit and _offset must not be negative")
        return self.index.list(collection, filters, min(limit, max(cap, 1)), offset)

    # -- writes ----------------------------------------------------------------------------------
    def write(self, collection: str, key: str, mutate: Callable[[dict | None], dict], *, user: str,
              role: str | None, if_match: int | None = None, must_exist: bool | None = None) -> tuple[dict, int, bool]:
        """Apply ``mutate`` to the current record; returns (record, version, created)."""
        coll = collections.get(collection)
        settings = self.settings
        with self.index.write() as tx:
            current = tx.current(collection, key)
            if must_exist and current is None:
                raise NotFound(f"no {collection} entry '{key}'")
            if must_exist is False and current is not None:
                raise Conflict(f"{collection} entry '{key}' already exists",
                               hint="PUT replaces an entry, PATCH changes part of it")
            if if_match is not None and (current is None or current["version"] != if_match):
                raise PreconditionFailed(
                    f"{collection} entry '{key}' is at version {current['version'] if current else 'none'}, "
                    f"not {if_match}: someone else changed it; read it again and retry")
            old = current["record"] if current else None
            new = mutate(copy.deepcopy(old))
            if old is not None:
                coll.updating(old, new)
            coll.validate(key, new, old, settings=settings, creating=current is None)
            if old is not None and bool(old.get("protected")) != bool(new.get("protected")) \
                    and not role_allows(role, "admin"):
                raise Forbidden("only an admin token may protect or unprotect an entry")
            if old is not None and new == old:
                return old, current["version"], False
            now = records.now_iso()
            version = current["version"] + 1 if current else 1
            doc = {"format": FORMAT, "collection": collection, "key": key, "version": version,
                   "created": current["created"] if current else now, "updated": now,
                   "created_by": current["created_by"] if current else user, "updated_by": user,
                   "record": new, "original": (current["original"] if current else None) or copy.deepcopy(new)}
            self.store.put_document(doc)
            tx.put(doc, expect_version=current["version"] if current else None)
        LOG.info("%s %s/%s v%d by %s", "created" if current is None else "updated", collection, key, version, user)
        return new, version, current is None

    def create(self, collection: str, body: Any, *, user: str, role: str | None) -> tuple[dict, int]:
        coll = collections.get(collection)
        key, record = coll.new_record(body)
        coll.before_create(record, self.index)
        new, version, _ = self.write(collection, key, lambda old: record, user=user, role=role, must_exist=False)
        return new, version

    def replace(self, collection: str, key: str, body: Any, *, user: str, role: str | None,
                if_match: int | None = None) -> tuple[dict, int, bool]:
        coll = collections.get(collection)
        check_key(key)
        _, record = coll.new_record(body, key_from_url=key)
        return self.write(collection, key, lambda old: record, user=user, role=role, if_match=if_match)

    def patch(self, collection: str, key: str, ops: Any, *, user: str, role: str | None,
              if_match: int | None = None) -> tuple[dict, int]:
        collections.get(collection)
        check_key(key)
        ops = check_patch(ops)

        def mutate(old: dict | None) -> dict:
            try:
                return jsonpatch.apply_patch(old, ops, in_place=False)
            except jsonpatch.JsonPatchTestFailed as exc:
                raise Conflict(f"a JSON-patch 'test' failed: {exc}; the entry was not changed") from None
            except (jsonpatch.JsonPatchConflict, jsonpointer.JsonPointerException) as exc:
                raise Conflict(f"the JSON patch does not apply to {collection}/{key}: {exc}") from None
            except (jsonpatch.InvalidJsonPatch, TypeError, ValueError, KeyError, IndexError, AttributeError) as exc:
                raise BadRequest(f"invalid JSON patch: {exc}") from None

        new, version, _ = self.write(collection, key, mutate, user=user, role=role, if_match=if_match,
                                     must_exist=True)
        return new, version

    def delete(self, collection: str, key: str, *, user: str, role: str | None, if_match: int | None = None) -> dict:
        coll = collections.get(collection)
        check_key(key)
        if not role_allows(role, coll.delete_role):
            raise Forbidden(f"deleting a {collection} entry needs a token with the '{coll.delete_role}' role "
                            f"(maelflow catalogue token create --role {coll.delete_role})")
        with self.index.write() as tx:
            current = tx.current(collection, key)
            if current is None:
                raise NotFound(f"no {collection} entry '{key}'")
            if if_match is not None and current["version"] != if_match:
                raise PreconditionFailed(f"{collection} entry '{key}' is at version {current['version']}, "
                                         f"not {if_match}; read it again and retry")
            record = current["record"]
            if record.get("protected") is True:
                raise Conflict(f"{collection} entry '{key}' is protected; an admin must first set "
                               "'protected' to false")
            coll.before_delete(key, record)
            self.store.delete_document(collection, key)
            tx.remove(collection, key)
        LOG.info("deleted %s/%s by %s", collection, key, user)
        return {"deleted": key, "collection": collection, "version": current["version"]}

    def bulk_create(self, collection: str, bodies: Any, *, user: str, role: str | None) -> dict:
        """Create many entries in one transaction (S3 writes in parallel): for loading an archive or a bench."""
        coll = collections.get(collection)
        if not isinstance(bodies, list) or not bodies:
            raise BadRequest("the body must be a non-empty JSON array of entries")
        if len(bodies) > 5000:
            raise BadRequest(f"{len(bodies)} entries in one request; send at most 5000 at a time")
        settings = self.settings
        prepared: dict[str, dict] = {}
        for body in bodies:
            key, record = coll.new_record(body)
            coll.validate(key, record, None, settings=settings, creating=True)
            if key in prepared:
                raise Conflict(f"{collection} entry '{key}' appears twice in the request")
            prepared[key] = record
        now = records.now_iso()
        docs = [{"format": FORMAT, "collection": collection, "key": key, "version": 1, "created": now,
                 "updated": now, "created_by": user, "updated_by": user, "record": rec,
                 "original": copy.deepcopy(rec)} for key, rec in prepared.items()]
        with self.index.write() as tx:
            existing = [k for k in prepared if tx.version(collection, k) is not None]
            if existing:
                raise Conflict(f"{len(existing)} {collection} entries already exist, e.g. '{existing[0]}'; "
                               "nothing was written")
            with ThreadPoolExecutor(max_workers=16) as pool:
                list(pool.map(self.store.put_document, docs))
            for doc in docs:
                tx.insert(doc)
        return {"created": len(docs), "collection": collection}

    # -- lineage and maintenance -----------------------------------------------------------------
    def lineage(self, collection: str, key: str, depth: int = 4) -> lineage.Graph:
        record = self.record(collection, key)
        return lineage.build_graph(self.index, collection, key, record, depth=depth)

    def find(self, ident: str) -> list[tuple[str, str]]:
        """Entries an ID names: ``collection/key``, ``collection:key``, a bare key, or a training's run_id."""
        for sep in ("/", ":"):
            coll, found, key = ident.partition(sep)
            if found and collections.find(coll):
                check_key(key)
                return [(coll, key)] if self.index.get(coll, key) else []
        check_key(ident, "ID")
        return self.index.find_any(ident)

    def rebuild(self) -> int:
        """Drop the index's content and read it back from every S3 document."""
        count = self.index.rebuild(self.store.iter_documents())
        LOG.warning("index rebuilt from S3: %d entries", count)
        return count


def check_patch(ops: Any) -> list[dict]:
    if not isinstance(ops, list):
        raise BadRequest("a PATCH body must be a JSON array of RFC 6902 operations")
    for op in ops:
        if not isinstance(op, dict) or op.get("op") not in PATCH_OPS or not isinstance(op.get("path"), str):
            raise BadRequest("each JSON-patch operation needs 'op' (one of "
                             f"{', '.join(PATCH_OPS)}) and a 'path' string; got {str(op)[:120]}")
        for field in ("path", "from"):
            pointer = op.get(field)
            if field == "from" and pointer is None:
                continue
            if not isinstance(pointer, str) or (pointer and not pointer.startswith("/")):
                raise BadRequest(f"JSON-patch '{field}' must be a JSON pointer starting with '/': {str(pointer)[:80]}")
            if pointer.startswith("/_"):
                raise BadRequest(f"'{pointer[:80]}': top-level fields starting with '_' belong to the server")
        if op["op"] in ("add", "replace", "test") and "value" not in op:
            raise BadRequest(f"JSON-patch '{op['op']}' needs a 'value'")
        if op["op"] in ("move", "copy") and "from" not in op:
            raise BadRequest(f"JSON-patch '{op['op']}' needs a 'from'")
    return ops

"""The catalogue's rules in one place: S3 first, then the index, guarded by the entry's version.

Every write goes the same way (:meth:`Catalogue.write`): take the index's write lock, read the
entry's current version, compute the new record (create, replace or JSON-patch), validate it, write
the S3 document carrying the new version, then update the index row if the version is still the
one read, and commit. If S3 fails nothing changes; if the process dies between the S3 write and the
commit, S3 holds the newer document and a rebuild (or the next write of that entry) catches up.

End-to-end "no lost update" between clients that read, think, and write back is offered two ways:
the ``If-Match: "<version>"`` header (answers carry ``ETag: "<version>"``), and JSON-patch ``test``
operations (what the anemoi-registry client uses for task ownership and plots).

S3 is the store of record and the index a cache of it, and S3 can be changed behind the
catalogue's back (by anyone holding the bucket's key). So nothing read back from S3 is trusted: a
document is checked by its collection's own validation before it is indexed (:func:`document_problem`),
and an invalid one is skipped with a warning naming its object and why. Reads are answered from the
index alone (a lookup costs microseconds; an S3 read per lookup would cost a millisecond); writes
first bring the entry's row in line with S3 (:meth:`Catalogue.refresh`), so a write never
resurrects a document deleted from S3 nor overwrites one changed there. :meth:`Catalogue.reconcile`
(every ``reconcile_seconds`` in the server, and ``POST /api/v1/_admin/reconcile``) finds entries
whose document is gone and documents the index lacks; a rebuild re-reads everything.

Nothing here names a collection: what differs between them (key field, defaults, rules, who may
delete) comes from their definitions in :mod:`maelflow_registry.collections`.
"""

from __future__ import annotations

import copy
import json
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterator

import jsonpatch
import jsonpointer

from maelflow_registry import collections, lineage, records
from maelflow_registry.auth import role_allows
from maelflow_registry.config import Settings
from maelflow_registry.errors import (BadRequest, CatalogueError, Conflict, Forbidden, NotFound,
                                     PreconditionFailed)
from maelflow_registry.index import Index
from maelflow_registry.keys import check_key
from maelflow_registry.store import FORMAT, Store, entry_object, parse_entry_object

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
        change = self.refresh(collection, key)
        with self.index.write() as tx:
            current = tx.current(collection, key)
            if must_exist and current is None:
                if change in ("lost", "invalid"):
                    raise NotFound(f"{collection} entry '{key}' is no longer in S3, the catalogue's store of record "
                                   f"({'deleted' if change == 'lost' else 'replaced by an invalid document'} "
                                   "behind the catalogue's back); the index has dropped it")
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

    def rebuild(self, if_incomplete: bool = False) -> int:
        """Drop the index's content and read it back from every valid S3 document.

        An invalid document (not JSON, wrong shape, stored under another key's name, or refused by
        its collection's validation) is skipped with a warning naming its object and why: it is
        never indexed, and it never stops the rebuild. ``if_incomplete``: leave an index that another
        process has finished building meanwhile (see :meth:`Index.rebuild`).
        """
        settings = self.settings
        skipped = 0

        def valid() -> Iterator[dict]:
            nonlocal skipped
            for name, doc, problem in self._scan():
                problem = problem or document_problem(doc, settings, name)
                if problem:
                    skipped += 1
                    LOG.warning("rebuild: %s skipped, not indexed: %s",
                                name or f"{doc.get('collection')}/{doc.get('key')}", problem)
                    continue
                yield doc

        count = self.index.rebuild(valid(), if_incomplete=if_incomplete)
        if count is None:
            LOG.warning("index already rebuilt from S3 by another process")
            return len(self.index.keys())
        LOG.warning("index rebuilt from S3: %d entries%s", count,
                    f", {skipped} invalid documents skipped" if skipped else "")
        return count

    def _scan(self) -> Iterator[tuple[str | None, dict | None, str | None]]:
        scan = getattr(self.store, "scan", None)
        if scan is not None:
            yield from scan()
            return
        for doc in self.store.iter_documents():  # a store without names (in-memory test doubles)
            yield None, doc, None

    # -- S3 and the index disagreeing ----------------------------------------------------------------
    def refresh(self, collection: str, key: str) -> str | None:
        """Bring one entry's index row in line with its S3 document; what changed, if anything.

        'lost': the document is gone, the row dropped; 'invalid': the document is no longer valid,
        the row dropped; 'taken': the index now holds S3's document (it lacked it or had another
        one). S3 is read while the index's write lock is held, so no write of the catalogue's own
        can come in between. A store that cannot read one document (a test double) changes nothing.
        """
        get = getattr(self.store, "get_document", None)
        if get is None:
            return None
        settings = self.settings
        with self.index.write() as tx:
            current = tx.current(collection, key)
            doc, problem = get(collection, key)
            if doc is None and problem is None:
                if current is None:
                    return None
                tx.remove(collection, key)
                LOG.warning("%s/%s: its S3 document is gone (deleted behind the catalogue's back); "
                            "dropped from the index", collection, key)
                return "lost"
            problem = problem or document_problem(doc, settings, entry_object(collection, key))
            if problem:
                if current is None:
                    return None
                tx.remove(collection, key)
                LOG.warning("%s/%s: its S3 document is not valid (%s); dropped from the index",
                            collection, key, problem)
                return "invalid"
            if current is not None and current["version"] == doc["version"] and current["record"] == doc["record"] \
                    and current["original"] == doc.get("original"):
                return None
            if current is not None:
                tx.remove(collection, key)
            tx.insert(doc)
            LOG.warning("%s/%s: the index %s; it now holds S3's version %s", collection, key,
                        "lacked it" if current is None else f"had version {current['version']}", doc["version"])
            return "taken"

    def reconcile(self) -> dict:
        """Compare the index with S3's listing: drop entries whose document is gone, index documents it
        lacks (each difference re-checked with :meth:`refresh`). A document changed in place is taken
        by the next write of its entry, or by a rebuild."""
        if getattr(self.store, "list_entry_objects", None) is None:  # an in-memory test double
            return {"lost": 0, "added": 0}
        objects = set(self.store.list_entry_objects())
        indexed = {entry_object(c, k): (c, k) for c, k in self.index.keys()}
        found: dict[str, int] = {}
        for name in sorted(set(indexed) - objects):
            change = self.refresh(*indexed[name])
            if change:
                found[change] = found.get(change, 0) + 1
        for name in sorted(objects - set(indexed)):
            parsed = parse_entry_object(name)
            if parsed is None or collections.find(parsed[0]) is None:
                continue
            try:
                check_key(parsed[1])
            except BadRequest:
                LOG.warning("reconcile: %s skipped: its name is not a valid key", name)
                continue
            change = self.refresh(*parsed)
            if change:
                found[change] = found.get(change, 0) + 1
        return {"lost": found.get("lost", 0) + found.get("invalid", 0), "added": found.get("taken", 0)}


def document_problem(doc: Any, settings: Settings, name: str | None = None) -> str | None:
    """Why a document read back from S3 may not be indexed; None when it may.

    Its server fields must have their shapes, its key must be one the catalogue accepts and match the
    object it is stored as (a document planted under another entry's name does not become that
    entry), and its record must pass its collection's validation. A collection that is not
    registered here is left to the index (skipped there, counted, not an error).
    """
    if not isinstance(doc, dict):
        return "it is not a JSON object"
    collection, key = doc.get("collection"), doc.get("key")
    if not isinstance(collection, str):
        return "it has no 'collection'"
    coll = collections.find(collection)
    if coll is None:
        return None
    try:
        check_key(key)
    except BadRequest as exc:
        return exc.message
    if name is not None and name != entry_object(collection, key):
        return f"it says it is {collection}/{key}, which is stored as {entry_object(collection, key)}"
    version = doc.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        return "its 'version' is not a positive integer"
    for field in ("created", "updated"):
        if not isinstance(doc.get(field), str):
            return f"its '{field}' is not a string"
    for field in ("created_by", "updated_by"):
        if doc.get(field) is not None and not isinstance(doc.get(field), str):
            return f"its '{field}' is not a string"
    if doc.get("original") is not None and not isinstance(doc.get("original"), dict):
        return "its 'original' is not an object"
    try:
        coll.validate(key, doc.get("record"), None, settings=settings, creating=False)
    except CatalogueError as exc:
        return f"its record is not valid: {exc.message}"
    return None


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

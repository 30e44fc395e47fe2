"""S3, the catalogue's store of record: one JSON document per entry, and artefacts beside them.

Object names: ``entries/<collection>/<xx>/<key>.json`` for entries, where ``xx`` is the first two hex
digits of the key's SHA-256, and ``artefacts/<path>`` for files
(plots, config snapshots, and the checkpoints the anemoi-registry client uploads itself under
``artefacts/weights/``). A document carries everything needed to rebuild the index: the record,
the record as first registered (``original``), its version, and who wrote it when.

The 256 ``xx`` shards are there because rclone's ``serve s3`` stores a prefix as one directory and a
PUT costs time in proportion to the directory's size: measured here, 42 ms per PUT into a folder of
38 000 objects against 4.5 ms into a small one. Sharded, 100 000 checkpoints make folders of ~400.

rclone's ``serve s3`` ignores conditional writes and drops ``x-amz-meta-*`` metadata on restart
(reference/s3-servers.md), so nothing here relies on either: version checks live in the index, and
all metadata lives in the document body. The store is given an obstore store of its bucket, made
by the caller with the settings its server needs (maelflow makes it in ``maelflow.s3``); obstore
sends, signs and retries the requests in Rust, so a rebuild's parallel reads do not queue on the GIL.
"""

from __future__ import annotations

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

from maelflow_registry.errors import StoreUnavailable

FORMAT = "maelflow-catalogue/1"
ENTRIES = "entries/"
ARTEFACTS = "artefacts/"
T = TypeVar("T")


def entry_object(collection: str, key: str) -> str:
    shard = hashlib.sha256(key.encode()).hexdigest()[:2]
    return f"{ENTRIES}{collection}/{shard}/{key}.json"


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def parse_entry_object(name: str) -> tuple[str, str] | None:
    """(collection, key) of an object named like :func:`entry_object`; None for any other name."""
    parts = name.split("/")
    if len(parts) != 4 or parts[0] + "/" != ENTRIES or not parts[3].endswith(".json"):
        return None
    collection, key = parts[1], parts[3][:-len(".json")]
    return (collection, key) if entry_object(collection, key) == name else None


def dumps(data: Any) -> str:
    """The one JSON spelling used for documents and index rows, so a rebuild is byte-identical."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


class Store:
    def __init__(self, objects: Any):
        """``objects``: an obstore store of the catalogue's bucket (an ``S3Store``)."""
        self.objects = objects
        self.bucket = (getattr(objects, "config", None) or {}).get("bucket", "")

    # -- set-up ----------------------------------------------------------------------------------
    def ensure_bucket(self) -> None:
        """Make sure the bucket is there; S3 clients cannot make one here (the S3 service makes its
        buckets as folders, the EWC's are made by their owners), so a missing one is an error."""
        import obstore

        self._call("list the bucket", lambda: obstore.list_with_delimiter(self.objects, ENTRIES))

    def _call(self, what: str, fn: Callable[[], T]) -> T | None:
        """``fn()``; None when the object is missing, StoreUnavailable for any other failure."""
        from obstore.exceptions import BaseError

        try:
            return fn()
        except FileNotFoundError as exc:
            if "NoSuchBucket" in str(exc):
                raise StoreUnavailable(f"S3 has no bucket {self.bucket!r} to {what}: create it (the workspace's "
                                       "S3 service makes the buckets the catalogue's settings name when it "
                                       "starts: restart it after naming a new one)") from exc
            return None
        except (BaseError, OSError) as exc:
            raise StoreUnavailable(f"S3 could not {what}: {str(exc).splitlines()[0][:300]}") from exc

    # -- entries ---------------------------------------------------------------------------------
    def _get(self, what: str, name: str) -> Any:
        import obstore

        return self._call(what, lambda: obstore.get(self.objects, name))

    def put_document(self, doc: dict) -> None:
        import obstore

        body = dumps(doc).encode()
        self._call(f"write {doc['collection']}/{doc['key']}", lambda: obstore.put(
            self.objects, entry_object(doc["collection"], doc["key"]), body,
            attributes={"Content-Type": "application/json"}, use_multipart=False))

    def delete_document(self, collection: str, key: str) -> None:
        import obstore

        self._call(f"delete {collection}/{key}", lambda: obstore.delete(self.objects, entry_object(collection, key)))

    def list_entry_objects(self) -> Iterator[str]:
        import obstore

        batches = self._call("list entries", lambda: obstore.list(self.objects, ENTRIES, chunk_size=1000).collect())
        for meta in batches or []:
            if meta["path"].endswith(".json"):
                yield meta["path"]

    def read_object(self, name: str) -> tuple[dict | None, str | None]:
        """The document stored as ``name``: (doc, None); (None, why) when it is not one; (None, None)
        when there is no such object. Anyone holding the bucket's key can write there, so nothing
        read back is trusted: the caller validates what this returns."""
        resp = self._get(f"read {name}", name)
        if resp is None:
            return None, None
        try:
            doc = json.loads(bytes(resp.bytes()), parse_constant=_refuse_constant)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            return None, f"it is not valid JSON ({str(exc)[:120]})"
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            return None, f"it is not a {FORMAT} document"
        return doc, None

    def get_document(self, collection: str, key: str) -> tuple[dict | None, str | None]:
        """One entry's document, as :meth:`read_object` gives it."""
        return self.read_object(entry_object(collection, key))

    def scan(self, threads: int = 16) -> Iterator[tuple[str, dict | None, str | None]]:
        """(object name, document, problem) of every entry object, read in parallel (a rebuild of
        100 000 entries is bound by GET latency); objects deleted since the listing are left out."""
        names = list(self.list_entry_objects())

        def fetch(name: str) -> tuple[str, dict | None, str | None]:
            return (name, *self.read_object(name))

        with ThreadPoolExecutor(max_workers=threads) as pool:
            for name, doc, problem in pool.map(fetch, names, chunksize=64):
                if doc is not None or problem is not None:
                    yield name, doc, problem

    def iter_documents(self, threads: int = 16) -> Iterator[dict]:
        """Every entry document that parses (unchecked: see :meth:`scan`)."""
        for _, doc, _ in self.scan(threads):
            if doc is not None:
                yield doc

    # -- artefacts -------------------------------------------------------------------------------
    def put_artefact(self, path: str, body: bytes | str | Path, content_type: str) -> None:
        """Store an artefact from bytes, or from the file named by ``body`` (streamed from disk)."""
        import obstore

        source = Path(body) if isinstance(body, (str, Path)) else body
        self._call(f"write artefact {path}", lambda: obstore.put(
            self.objects, ARTEFACTS + path, source, attributes={"Content-Type": content_type}))

    def get_artefact(self, path: str) -> tuple[bytes, str] | None:
        resp = self._get(f"read artefact {path}", ARTEFACTS + path)
        if resp is None:
            return None
        return bytes(resp.bytes()), resp.attributes.get("Content-Type") or "application/octet-stream"

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
from typing import Any, Callable, Iterator, TypeVar

from maelflow_registry.errors import StoreUnavailable

FORMAT = "maelflow-catalogue/1"
ENTRIES = "entries/"
ARTEFACTS = "artefacts/"
T = TypeVar("T")


def entry_object(collection: str, key: str) -> str:
    shard = hashlib.sha256(key.encode()).hexdigest()[:2]
    return f"{ENTRIES}{collection}/{shard}/{key}.json"


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

    def iter_documents(self, threads: int = 16) -> Iterator[dict]:
        """Every entry document, read in parallel (a rebuild of 100 000 entries is bound by GET latency)."""
        keys = list(self.list_entry_objects())

        def fetch(object_key: str) -> dict | None:
            resp = self._get(f"read {object_key}", object_key)
            if resp is None:  # deleted between the listing and the read
                return None
            doc = json.loads(bytes(resp.bytes()))
            return doc if isinstance(doc, dict) and doc.get("format") == FORMAT else None

        with ThreadPoolExecutor(max_workers=threads) as pool:
            for doc in pool.map(fetch, keys, chunksize=64):
                if doc is not None:
                    yield doc

    # -- artefacts -------------------------------------------------------------------------------
    def put_artefact(self, path: str, body: bytes, content_type: str) -> None:
        import obstore

        self._call(f"write artefact {path}", lambda: obstore.put(
            self.objects, ARTEFACTS + path, body, attributes={"Content-Type": content_type}))

    def get_artefact(self, path: str) -> tuple[bytes, str] | None:
        resp = self._get(f"read artefact {path}", ARTEFACTS + path)
        if resp is None:
            return None
        return bytes(resp.bytes()), resp.attributes.get("Content-Type") or "application/octet-stream"

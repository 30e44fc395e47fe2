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
all metadata lives in the document body. S3 clients come from :mod:`maelflow.s3`, never from boto3
directly, so the path-style/SigV4/checksum settings our servers need are always applied.
"""

from __future__ import annotations

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator

from maelflow_registry.errors import StoreUnavailable

FORMAT = "maelflow-catalogue/1"
ENTRIES = "entries/"
ARTEFACTS = "artefacts/"


def entry_object(collection: str, key: str) -> str:
    shard = hashlib.sha256(key.encode()).hexdigest()[:2]
    return f"{ENTRIES}{collection}/{shard}/{key}.json"


def dumps(data: Any) -> str:
    """The one JSON spelling used for documents and index rows, so a rebuild is byte-identical."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


class Store:
    def __init__(self, client: Any, bucket: str):
        self.s3 = client
        self.bucket = bucket

    # -- set-up ----------------------------------------------------------------------------------
    def ensure_bucket(self) -> None:
        from botocore.exceptions import ClientError

        try:
            self.s3.head_bucket(Bucket=self.bucket)
        except ClientError:
            self.s3.create_bucket(Bucket=self.bucket)

    def _call(self, what: str, fn, *args, **kwargs):
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(*args, **kwargs)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("NoSuchKey", "404", "NotFound"):
                return None
            raise StoreUnavailable(f"S3 refused to {what}: {code or exc}") from exc
        except BotoCoreError as exc:
            raise StoreUnavailable(f"S3 could not be reached to {what}: {exc}") from exc

    # -- entries ---------------------------------------------------------------------------------
    def put_document(self, doc: dict) -> None:
        body = dumps(doc).encode()
        self._call(f"write {doc['collection']}/{doc['key']}", self.s3.put_object, Bucket=self.bucket,
                   Key=entry_object(doc["collection"], doc["key"]), Body=body, ContentType="application/json")

    def get_document(self, collection: str, key: str) -> dict | None:
        resp = self._call(f"read {collection}/{key}", self.s3.get_object, Bucket=self.bucket,
                          Key=entry_object(collection, key))
        return None if resp is None else json.loads(resp["Body"].read())

    def delete_document(self, collection: str, key: str) -> None:
        self._call(f"delete {collection}/{key}", self.s3.delete_object, Bucket=self.bucket,
                   Key=entry_object(collection, key))

    def list_entry_objects(self) -> Iterator[str]:
        paginator = self.s3.get_paginator("list_objects_v2")
        for page in self._call("list entries", lambda: list(paginator.paginate(Bucket=self.bucket,
                                                                              Prefix=ENTRIES))) or []:
            for obj in page.get("Contents", []):
                if obj["Key"].endswith(".json"):
                    yield obj["Key"]

    def iter_documents(self, threads: int = 16) -> Iterator[dict]:
        """Every entry document, read in parallel (a rebuild of 100 000 entries is bound by GET latency)."""
        keys = list(self.list_entry_objects())

        def fetch(object_key: str) -> dict | None:
            resp = self._call(f"read {object_key}", self.s3.get_object, Bucket=self.bucket, Key=object_key)
            if resp is None:  # deleted between the listing and the read
                return None
            doc = json.loads(resp["Body"].read())
            return doc if isinstance(doc, dict) and doc.get("format") == FORMAT else None

        with ThreadPoolExecutor(max_workers=threads) as pool:
            for doc in pool.map(fetch, keys, chunksize=64):
                if doc is not None:
                    yield doc

    # -- artefacts -------------------------------------------------------------------------------
    def put_artefact(self, path: str, body: bytes, content_type: str) -> None:
        self._call(f"write artefact {path}", self.s3.put_object, Bucket=self.bucket, Key=ARTEFACTS + path,
                   Body=body, ContentType=content_type)

    def get_artefact(self, path: str) -> tuple[bytes, str] | None:
        resp = self._call(f"read artefact {path}", self.s3.get_object, Bucket=self.bucket, Key=ARTEFACTS + path)
        if resp is None:
            return None
        return resp["Body"].read(), resp.get("ContentType") or "application/octet-stream"

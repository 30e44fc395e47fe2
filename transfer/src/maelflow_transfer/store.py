"""One dataset in the EWC object store: its manifest, its objects, reads and writes with retries.

Control calls (list, head, put, multipart, delete) go through the boto3 client made by
``maelflow.s3.s3_client``, created on first use. Reads (the manifest, and the thousands of objects
of a stage) are the hot path: botocore spends over a millisecond of Python per request under the
GIL, so each GET is presigned (``sigv4``: SigV4, path-style, ~20 us) and read over a per-thread
keep-alive connection (``http_get``) a whole buffer at a time into the caller's sink. A stage therefore never loads boto3
at all. Errors of both paths map to the same messages, and transient ones (resets, time-outs, 5xx,
throttling) are retried with back-off.
"""

from __future__ import annotations

import hashlib
import mmap
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, TypeVar

from maelflow_transfer.errors import (CredentialsError, NotPublished, StoreError, TransferError,
                                      TransientError)
from maelflow_transfer.http_get import Connection
from maelflow_transfer.manifest import MANIFEST_NAME, Entry, Manifest
from maelflow_transfer.retry import DEFAULT, Backoff

T = TypeVar("T")
Sink = Callable[[memoryview], None]

CREDENTIAL_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "InvalidToken",
                    "ExpiredToken", "403"}
RETRY_STATUS = {408, 429, 500, 502, 503, 504}
BUF = 1 << 20
MULTIPART_THRESHOLD = 64 << 20
PART_SIZE = 16 << 20
PRESIGN_SECONDS = 3600


_buffers = threading.local()


def thread_buffer() -> memoryview:
    """This thread's read buffer: one MiB, page-aligned (an mmap), so that the sink may write it
    with O_DIRECT. Shared by every source a thread reads through (the store, a local copy)."""
    buf = getattr(_buffers, "buf", None)
    if buf is None:
        buf = _buffers.buf = memoryview(mmap.mmap(-1, BUF))
    return buf


class ObjectMissing(StoreError):
    """The object is not in the store."""


def _code_of(body: bytes) -> str:
    m = re.search(rb"<Code>([^<]+)</Code>", body or b"")
    return m.group(1).decode() if m else ""


class Store:
    """``s3://bucket/prefix``: where one dataset lives in the object store."""

    def __init__(self, client: Any, bucket: str, prefix: str, *, endpoint_url: str, keys: tuple[str, str],
                 region: str = "us-east-1", timeout: float = 60.0, backoff: Backoff = DEFAULT):
        """``client``: a boto3 client, or a function making one (called at the first control call)."""
        from maelflow_transfer.sigv4 import Presigner

        self._client = client
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.endpoint_url = endpoint_url
        self.timeout = timeout
        self.backoff = backoff
        self._local = threading.local()
        self._conns: list[Connection] = []
        self._lock = threading.Lock()
        self.presigner = Presigner(endpoint_url, *keys, region=region, expires=PRESIGN_SECONDS)

    @property
    def s3(self) -> Any:
        with self._lock:
            if callable(self._client) and not hasattr(self._client, "meta"):
                self._client = self._client()
            return self._client

    # -- names ---------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"

    @property
    def endpoint(self) -> str:
        return self.endpoint_url

    def key(self, rel: str) -> str:
        return f"{self.prefix}/{rel}"

    @property
    def manifest_key(self) -> str:
        return self.key(MANIFEST_NAME)

    # -- errors --------------------------------------------------------------------------------
    def error(self, code: str, message: str, what: str, status: int | None = None) -> TransferError:
        if code in CREDENTIAL_CODES or status == 403:
            return CredentialsError(f"{what}: {self.endpoint} refused the credentials ({code or status}); check "
                                    "the EWC access and secret keys (the workspace's S3 service, or the "
                                    "site's .maelflow/ewc.json placed by 'maelflow deploy')")
        if code == "NoSuchBucket":
            return StoreError(f"{what}: bucket {self.bucket!r} does not exist at {self.endpoint}")
        return StoreError(f"{what}: S3 error {code or status}: {message}")

    def _boto_error(self, exc: Exception, what: str) -> Exception:
        from botocore.exceptions import (ClientError, ConnectionError as BotoConnectionError,
                                         HTTPClientError, NoCredentialsError)

        if isinstance(exc, ClientError):
            err = exc.response.get("Error", {})
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if status in RETRY_STATUS or err.get("Code") in ("SlowDown", "RequestTimeout", "InternalError"):
                return TransientError(f"{what}: {err.get('Code')} ({status})")
            return self.error(str(err.get("Code", "")), str(err.get("Message", exc)), what, status)
        if isinstance(exc, NoCredentialsError):
            return CredentialsError(f"{what}: no S3 credentials configured")
        if isinstance(exc, (BotoConnectionError, HTTPClientError, OSError)):
            return TransientError(f"{what}: {exc}")
        return exc

    def call(self, what: str, fn: Callable[[], T], stop: threading.Event | None = None) -> T:
        """``fn()`` (a boto3 call), its transient failures retried with back-off."""
        for attempt in range(self.backoff.attempts):
            try:
                return fn()
            except Exception as exc:  # noqa: BLE001 - mapped just below
                mapped = self._boto_error(exc, what)
                if not isinstance(mapped, TransientError):
                    if mapped is exc:
                        raise
                    raise mapped from None
                if attempt + 1 == self.backoff.attempts or (stop is not None and stop.is_set()):
                    raise StoreError(f"{mapped} (gave up after {attempt + 1} tries; is {self.endpoint} up?)") from None
                self.backoff.sleep(attempt, stop)
        raise AssertionError("unreachable")

    # -- manifest ------------------------------------------------------------------------------
    def read_manifest(self) -> Manifest | None:
        buf = bytearray()
        for attempt in range(self.backoff.attempts):
            buf.clear()
            try:
                self.get(MANIFEST_NAME, buf.extend)
                break
            except ObjectMissing:
                return None
            except TransientError as exc:
                if attempt + 1 == self.backoff.attempts:
                    raise StoreError(f"{exc} (gave up after {attempt + 1} tries; is {self.endpoint} up?)") from None
                self.backoff.sleep(attempt)
        try:
            return Manifest.from_json(bytes(buf))
        except (ValueError, KeyError, TypeError) as exc:
            raise StoreError(f"the manifest at s3://{self.bucket}/{self.manifest_key} is unreadable ({exc})") from None

    def require_manifest(self, dataset: str) -> Manifest:
        manifest = self.read_manifest()
        if manifest is None:
            raise NotPublished(f"dataset {dataset!r} is not published: no manifest at "
                               f"s3://{self.bucket}/{self.manifest_key} (publish it first: "
                               f"maelflow transfer publish ZARR --dataset {dataset})")
        return manifest

    def write_manifest(self, manifest: Manifest) -> None:
        body = manifest.to_json().encode()
        self.call(f"writing the manifest of {self.url}", lambda: self.s3.put_object(
            Bucket=self.bucket, Key=self.manifest_key, Body=body, ContentType="application/json",
            Metadata={"sha256": hashlib.sha256(body).hexdigest()}))

    def delete_manifest(self) -> None:
        self.call(f"withdrawing the manifest of {self.url}",
                  lambda: self.s3.delete_object(Bucket=self.bucket, Key=self.manifest_key))

    # -- listing, metadata, deletion --------------------------------------------------------
    def list(self) -> dict[str, int]:
        """Relative key -> size of every object under the prefix (the manifest excluded)."""
        def run() -> dict[str, int]:
            out: dict[str, int] = {}
            pages = self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.prefix + "/")
            for page in pages:
                for obj in page.get("Contents", []):
                    rel = obj["Key"][len(self.prefix) + 1:]
                    if rel != MANIFEST_NAME:
                        out[rel] = obj["Size"]
            return out
        return self.call(f"listing {self.url}", run)

    def sha256_of(self, rel: str, stop: threading.Event | None = None) -> str | None:
        """The checksum an earlier publish stored in the object's metadata, if any."""
        head = self.call(f"reading s3://{self.bucket}/{self.key(rel)}",
                         lambda: self.s3.head_object(Bucket=self.bucket, Key=self.key(rel)), stop)
        return head.get("Metadata", {}).get("sha256")

    def delete(self, rels: list[str]) -> None:
        for i in range(0, len(rels), 1000):
            batch = [{"Key": self.key(r)} for r in rels[i:i + 1000]]
            self.call(f"deleting stale objects under {self.url}", lambda: self.s3.delete_objects(
                Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True}))

    # -- writes --------------------------------------------------------------------------------
    def put(self, rel: str, data: bytes, sha256: str, stop: threading.Event | None = None) -> None:
        self.call(f"uploading s3://{self.bucket}/{self.key(rel)}", lambda: self.s3.put_object(
            Bucket=self.bucket, Key=self.key(rel), Body=data, Metadata={"sha256": sha256}), stop)

    def put_multipart(self, rel: str, parts: Callable[[], Any], sha256: str, check: Callable[[], None],
                      pool: ThreadPoolExecutor, stop: threading.Event | None = None) -> None:
        """Multipart upload of a large object. ``parts()`` yields its parts' bytes in order (the
        caller hashes them as they are read); ``check()`` runs before the upload is completed and
        raises when those bytes did not match the manifest, so a wrong object never appears."""
        key = self.key(rel)
        what = f"uploading s3://{self.bucket}/{key}"
        upload_id = self.call(what, lambda: self.s3.create_multipart_upload(
            Bucket=self.bucket, Key=key, Metadata={"sha256": sha256}), stop)["UploadId"]
        try:
            futures = []
            for number, data in enumerate(parts(), start=1):
                futures.append(pool.submit(lambda n=number, d=data: {"PartNumber": n, "ETag": self.call(
                    what, lambda: self.s3.upload_part(Bucket=self.bucket, Key=key, UploadId=upload_id,
                                                      PartNumber=n, Body=d), stop)["ETag"]}))
                if len(futures) >= 4:          # bounded memory: at most a few parts in flight
                    futures[-4].result()
            done = [f.result() for f in futures]
            check()
            self.call(what, lambda: self.s3.complete_multipart_upload(
                Bucket=self.bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": done}), stop)
        except BaseException:
            try:
                self.s3.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
            except Exception:  # noqa: BLE001 - the first error is the one to report
                pass
            raise

    # -- reads: the hot path -----------------------------------------------------------------
    def _connection(self) -> Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            p = self.presigner
            conn = self._local.conn = Connection(p.scheme, p.host, timeout=self.timeout)
            with self._lock:
                self._conns.append(conn)
        return conn

    def get(self, rel: str, sink: Sink, *, start: int | None = None, end: int | None = None,
            stop: threading.Event | None = None) -> int:
        """Stream object ``rel`` (bytes ``start``..``end`` inclusive, if given) into ``sink``, a
        full buffer (1 MiB) at a time but the last; returns the byte count. One try: a
        TransientError means "retry from the start" (the caller's sink must start over too),
        other errors are final."""
        conn = self._connection()
        headers = {"Range": f"bytes={start}-{end}"} if start is not None else None
        what = f"reading s3://{self.bucket}/{self.key(rel)}"
        try:
            resp = conn.get(self.presigner.path(self.bucket, self.key(rel)), headers)
        except OSError as exc:
            raise TransientError(f"{what}: {type(exc).__name__}: {exc}") from None
        if resp.status not in (200, 206):
            try:
                body = resp.read()
            except OSError:
                body = b""
                conn.close()
            code = _code_of(body)
            if resp.status in RETRY_STATUS or code in ("SlowDown", "InternalError", "RequestTimeout"):
                raise TransientError(f"{what}: HTTP {resp.status} {code}")
            if code == "NoSuchKey" or (resp.status == 404 and code != "NoSuchBucket"):
                raise ObjectMissing(f"{what}: the object is missing from the store, although the manifest "
                                    "lists it (the published copy was damaged: publish the dataset again)")
            raise self.error(code, body.decode(errors="replace")[:200], what, resp.status)
        view = thread_buffer()
        n = 0
        while True:
            if stop is not None and stop.is_set():
                conn.close()                   # the rest of the body is not wanted
                raise TransientError(f"{what}: stopped")
            try:
                filled = resp.readinto(view)   # a whole buffer: aligned blocks for O_DIRECT writers
            except OSError as exc:
                conn.close()
                raise TransientError(f"{what}: {type(exc).__name__}: {exc} after {n} bytes") from None
            if filled:
                try:
                    sink(view[:filled])
                except BaseException:
                    conn.close()               # unread body: the connection cannot be reused
                    raise
                n += filled
            if filled < BUF:
                return n

    def close(self) -> None:
        with self._lock:
            conns, self._conns = self._conns, []
        for conn in conns:
            conn.close()


def entry_key(store: Store, entry: Entry) -> str:
    return f"s3://{store.bucket}/{store.key(entry.key)}"

"""Publish a dataset folder to S3 and stage it back to a site folder, object by object.

Both directions are resumable per object and verified against the manifest. Publishing writes the
manifest last, so a dataset without a manifest in the store is, by definition, not published yet.
Staging downloads into a hidden sibling folder and renames it into place only when every object
has been verified, so nothing ever trains on half a dataset.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from botocore.exceptions import ClientError, EndpointConnectionError

from maelflow_transfer.errors import TransferError
from maelflow_transfer.manifest import MANIFEST_NAME, Entry, Manifest, free_bytes, scan, sha256_file

Progress = Callable[[int, int, int, int], None]  # bytes done, bytes total, objects done, objects total


@dataclass
class Result:
    objects: int
    copied: int
    bytes_copied: int
    seconds: float


class _Counter:
    def __init__(self, total_bytes: int, total_objects: int, progress: Progress | None):
        self.lock = threading.Lock()
        self.bytes = 0
        self.objects = 0
        self.total_bytes = total_bytes
        self.total_objects = total_objects
        self.progress = progress

    def add(self, nbytes: int, objects: int = 0) -> None:
        with self.lock:
            self.bytes += nbytes
            self.objects += objects
            if self.progress:
                self.progress(self.bytes, self.total_bytes, self.objects, self.total_objects)


def _s3_error(exc: Exception, what: str) -> TransferError:
    if isinstance(exc, ClientError):
        code = exc.response.get("Error", {}).get("Code", "")
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403"):
            return TransferError(f"{what}: the object store refused the credentials ({code}); "
                                 "check the S3 access and secret keys")
        if code in ("NoSuchBucket",):
            return TransferError(f"{what}: the bucket does not exist ({code})")
        return TransferError(f"{what}: S3 error {code}: {exc}")
    if isinstance(exc, EndpointConnectionError):
        return TransferError(f"{what}: cannot reach the object store ({exc})")
    return TransferError(f"{what}: {exc}")


def manifest_key(prefix: str) -> str:
    return f"{prefix.rstrip('/')}/{MANIFEST_NAME}"


def read_manifest(s3, bucket: str, prefix: str) -> Manifest | None:
    try:
        body = s3.get_object(Bucket=bucket, Key=manifest_key(prefix))["Body"].read()
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
            return None
        raise _s3_error(exc, f"reading the manifest of s3://{bucket}/{prefix}") from None
    return Manifest.from_json(body)


def publish(source: Path, dataset: str, s3, bucket: str, prefix: str, *, workers: int = 16,
            progress: Progress | None = None, on_manifest: Callable[[Manifest], None] | None = None) -> Result:
    source = Path(source)
    if not source.is_dir():
        raise TransferError(f"dataset {dataset!r}: source {source} does not exist or is not a folder")
    t0 = time.monotonic()
    manifest = scan(source, dataset)
    if not manifest.entries:
        raise TransferError(f"dataset {dataset!r}: source {source} holds no files")
    if on_manifest:
        on_manifest(manifest)
    published = read_manifest(s3, bucket, prefix)
    if published == manifest:
        return Result(len(manifest.entries), 0, 0, time.monotonic() - t0)
    # objects already uploaded with the same checksum (an earlier, interrupted publish) are kept
    existing: dict[str, str] = {}
    try:
        pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix.rstrip("/") + "/")
        for page in pages:
            for obj in page.get("Contents", []):
                existing[obj["Key"]] = str(obj["Size"])
    except Exception as exc:
        raise _s3_error(exc, f"listing s3://{bucket}/{prefix}") from None
    counter = _Counter(manifest.total_bytes, len(manifest.entries), progress)

    def one(e: Entry) -> int:
        key = f"{prefix.rstrip('/')}/{e.key}"
        if existing.get(key) == str(e.size):
            head = s3.head_object(Bucket=bucket, Key=key)
            if head.get("Metadata", {}).get("sha256") == e.sha256:
                counter.add(e.size, 1)
                return 0
        s3.upload_file(str(source / e.key), bucket, key, ExtraArgs={"Metadata": {"sha256": e.sha256}},
                       Callback=lambda n: counter.add(n))
        counter.add(0, 1)
        return e.size

    copied = nbytes = 0
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(one, e) for e in manifest.entries]
        for f in as_completed(futures):
            try:
                n = f.result()
            except TransferError:
                raise
            except Exception as exc:
                raise _s3_error(exc, f"publishing {dataset!r}") from None
            if n:
                copied += 1
                nbytes += n
    # a source modified during the upload must not be published under the earlier checksums
    again = scan(source, dataset)
    if again != manifest:
        raise TransferError(f"dataset {dataset!r}: {source} changed while it was being published; run again")
    s3.put_object(Bucket=bucket, Key=manifest_key(prefix), Body=manifest.to_json().encode())
    return Result(len(manifest.entries), copied, nbytes, time.monotonic() - t0)


def stage(dataset: str, s3, bucket: str, prefix: str, dest: Path, *, workers: int = 16,
          progress: Progress | None = None, retries: int = 3) -> Result:
    dest = Path(dest)
    t0 = time.monotonic()
    manifest = read_manifest(s3, bucket, prefix)
    if manifest is None:
        raise TransferError(f"dataset {dataset!r} is not published: no manifest at s3://{bucket}/{manifest_key(prefix)}")
    final_manifest = dest / MANIFEST_NAME
    if final_manifest.is_file() and Manifest.from_json(final_manifest.read_text()) == manifest:
        return Result(len(manifest.entries), 0, 0, time.monotonic() - t0)
    if dest.exists():
        raise TransferError(f"dataset {dataset!r}: {dest} exists but is not this published dataset; "
                            "move it away or stage to another --dest")
    partial = dest.with_name(f".{dest.name}.partial")
    partial.mkdir(parents=True, exist_ok=True)
    need = sum(e.size for e in manifest.entries if not (partial / e.key).is_file())
    if free_bytes(partial) < need:
        raise TransferError(f"dataset {dataset!r}: {need / 2**30:.2f} GiB needed but only "
                            f"{free_bytes(partial) / 2**30:.2f} GiB free under {partial.parent}")
    counter = _Counter(manifest.total_bytes, len(manifest.entries), progress)

    def one(e: Entry) -> int:
        target = partial / e.key
        if target.is_file() and target.stat().st_size == e.size and sha256_file(target) == e.sha256:
            counter.add(e.size, 1)
            return 0
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.part")
        for attempt in range(retries + 1):
            s3.download_file(bucket, f"{prefix.rstrip('/')}/{e.key}", str(tmp))
            if tmp.stat().st_size == e.size and sha256_file(tmp) == e.sha256:
                os.replace(tmp, target)
                counter.add(e.size, 1)
                return e.size
            time.sleep(min(2 ** attempt * 0.1, 2))
        tmp.unlink(missing_ok=True)
        raise TransferError(f"dataset {dataset!r}: object {e.key} does not match its manifest checksum "
                            f"after {retries + 1} downloads; the copy in the store is corrupt")

    copied = nbytes = 0
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(one, e) for e in manifest.entries]
        for f in as_completed(futures):
            try:
                n = f.result()
            except TransferError:
                for other in futures:
                    other.cancel()
                raise
            except Exception as exc:
                for other in futures:
                    other.cancel()
                raise _s3_error(exc, f"staging {dataset!r}") from None
            if n:
                copied += 1
                nbytes += n
    (partial / MANIFEST_NAME).write_text(manifest.to_json())
    os.rename(partial, dest)
    return Result(len(manifest.entries), copied, nbytes, time.monotonic() - t0)


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)

"""The one place that makes S3 clients, so every caller gets the settings our servers need.

Every S3 call of maelflow (the transfer's stage and publish, the catalogue's documents, the
workspace service's health check) goes through obstore, the Python binding of the Rust
``object_store`` crate: its requests are signed, sent, retried and read in Rust, off the GIL, over
pooled keep-alive connections. Measured on the embedded server (docs/transfer.md), a download of
small objects through it, SHA-256 included, runs at about 3x boto3/s3transfer and 1.6 to 1.9x
s3transfer on the AWS CRT (which verifies nothing, and cannot complete a multipart upload to rclone);
large objects at about 1.7x boto3, uploads at 1.1 to 1.4x.

The embedded store (``rclone serve s3``) and the EWC endpoints are not AWS, and rclone has quirks
(reference/s3-servers.md) that the settings below, and the code using the stores, live with:

- path-style addressing (``virtual_hosted_style_request=False``): the bucket would otherwise be
  looked up as a DNS name; plain ``http://`` is allowed for the loopback service;
- a ranged GET is answered 200, not 206 (gofakes3 fixed it after rclone 1.75). object_store rightly
  refuses such an answer ("non-partial response"), so the transfer reads a large object whole when
  the server cannot answer ranges (``maelflow_transfer.store.Store`` finds out once per store);
- conditional requests are ignored and ``x-amz-meta-*`` metadata is lost on a restart: checksums
  live in manifests and document bodies, never in ETags or conditional writes;
- concurrent PUTs into one folder raced in rclone 1.75.1 and 1.75.2 and could leave an object
  unreadable until a restart: constraints.txt pins the version (see the note there);
- a bucket is a top-level folder of rclone's data folder, and rclone keeps its listing of that
  folder for the life of the process (``--dir-cache-time``): buckets are made as folders before the
  service starts (``maelflow.services.s3``); obstore has no CreateBucket, which a real EWC bucket
  does not need.

Credentials are handed over through a callback, not left to obstore's environment lookup, so a
user's ``AWS_SESSION_TOKEN`` or ~/.aws profile never leaks into a request to the EWC. Uploads are
sent with ``UNSIGNED-PAYLOAD``: the signature then does not hash every byte uploaded a second time
(maelflow checks its own SHA-256 of every object against the manifest).
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any


DEFAULT_REGION = "us-east-1"
DEFAULT_BUCKET = "ewc"
ROLES = ("read", "write", "catalogue")   # one S3 server and key pair each (maelflow.services.s3)


def object_store(settings: dict[str, Any], bucket: str | None = None, prefix: str = "", *,
                 connect_timeout: float = 10, read_timeout: float = 60, max_retries: int = 3,
                 retry_timeout: float = 60) -> Any:
    """An obstore ``S3Store`` for ``bucket`` (default: the settings' own), rooted at ``prefix``.

    ``settings``: ``endpoint_url``, ``access_key``, ``secret_key``, optional ``region`` and
    ``bucket`` (the EWC settings of ``maelflow.ewc``). ``read_timeout``: the longest silence while a
    response is read (a large object may take longer than that in all); transient failures
    (connection errors, 5xx, time-outs) are retried ``max_retries`` times with back-off, within
    ``retry_timeout`` seconds, before the caller sees them.
    """
    from obstore.store import S3Store

    access, secret = settings["access_key"], settings["secret_key"]

    def credentials() -> dict[str, Any]:
        return {"access_key_id": access, "secret_access_key": secret, "token": None, "expires_at": None}

    endpoint = settings["endpoint_url"].rstrip("/")
    name = bucket or settings.get("bucket") or DEFAULT_BUCKET
    # an external endpoint (the services profile) may need virtual-hosted addressing, for which
    # object_store takes the bucket's own host as the endpoint, and may present a certificate of a
    # private CA, trusted beside the system's
    virtual = settings.get("addressing") == "virtual"
    extra_options: dict[str, Any] = {}
    if settings.get("ca_bundle"):
        extra_options["root_certificate"] = Path(settings["ca_bundle"]).expanduser().read_bytes()
    return S3Store(
        name,
        prefix=prefix.strip("/") or None,
        endpoint=_virtual_host(endpoint, name) if virtual else endpoint,
        region=settings.get("region") or DEFAULT_REGION,
        virtual_hosted_style_request=virtual,
        unsigned_payload=True,
        credential_provider=credentials,
        client_options={**extra_options, "allow_http": endpoint.startswith("http://"),
                        "connect_timeout": timedelta(seconds=connect_timeout),
                        "read_timeout": timedelta(seconds=read_timeout),
                        # no limit on a whole request: a large object at a slow site's pace is fine
                        "timeout": timedelta(days=1),
                        "pool_idle_timeout": timedelta(seconds=50)},
        retry_config={"max_retries": max_retries, "retry_timeout": timedelta(seconds=retry_timeout),
                      "backoff": {"init_backoff": timedelta(milliseconds=250),
                                  "max_backoff": timedelta(seconds=8), "base": 2}},
    )


def _virtual_host(endpoint: str, bucket: str) -> str:
    """``https://host`` -> ``https://bucket.host`` (virtual-hosted style)."""
    scheme, _, rest = endpoint.partition("://")
    return f"{scheme}://{bucket}.{rest}"


def settings_from_service(extra: dict[str, Any], role: str = "write") -> dict[str, Any]:
    """EWC settings of ``role`` from the workspace S3 service's description (``ServiceInfo.extra``).

    A description without roles (an external endpoint with one key pair) serves every role."""
    if role not in ROLES:
        raise ValueError(f"unknown S3 role {role!r}; known: {', '.join(ROLES)}")
    roles = extra.get("roles")
    if roles:
        extra = roles[role]
    return {"endpoint_url": extra["endpoint_url"], "access_key": extra["access_key"],
            "secret_key": extra["secret_key"], "region": extra.get("region", "us-east-1"),
            "bucket": extra.get("bucket", DEFAULT_BUCKET),
            # an external endpoint (the services profile): its CA bundle and addressing style
            **{k: extra[k] for k in ("ca_bundle", "addressing") if extra.get(k)}}


def role_for_bucket(extra: dict[str, Any], bucket: str | None) -> str:
    """The role whose server serves ``bucket`` (the catalogue's bucket: ``catalogue``; else ``write``)."""
    for role in ("write", "catalogue"):
        if bucket in (extra.get("roles", {}).get(role, {}).get("buckets") or ()):
            return role
    return "write"

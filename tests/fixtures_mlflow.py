"""A real ``mlflow server`` on 127.0.0.1 for the tests: sqlite backend, proxied local artifacts.

The server can be stopped and started again mid-test (same port, same stores) to play a tracking outage.
It is stopped by process group at session end: ``mlflow server`` runs its web workers as children.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

START_TIMEOUT_S = 120  # first start creates the sqlite schema: slow on a 2-core machine
STOP_TIMEOUT_S = 15


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """``mlflow server`` as a child process group; ``uri`` stays the same across stop()/start().

    Its stores live under ``root`` unless ``backend_store_uri`` names an existing one (docs/screenshot_mlflow.py
    does, and adds ``extra_args``).
    """

    def __init__(self, root: Path, backend_store_uri: str | None = None, extra_args: tuple[str, ...] = ()) -> None:
        self.root = root
        self.backend_store_uri = backend_store_uri or f"sqlite:///{root / 'mlflow.db'}"
        self.extra_args = extra_args
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.log_file = root / "server.log"
        self._proc: subprocess.Popen | None = None

    def start(self) -> None:
        if self.running:
            return
        mlflow_bin = Path(sys.executable).with_name("mlflow")
        cmd = [
            str(mlflow_bin), "server",
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--workers", "1",  # 2 cores: one web worker answers tests fine
            "--backend-store-uri", self.backend_store_uri,
            "--serve-artifacts",
            "--artifacts-destination", str(self.root / "artifacts"),
            *self.extra_args,
        ]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        # The job runner (GenAI scorers) would add ~7 worker processes; tracking does not use it.
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
        with open(self.log_file, "ab") as log:
            # Own session: the process group id is our child's pid, so stop() reaches its web workers too.
            self._proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {self._proc.returncode}; see {self.log_file}")
            if self._healthy():
                return
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"mlflow server did not answer within {START_TIMEOUT_S}s; see {self.log_file}")

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):  # SIGKILL also takes any child the leader left behind
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                continue
        # The port must be free before a restart.
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while self._healthy() and time.monotonic() < deadline:
            time.sleep(0.2)

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as resp:
                return resp.status == 200
        except OSError:
            return False


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """One real tracking server for the session; tests that stop it must start it again."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow_server"))
    server.start()
    try:
        yield server
    finally:
        server.stop()

"""The gan-dist command as a user runs it: clean errors for bad input, and the quickstart path."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import TINY_MODEL

REPO = Path(__file__).resolve().parents[1]
GAN_DIST = str(Path(sys.executable).parent / "gan-dist")


def run_cli(*args: str, cwd: Path = REPO, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "COLUMNS": "200"}
    return subprocess.run([GAN_DIST, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["train.batch_size=1"], "train.batch_size"),  # cannot give each of 2 workers a sample
        (["loss.name=wgan-gp"], "model.d_norm"),
        (["train.stepz=3"], "train.stepz"),
        (["train.steps=-1"], "train.steps"),
        (["data.url=/nonexistent/shards"], "data.url"),
    ],
)
def test_bad_config_is_one_clear_line_without_traceback(overrides, key):
    args = ["train", "jobs/quickstart.yaml"]
    for item in overrides:
        args += ["--set", item]
    proc = run_cli(*args)
    assert proc.returncode == 2
    assert "config error" in proc.stderr and key in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


def test_data_that_does_not_fit_the_config_is_refused_before_ray_starts(digits_shards):
    proc = run_cli("train", "jobs/quickstart.yaml", "--set", f"data.url={digits_shards}", "--set", "data.channels=3")
    assert proc.returncode == 2 and "holds grayscale (1 channel) images but data.channels=3" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_missing_config_file():
    proc = run_cli("train", "jobs/nope.yaml")
    assert proc.returncode == 2 and "not found" in proc.stderr


def test_prepare_rejects_a_missing_source(tmp_path):
    proc = run_cli("prepare", str(tmp_path / "nothing-here"), str(tmp_path / "out"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr


def test_prepare_prints_what_it_wrote_and_what_comes_next(tmp_path):
    """README path, first step: prepare the digits with the embedded defaults (training it: tests/test_console.py)."""
    proc = run_cli("prepare", "sklearn:digits", "data/digits", "--resolution", "32", "--samples-per-shard", "450",
                   cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "1797 samples in 4 shards" in proc.stdout and "next: gan-dist inspect data/digits" in proc.stdout
    assert "\r" not in proc.stderr  # no progress bar redrawn into a log


def test_sample_from_a_path_that_does_not_exist_says_so(tmp_path):
    proc = run_cli("sample", str(tmp_path / "no-such-run/step-000000001"), "--out", str(tmp_path / "out"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "no such checkpoint directory or generator file" in proc.stderr


@pytest.mark.parametrize(
    "uri, message",
    [
        ("http://127.0.0.1:1", "MLflow tracking server unreachable"),  # nothing listens: fail, do not train blind
        ("htp://127.0.0.1:5000", "MLflow has no tracking store for 'htp://'"),  # a typo
        ("sqlite://gan_dist_mlflow.db", "three or four slashes"),
    ],
)
def test_tracking_that_cannot_work_fails_before_ray_starts(digits_shards, uri, message):
    proc = run_cli("train", "jobs/quickstart.yaml", "--set", f"data.url={digits_shards}", "--set", f"tracking.uri={uri}")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert message in proc.stdout and "hint:" in proc.stdout and "starting a local Ray instance" not in proc.stdout


def test_a_cluster_address_that_does_not_answer_fails_at_once(digits_shards):
    proc = run_cli("train", "jobs/quickstart.yaml", "--set", f"data.url={digits_shards}", "--address", "127.0.0.1:1",
                   timeout=60)  # fmt: skip
    assert proc.returncode == 1 and "no Ray cluster at --address" in proc.stdout and "hint:" in proc.stdout

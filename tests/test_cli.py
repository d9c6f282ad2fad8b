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
        (["train.batch_size=63"], "train.batch_size"),
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


@pytest.mark.ray
def test_quickstart_command_on_the_embedded_default(tmp_path):
    """README path: prepare the digits, then `gan-dist train jobs/quickstart.yaml` on a local Ray."""
    prep = run_cli("prepare", "sklearn:digits", "data/digits", "--resolution", "32", "--samples-per-shard", "450",
                   cwd=tmp_path)
    assert prep.returncode == 0, prep.stderr
    assert "1797 samples in 4 shards" in prep.stdout
    args = ["train", str(REPO / "jobs/quickstart.yaml"), "--set", "train.steps=4", "--set", "train.log_every=2"]
    for item in TINY_MODEL:
        args += ["--set", item]
    proc = run_cli(*args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step 4/4" in proc.stderr  # progress lines from rank 0
    assert "done at step 4" in proc.stdout
    # Embedded defaults: checkpoints and the sqlite MLflow store land in the working directory.
    assert list((tmp_path / "gan_dist_runs").glob("*/step-*/state.pt"))
    assert (tmp_path / "gan_dist_mlflow.db").is_file()

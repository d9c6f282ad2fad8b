"""Session-wide fixtures: one local Ray instance and one prepared digits dataset for all tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Ray 2.60 turns token auth on for local clusters by default; tests say what they want explicitly. The in-process
# instance of `ray_session` is private to this process (no dashboard, no job server) and runs without auth; the
# multi-node cluster of test_multinode.py (cluster/local.sh) always runs with token auth.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")

pytest_plugins = ["tests.fixtures_s3", "tests.fixtures_mlflow"]

TINY_MODEL = ["model.g_width=8", "model.d_width=8", "model.z_dim=16"]


@pytest.fixture(scope="session")
def ray_session(tmp_path_factory):
    """One local Ray instance shared by every test that trains (started here, shut down here).

    Yields the path of the chaos-drill file its workers watch (see gan_dist.train.loop._fault_drill)."""
    import ray

    chaos = tmp_path_factory.mktemp("chaos") / "plan.json"  # armed by tests that kill a worker
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        configure_logging=False,
        runtime_env={"env_vars": {"GAN_DIST_CHAOS_FILE": str(chaos)}},
    )
    yield chaos
    ray.shutdown()


@pytest.fixture(scope="session")
def digits_shards(tmp_path_factory) -> Path:
    """scikit-learn's 1,797 digits at 32x32 in 4 uneven shards (450, 450, 450, 447)."""
    from gan_dist.data.prepare import prepare

    out = tmp_path_factory.mktemp("digits")
    prepare("sklearn:digits", str(out), resolution=32, channels=1, samples_per_shard=450, progress=False)
    return out


@pytest.fixture
def job_tree(digits_shards, tmp_path) -> dict:
    """A tiny but complete job on the digits, storing everything under tmp_path."""
    return {
        "data": {"url": str(digits_shards), "resolution": 32, "channels": 1, "loader_workers": 1},
        "train": {"batch_size": 16, "steps": 6, "log_every": 2, "sample_every": 3, "sample_grid": 16},
        "scaling": {"num_workers": 2},
        "checkpoint": {"storage": str(tmp_path / "runs"), "every": 3},
        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "tests"},
    }


@pytest.fixture(scope="session")
def digits_classifier(digits_shards, tmp_path_factory) -> Path:
    """The offline feature extractor (a small CNN) trained briefly on the digits' labels."""
    from gan_dist.storage import StorageConfig
    from gan_dist.metrics.classifier import train_classifier

    out = tmp_path_factory.mktemp("classifier") / "digits.pt"
    return train_classifier(str(digits_shards), StorageConfig(), 32, 1, out, steps=120, width=16)

"""Data end to end: prepare to a real S3 endpoint (SeaweedFS) and read it back; train from S3 on real MNIST;
train through damaged shards and check the skip count. The training tests start TorchTrainer runs (Ray)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from gan_dist.config import StorageConfig, build_config
from gan_dist.data import build_loader, list_shards, prepare, read_manifest
from gan_dist.driver import run_training
from gan_dist.storage import list_objects, read_bytes
from tests.conftest import TINY_MODEL
from tests.test_data import garble_member_header, write_dataset

MNIST_DIR = Path(__file__).resolve().parents[2] / "shared/data/mnist"


def _loader_cfg(url: str, endpoint: str | None = None):
    tree = {
        "data": {"url": url, "loader_workers": 1},
        "train": {"batch_size": 32, "seed": 3},
        "scaling": {"num_workers": 2},
        "storage": {"endpoint_url": endpoint, "retries": 2},
    }
    return build_config(tree)


def test_prepare_to_s3_lists_and_reads_back(s3_server, s3_bucket: str, digits_shards: Path) -> None:
    storage = StorageConfig(endpoint_url=s3_server.endpoint_url)
    url = f"s3://{s3_bucket}/digits"
    m = prepare("sklearn:digits", url, resolution=32, channels=1, samples_per_shard=450, progress=False,
                processes=2, storage=storage)
    local = read_manifest(digits_shards)
    assert m.shards == local.shards  # byte-identical to the local prepare with the same settings
    names = [f"{url}/shard-{i:06d}.tar" for i in range(4)]
    assert list_objects(url, storage) == [f"{url}/manifest.json", *names]
    assert read_manifest(url, storage) == m
    assert hashlib.sha256(read_bytes(names[2], storage)).hexdigest() == m.shards[2].sha256
    assert list_shards(url, storage) == names == list_shards(url + "/shard-{000000..000003}.tar", storage)

    # The same stream from S3 as from disk (in-process, loader worker processes reading through boto3).
    from_s3 = build_loader(_loader_cfg(url, s3_server.endpoint_url), rank=1, world_size=2)
    from_disk = build_loader(_loader_cfg(str(digits_shards)), rank=1, world_size=2)
    for _ in range(3):
        assert torch.equal(next(from_s3).images, next(from_disk).images) and from_s3.keys == from_disk.keys


@pytest.mark.ray
def test_train_from_s3_on_real_mnist(ray_session, s3_env, s3_bucket: str, job_tree: dict) -> None:
    if not (MNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"MNIST test split not found in {MNIST_DIR}")
    url = f"s3://{s3_bucket}/mnist"
    storage = StorageConfig(endpoint_url=s3_env.endpoint_url)
    m = prepare(str(MNIST_DIR), url, resolution=32, channels=1, samples_per_shard=2500, progress=False,
                processes=2, storage=storage)
    assert m.num_samples == 10000 and len(m.shards) == 4 and m.labels == [str(d) for d in range(10)]

    # The workers get the endpoint from the config (the environment of Ray's workers does not have it).
    cfg = build_config(
        job_tree,
        TINY_MODEL
        + [f"data.url={url}", f"storage.endpoint_url={s3_env.endpoint_url}", "train.steps=4", "checkpoint.every=4"],
    )
    outcome = run_training(cfg)
    assert outcome.final_step == 4 and outcome.metrics["rank_steps"] == [4, 4]
    assert outcome.metrics["data_skipped"] == 0


@pytest.mark.ray
def test_training_through_damaged_shards_counts_every_skip(ray_session, job_tree: dict, tmp_path: Path) -> None:
    # 4 shards of 20; 2 ranks x global batch 16: an epoch is 5 batches per rank, 2 shards (40 samples) each.
    root = tmp_path / "damaged"
    write_dataset(root, [20, 20, 20, 20], broken=frozenset({30}))  # a PNG cut in half in shard 1
    garble_member_header(root / "shard-000000.tar", member=10)  # garbage mid-tar: shard 0 ends after 5 samples
    expected = (20 - 5) + 1
    cfg = build_config(
        job_tree,
        TINY_MODEL
        + [
            f"data.url={root}",
            "data.shuffle_buffer=0",  # every sample of the epoch is decoded (none left in a buffer)
            "train.steps=5",  # exactly one epoch: each damaged sample is met once
            "checkpoint.every=5",
            "train.log_every=5",
            "train.sample_every=5",
        ],
    )
    outcome = run_training(cfg)
    assert outcome.final_step == 5
    assert outcome.metrics["data_skipped"] == expected

"""The offline classifier extractor, real-statistics caching, evaluate(), write_samples() and the
sharded (2-process) evaluation, on the digits and a tiny untrained generator."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

from gan_dist.config import EvalConfig, build_config
from gan_dist.data.loader import to_float
from gan_dist.data.subset import read_images
from gan_dist.evaluate import evaluate
from gan_dist.metrics.classifier import ClassifierExtractor, train_classifier
from gan_dist.metrics.runner import evaluate_generator_distributed, extract_features, gather_to_rank0, real_statistics
from gan_dist.metrics.stats import feature_statistics, frechet_distance
from gan_dist.models import build_generator
from gan_dist.data.images import to_uint8
from gan_dist.sample import slerp, write_samples
from gan_dist.models.io import export_generator, load_generator
from gan_dist.storage import StorageConfig
from gan_dist.train.checkpoint import save_checkpoint
from tests.conftest import TINY_MODEL

METRICS = {"fid", "kid_mean", "kid_std", "precision", "recall", "is_mean", "is_std"}
MODES = {"modes", "mode_kl"}  # the digits are labelled and the extractor is their classifier


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny networks here gain nothing from intra-op threads, and on a busy 2-core machine two OpenMP
    threads spin-wait for each other: training the classifier took 90 s with 2 threads, 8 s with 1."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def classifier(digits_shards, tmp_path_factory):
    path = tmp_path_factory.mktemp("classifier") / "digits.pt"
    return train_classifier(str(digits_shards), StorageConfig(), 32, 1, path, steps=150, width=16)


@pytest.fixture(scope="module")
def generator(digits_shards, tmp_path_factory):
    """(checkpoint dir, exported file) of a tiny untrained DCGAN for 32px digits."""
    root = tmp_path_factory.mktemp("generator")
    cfg = build_config({"data": {"url": str(digits_shards)}, "checkpoint": {"storage": str(root)}}, TINY_MODEL)
    torch.manual_seed(0)
    g = build_generator(cfg.model, 32, 1)
    ckpt = save_checkpoint(root / "ckpt", {"config": cfg.model_dump(mode="json"), "step": 7, "g_ema": g.state_dict()})
    return ckpt, export_generator(ckpt, root / "g.pt")


def test_classifier_learns_the_digits_and_separates_real_from_noise(classifier, digits_shards):
    extractor = ClassifierExtractor(classifier)
    assert extractor.meta["holdout_accuracy"] >= 0.9  # 179 held-out digits, never trained on
    images = torch.stack([image for image, _ in read_images(str(digits_shards), StorageConfig(), 32, 1, 2000)])
    half = len(images) // 2
    first, _ = extract_features(extractor, [to_float(images[:half], "cpu")], "cpu")
    second, logits = extract_features(extractor, [to_float(images[half:], "cpu")], "cpu")
    noise, _ = extract_features(extractor, [torch.rand(half, 1, 32, 32) * 2 - 1], "cpu")
    assert first.shape == (half, extractor.dim) and logits.shape == (len(images) - half, 10)
    real_vs_real = frechet_distance(*feature_statistics(first), *feature_statistics(second))
    real_vs_noise = frechet_distance(*feature_statistics(first), *feature_statistics(noise))
    assert real_vs_real < 0.05 * real_vs_noise


def test_classifier_file_must_be_plain_data(tmp_path):
    bad = tmp_path / "bad.pt"
    torch.save({"format": "gan_dist.classifier", "obj": Image.new("L", (2, 2))}, bad)
    with pytest.raises(ValueError, match="refusing"):
        ClassifierExtractor(bad)


def test_evaluate_scores_a_generator_and_reuses_the_real_statistics(classifier, generator, digits_shards, tmp_path,
                                                                     monkeypatch):
    ckpt, exported = generator
    cfg = EvalConfig(extractor="classifier", extractor_path=str(classifier), batch_size=64)
    cache = tmp_path / "cache"
    first = evaluate(str(exported), str(digits_shards), cfg, StorageConfig(), 200, cache_dir=cache)
    assert set(first) == METRICS | MODES and all(torch.isfinite(torch.tensor(v)) for v in first.values())
    assert first["fid"] > 1 and 0 <= first["precision"] <= 1 and 1 <= first["is_mean"] <= 10
    assert 1 <= first["modes"] <= 10 and first["mode_kl"] >= 0
    (cached,) = cache.iterdir()
    stamp = cached.stat().st_mtime_ns

    def no_reading(*args, **kwargs):
        raise AssertionError("real images were read again instead of using the cache")

    monkeypatch.setattr("gan_dist.metrics.runner.read_images", no_reading)
    again = evaluate(str(ckpt), str(digits_shards), cfg, StorageConfig(), 200, cache_dir=cache)
    assert again == pytest.approx(first, rel=1e-6)  # same fakes from the directory as from the export
    assert [p.name for p in cache.iterdir()] == [cached.name] and cached.stat().st_mtime_ns == stamp
    with pytest.raises(AssertionError, match="read again"):  # another image count is another key
        evaluate(str(exported), str(digits_shards), cfg, StorageConfig(), 100, cache_dir=cache)


class _Replay(torch.nn.Module):
    """A "generator" that hands out real digits in order: the fake path must then score like real data."""

    def __init__(self, images: torch.Tensor) -> None:
        super().__init__()
        self.images, self.served = to_float(images, "cpu"), 0

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        self.served += len(z)
        return self.images[self.served - len(z) : self.served]


def test_real_images_served_as_fakes_score_far_better_than_an_untrained_generator(classifier, generator,
                                                                                   digits_shards, tmp_path):
    extractor = ClassifierExtractor(classifier)
    real = real_statistics(str(digits_shards), StorageConfig(), extractor, 32, 1, 800, tmp_path, 100)
    digits = torch.stack([image for image, _ in read_images(str(digits_shards), StorageConfig(), 32, 1, 2000)])
    replay = evaluate_generator_distributed(_Replay(digits[-800:]), 16, extractor, real, 800, 100, 0, 1, "cpu", 0)
    g, _ = load_generator(generator[1])
    untrained = evaluate_generator_distributed(g, 16, extractor, real, 800, 100, 0, 1, "cpu", 0)
    assert replay["fid"] < 0.05 * untrained["fid"] and replay["kid_mean"] < 0.05 * untrained["kid_mean"]
    assert replay["precision"] > 0.7 and replay["recall"] > 0.7 and untrained["recall"] < 0.1
    assert replay["is_mean"] > 5 > untrained["is_mean"]  # ten well-recognised classes vs a blur


def test_write_samples_pngs_grid_and_interpolation(generator, tmp_path):
    _, exported = generator
    paths = write_samples(exported, num=10, out_dir=tmp_path / "a", seed=3, batch_size=4, interpolate=5)
    names = [p.name for p in paths]
    assert names == [f"sample-{i:06d}.png" for i in range(10)] + ["grid.png", "interpolation.png"]
    g, meta = load_generator(exported)
    z = torch.randn(4, meta["model"]["z_dim"], generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = to_uint8(g(z))[0, 0].numpy()
    first = Image.open(paths[0])
    assert first.mode == "L" and (np.asarray(first) == expected).all()  # the PNG holds exactly G's pixels
    assert Image.open(paths[10]).size == (4 * 34 + 2, 3 * 34 + 2)  # 10 images: 4 columns, 3 rows, 2px padding
    assert Image.open(paths[11]).size == (5 * 34 + 2, 8 * 34 + 2)  # 8 rows of 5 frames
    again = write_samples(exported, num=10, out_dir=tmp_path / "b", seed=3, batch_size=7, interpolate=5)
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(paths, again))


def test_slerp_keeps_the_endpoints_and_the_norm():
    z0, z1 = torch.randn(3, 64), torch.randn(3, 64)
    z1 = z1 / z1.norm(dim=1, keepdim=True) * z0.norm(dim=1, keepdim=True)
    path = slerp(z0, z1, torch.linspace(0, 1, 7))
    torch.testing.assert_close(path[:, 0], z0)
    torch.testing.assert_close(path[:, -1], z1)
    torch.testing.assert_close(path.norm(dim=2), z0.norm(dim=1, keepdim=True).expand(3, 7))
    torch.testing.assert_close(slerp(z0, z0, torch.tensor([0.5]))[:, 0], z0)  # parallel: no division by 0


def test_real_images_and_the_cache_on_s3(s3_server, s3_bucket, digits_shards, classifier, tmp_path, monkeypatch):
    client = s3_server.client()
    for f in digits_shards.iterdir():
        client.upload_file(str(f), s3_bucket, f"digits/{f.name}")
    storage = StorageConfig(endpoint_url=s3_server.endpoint_url, retries=2)
    extractor = ClassifierExtractor(classifier)
    url, cache = f"s3://{s3_bucket}/digits/shard-{{000000..000003}}.tar", f"s3://{s3_bucket}/run/eval-cache"
    remote = real_statistics(url, storage, extractor, 32, 1, 300, cache, 100)
    local = real_statistics(str(digits_shards), StorageConfig(), extractor, 32, 1, 300, tmp_path, 100)
    torch.testing.assert_close(remote.mu, local.mu)
    name = remote.location.rsplit("/", 1)[1]
    assert name == os.path.basename(local.location)  # keyed by the manifest's content, not by its place
    assert [o["Key"] for o in client.list_objects_v2(Bucket=s3_bucket, Prefix="run/")["Contents"]] == [
        f"run/eval-cache/{name}"
    ]
    # A dataset prefix (listed through the manifest) on an endpoint given only in the job's storage settings.
    assert "AWS_ENDPOINT_URL" not in os.environ
    by_prefix = real_statistics(f"s3://{s3_bucket}/digits", storage, extractor, 32, 1, 300, tmp_path / "p", 100)
    torch.testing.assert_close(by_prefix.mu, local.mu)
    monkeypatch.setattr("gan_dist.metrics.runner.read_images", lambda *a, **k: pytest.fail("cache on S3 not used"))
    again = real_statistics(url, storage, extractor, 32, 1, 300, cache, 100)
    torch.testing.assert_close(again.sigma, remote.sigma)


def test_a_damaged_shard_is_skipped_with_a_warning(digits_shards, tmp_path, caplog):
    data = tmp_path / "digits"
    shutil.copytree(digits_shards, data)
    shard = data / "shard-000001.tar"
    shard.write_bytes(shard.read_bytes()[: 100_000])  # cut off mid-archive
    images = list(read_images(str(data), StorageConfig(), 32, 1, 5000))
    assert 450 * 3 <= len(images) < 1797
    assert "unreadable" in caplog.text


def _rank_main(rank: int, init_file: str, args: dict) -> None:
    torch.set_num_threads(1)  # two processes on a small machine: do not oversubscribe its cores
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        gathered = gather_to_rank0(torch.full((rank + 1, 2), float(rank)))  # unequal counts: 1 and 2 rows
        extractor = ClassifierExtractor(args["classifier"])
        real = real_statistics(args["data"], StorageConfig(), extractor, 32, 1, 200, args["cache"], 64, rank, 2)
        g, meta = load_generator(args["generator"])
        metrics = evaluate_generator_distributed(g, meta["model"]["z_dim"], extractor, real, 200, 64, rank, 2,
                                                 "cpu", 0)
        if rank == 0:
            torch.save({"gathered": gathered, "mu": real.mu, "metrics": metrics}, args["out"])
        else:
            assert gathered is None and real is None and metrics is None
    finally:
        dist.destroy_process_group()


def test_two_ranks_give_the_single_process_numbers(classifier, generator, digits_shards, tmp_path):
    _, exported = generator
    args = {"classifier": str(classifier), "data": str(digits_shards), "cache": str(tmp_path / "cache2"),
            "generator": str(exported), "out": str(tmp_path / "rank0.pt")}
    mp.spawn(_rank_main, args=(str(tmp_path / "pg"), args), nprocs=2, join=True)
    result = torch.load(args["out"], weights_only=True)
    torch.testing.assert_close(result["gathered"], torch.tensor([[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]]))

    extractor = ClassifierExtractor(classifier)
    single = real_statistics(str(digits_shards), StorageConfig(), extractor, 32, 1, 200, tmp_path / "cache1", 64)
    torch.testing.assert_close(result["mu"], single.mu)
    g, meta = load_generator(exported)
    metrics = evaluate_generator_distributed(g, meta["model"]["z_dim"], extractor, single, 200, 64, 0, 1, "cpu", 0)
    assert result["metrics"] == pytest.approx(metrics, rel=1e-4, abs=1e-6)
    assert os.listdir(tmp_path / "cache2") == os.listdir(tmp_path / "cache1")  # rank 0 wrote the same key

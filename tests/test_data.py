"""Data stage: prepare real sources into shards, then stream them back per rank (no Ray needed)."""

from __future__ import annotations

import gzip
import hashlib
import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from webdataset import TarWriter

from gan_dist.config import GanConfig, build_config
from gan_dist.data import (
    MANIFEST_NAME,
    assign_shards,
    build_loader,
    check_sharding,
    list_shards,
    prepare,
    read_manifest,
    to_float,
)

REPO = Path(__file__).resolve().parents[1]
MNIST_DIRS = [REPO.parent / "shared/data/mnist", Path("../shared/data/mnist").resolve()]


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("digits")
    prepare("sklearn:digits", str(out), resolution=32, channels=1, samples_per_shard=500, progress=False)
    return out


def _cfg(url: Path | str, *, workers: int = 0, batch: int = 64, world: int = 2, **data) -> GanConfig:
    return build_config(
        {
            "data": {"url": str(url), "loader_workers": workers, **data},
            "train": {"batch_size": batch, "seed": 7},
            "scaling": {"num_workers": world},
        }
    )


def _tar_members(path: Path) -> list[str]:
    with tarfile.open(path) as tar:
        return tar.getnames()


def test_prepare_digits_writes_shards_and_manifest(digits: Path) -> None:
    m = read_manifest(digits)
    assert m is not None
    assert [s.name for s in m.shards] == [f"shard-{i:06d}.tar" for i in range(4)]
    assert [s.num_samples for s in m.shards] == [500, 500, 500, 297]
    assert m.num_samples == 1797 and m.labels == [str(d) for d in range(10)]
    assert (m.resolution, m.channels, m.image_format, m.skipped) == (32, 1, "png", [])
    for s in m.shards:
        data = (digits / s.name).read_bytes()
        assert s.bytes == len(data) and s.sha256 == hashlib.sha256(data).hexdigest()
    assert sorted(p.name for p in digits.iterdir()) == [MANIFEST_NAME] + [s.name for s in m.shards]
    names = _tar_members(digits / "shard-000003.tar")
    assert names[:2] == ["000001500.cls", "000001500.png"] and len(names) == 2 * 297
    with tarfile.open(digits / "shard-000000.tar") as tar:
        labels = {int(tar.extractfile(n).read()) for n in tar.getnames() if n.endswith(".cls")}
        image = Image.open(io.BytesIO(tar.extractfile("000000000.png").read()))
    assert labels == set(range(10))
    assert (image.mode, image.size) == ("L", (32, 32)) and np.array(image).max() > 200


def test_rerun_replaces_stale_shards(tmp_path: Path) -> None:
    prepare("sklearn:digits", str(tmp_path), resolution=8, channels=1, samples_per_shard=500, progress=False)
    m = prepare("sklearn:digits", str(tmp_path), resolution=8, channels=1, samples_per_shard=1000, progress=False)
    assert [s.num_samples for s in m.shards] == [1000, 797]
    assert sorted(p.name for p in tmp_path.glob("shard-*")) == ["shard-000000.tar", "shard-000001.tar"]


def test_loader_yields_uint8_batches_forever(digits: Path) -> None:
    batches = build_loader(_cfg(digits), rank=0, world_size=2)
    for _ in range(40):  # ~900 samples per rank per epoch: 40 batches of 32 cross into epoch 1
        batch = next(batches)
        assert batch.shape == (32, 1, 32, 32) and batch.dtype == torch.uint8
    assert batches.skipped == 0
    x = to_float(batch, "cpu")
    assert x.dtype == torch.float32 and x.min() >= -1 and x.max() <= 1 and x.max() > 0.5


def test_loader_is_deterministic_and_ranks_differ(digits: Path) -> None:
    first = next(build_loader(_cfg(digits, random_flip=True), rank=0, world_size=2))
    again = next(build_loader(_cfg(digits, random_flip=True), rank=0, world_size=2))
    assert torch.equal(first, again)
    # Two loader processes per rank: 2 ranks x 2 workers exactly uses the 4 shards.
    rank0 = next(build_loader(_cfg(digits, workers=2), rank=0, world_size=2))
    rank1 = next(build_loader(_cfg(digits, workers=2), rank=1, world_size=2))
    assert rank0.shape == rank1.shape == (32, 1, 32, 32)
    assert not torch.equal(rank0, rank1)


def test_loader_rejects_wrong_resolution_and_too_few_shards(digits: Path) -> None:
    with pytest.raises(ValueError, match="data.resolution=64"):
        build_loader(_cfg(digits, resolution=64), rank=0, world_size=2)
    with pytest.raises(ValueError, match="data.loader_workers=4"):
        build_loader(_cfg(digits, workers=4), rank=0, world_size=2)


def test_loader_skips_corrupt_samples_and_truncated_shards(tmp_path: Path) -> None:
    good = io.BytesIO()
    Image.new("L", (32, 32), 128).save(good, "PNG")
    with TarWriter(str(tmp_path / "shard-000000.tar")) as tar:
        for i in range(20):
            tar.write({"__key__": f"{i:09d}", "png": good.getvalue() if i % 5 else b"not a png"})
    data = (tmp_path / "shard-000000.tar").read_bytes()
    (tmp_path / "shard-000001.tar").write_bytes(data[: len(data) // 2 + 100])  # cut mid-member
    batches = build_loader(_cfg(tmp_path, batch=8, world=1, shuffle_buffer=4), rank=0, world_size=1)
    for _ in range(6):
        assert next(batches).shape == (8, 1, 32, 32)
    assert batches.skipped >= 5  # 4 bad PNGs in the whole shard + the truncated shard


def test_folder_source_skips_bad_files_and_labels_from_folders(tmp_path: Path) -> None:
    src = tmp_path / "src"
    rng = np.random.default_rng(0)
    for cls, (w, h) in (("cats", (40, 30)), ("dogs", (24, 50))):
        (src / cls).mkdir(parents=True)
        for i in range(3):
            image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
            image.save(src / cls / f"{i}.png")
            image.save(src / cls / f"{i}.jpg", quality=90)
    (src / "cats" / "empty.png").write_bytes(b"")
    (src / "dogs" / "truncated.png").write_bytes((src / "dogs" / "0.png").read_bytes()[:300])
    (src / "dogs" / "note.jpg").write_text("this is not a jpeg")
    (src / "README.txt").write_text("not an image extension: ignored, not listed")

    out = tmp_path / "out"
    m = prepare(
        str(src),
        str(out),
        resolution=32,
        channels=3,
        samples_per_shard=5,
        image_format="jpeg",
        flip_duplicate=True,
        progress=False,
    )
    assert m.labels == ["cats", "dogs"]
    assert m.num_samples == 2 * 12 and [s.num_samples for s in m.shards] == [5, 5, 5, 5, 4]
    assert sorted(s.path for s in m.skipped) == ["cats/empty.png", "dogs/note.jpg", "dogs/truncated.png"]
    assert all(s.reason for s in m.skipped)
    names = [n for s in m.shards for n in _tar_members(out / s.name)]
    assert sum(n.endswith(".jpg") for n in names) == 24 and sum(n.endswith(".cls") for n in names) == 24
    with tarfile.open(out / m.shards[-1].name) as tar:  # sorted paths: the last images are the dogs
        assert tar.extractfile(tar.getnames()[0]).read() == b"1"
    batch = next(build_loader(_cfg(out, batch=4, world=1, channels=3), rank=0, world_size=1))
    assert batch.shape == (4, 3, 32, 32)


def test_mnist_idx_source_is_stored_losslessly(tmp_path: Path) -> None:
    root = next((d for d in MNIST_DIRS if (d / "t10k-images-idx3-ubyte.gz").is_file()), None)
    if root is None:
        pytest.skip(f"MNIST test split not found in {[str(d) for d in MNIST_DIRS]}")
    out = tmp_path
    m = prepare(str(root), str(out), resolution=28, channels=1, progress=False)  # 28 px: no resize, exact pixels
    assert m.num_samples == 10000 and len(m.shards) == 10 and m.labels == [str(d) for d in range(10)]
    raw = gzip.decompress((root / "t10k-images-idx3-ubyte.gz").read_bytes())
    labels = gzip.decompress((root / "t10k-labels-idx1-ubyte.gz").read_bytes())
    with tarfile.open(out / "shard-000009.tar") as tar:
        stored = np.array(Image.open(io.BytesIO(tar.extractfile("000009999.png").read())))
        label = int(tar.extractfile("000009999.cls").read())
    expected = np.frombuffer(raw, np.uint8, offset=16).reshape(10000, 28, 28)[-1]
    assert np.array_equal(stored, expected) and label == labels[-1]


def test_assign_shards_covers_disjointly_and_reshuffles_per_epoch() -> None:
    shards = [f"s{i}" for i in range(10)]

    def split(epoch: int, seed: int = 0) -> list[list[str]]:
        return [
            assign_shards(shards, rank=r, world_size=2, worker=w, num_workers=2, epoch=epoch, seed=seed)
            for r in range(2)
            for w in range(2)
        ]

    parts = split(0)
    assert all(parts) and sorted(s for p in parts for s in p) == sorted(shards)
    assert split(0) == parts
    assert split(1) != parts and split(0, seed=1) != parts


def test_check_sharding() -> None:
    with pytest.raises(ValueError, match="scaling.num_workers=2.*data.loader_workers=2.*at least 4"):
        check_sharding(3, world_size=2, loader_workers=2)
    check_sharding(4, world_size=2, loader_workers=2)
    check_sharding(2, world_size=2, loader_workers=0)  # in-process loading: one reader per rank


def test_list_shards_patterns(digits: Path, tmp_path: Path) -> None:
    from_dir = list_shards(str(digits))
    assert from_dir == [str(digits / f"shard-{i:06d}.tar") for i in range(4)]
    assert list_shards(f"{digits}/shard-{{000000..000003}}.tar") == from_dir
    assert list_shards(from_dir[1]) == [from_dir[1]]
    with pytest.raises(ValueError, match="1 of 5 shards do not exist"):
        list_shards(f"{digits}/shard-{{000000..000004}}.tar")
    with pytest.raises(ValueError, match="no manifest.json or shard"):
        list_shards(str(tmp_path))
    with pytest.raises(ValueError, match="not a shard directory"):
        list_shards(str(tmp_path / "missing"))

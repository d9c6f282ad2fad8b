"""Data stage without Ray: prepare real sources into shards, then stream them back per rank."""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import io
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from webdataset import TarWriter

from gan_dist.config import GanConfig, StorageConfig, build_config
from gan_dist.data import (
    MANIFEST_NAME,
    Manifest,
    ShardInfo,
    assign_shards,
    build_loader,
    check_sharding,
    list_shards,
    prepare,
    read_manifest,
    to_float,
    write_manifest,
)
from gan_dist.data import loader as loader_module
from gan_dist.data.inspect import inspect_dataset

REPO = Path(__file__).resolve().parents[1]
MNIST_DIR = REPO.parent / "shared/data/mnist"


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("digits")
    prepare("sklearn:digits", str(out), resolution=32, channels=1, samples_per_shard=500, progress=False, processes=2)
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


def write_dataset(root: Path, sizes: list[int], *, broken: frozenset[int] = frozenset()) -> Manifest:
    """Shards of random grayscale PNGs (keys numbered across shards) plus a manifest; samples in ``broken``
    hold a PNG cut in half, which PIL cannot decode."""
    resolution = 32  # data.resolution's default
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    infos, n = [], 0
    for s, size in enumerate(sizes):
        path = root / f"shard-{s:06d}.tar"
        with TarWriter(str(path), mtime=0) as tar:
            for _ in range(size):
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (resolution, resolution), dtype=np.uint8)).save(buf, "PNG")
                png = buf.getvalue()
                tar.write({"__key__": f"{n:09d}", "png": png[: len(png) // 2] if n in broken else png, "cls": n % 10})
                n += 1
        data = path.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        infos.append(ShardInfo(name=path.name, num_samples=size, bytes=len(data), sha256=digest))
    manifest = Manifest(num_samples=n, resolution=resolution, channels=1, image_format="png", shards=infos)
    write_manifest(manifest, root)
    return manifest


def garble_member_header(shard: Path, member: int) -> None:
    """Overwrite the tar header of the ``member``-th file with garbage: the tar reader stops there."""
    with tarfile.open(shard) as tar:
        offset = tar.getmembers()[member].offset
    with open(shard, "r+b") as f:
        f.seek(offset)
        f.write(np.random.default_rng(1).integers(0, 256, 512, dtype=np.uint8).tobytes())


def _take(batches: Iterator[torch.Tensor], n: int) -> list[tuple[torch.Tensor, list[str]]]:
    return [(next(batches), list(batches.keys)) for _ in range(n)]


# ---- prepare ---------------------------------------------------------------------------------------


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


def test_parallel_prepare_writes_the_same_shards(digits: Path, tmp_path: Path) -> None:
    serial = prepare("sklearn:digits", str(tmp_path), resolution=32, channels=1, samples_per_shard=500, progress=False)
    assert serial.shards == read_manifest(digits).shards  # the fixture used processes=2


def test_rerun_replaces_stale_shards(tmp_path: Path) -> None:
    prepare("sklearn:digits", str(tmp_path), resolution=8, channels=1, samples_per_shard=500, progress=False)
    m = prepare("sklearn:digits", str(tmp_path), resolution=8, channels=1, samples_per_shard=1000, progress=False)
    assert [s.num_samples for s in m.shards] == [1000, 797]
    assert sorted(p.name for p in tmp_path.glob("shard-*")) == ["shard-000000.tar", "shard-000001.tar"]


def _photos(src: Path) -> None:
    rng = np.random.default_rng(0)
    for cls, (w, h) in (("cats", (40, 30)), ("dogs", (24, 50))):
        (src / cls).mkdir(parents=True)
        for i in range(3):
            image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
            image.save(src / cls / f"{i}.png")
            image.save(src / cls / f"{i}.jpg", quality=90)


def test_folder_source_skips_bad_files_and_labels_from_folders(tmp_path: Path) -> None:
    src = tmp_path / "src"
    _photos(src)
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
    # 2 inputs (4 samples with their mirror images) per shard; the last pair holds only broken files: no shard.
    assert m.num_samples == 2 * 12 and [s.num_samples for s in m.shards] == [4, 4, 4, 2, 4, 4, 2]
    assert sorted(s.path for s in m.skipped) == ["cats/empty.png", "dogs/note.jpg", "dogs/truncated.png"]
    assert all(s.reason for s in m.skipped)
    names = [n for s in m.shards for n in _tar_members(out / s.name)]
    assert sum(n.endswith(".jpg") for n in names) == 24 and sum(n.endswith(".cls") for n in names) == 24
    assert sum(n.endswith("_mirror.jpg") for n in names) == 12
    with tarfile.open(out / m.shards[-1].name) as tar:  # sorted paths: the last images are the dogs
        assert tar.extractfile(tar.getnames()[0]).read() == b"1"
    batch = next(build_loader(_cfg(out, batch=4, world=1, channels=3), rank=0, world_size=1))
    assert batch.shape == (4, 3, 32, 32)


def test_labels_csv_and_wide_crop(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for name in ("a.png", "b.png", "c.png"):
        Image.new("L", (64, 32), 255).save(src / name)  # landscape, all white
    (tmp_path / "labels.csv").write_text("filename,label\na.png,smile\nb.png,neutral\n")
    common = dict(resolution=16, channels=1, progress=False, labels_csv=str(tmp_path / "labels.csv"))
    wide = prepare(str(src), str(tmp_path / "wide"), crop="wide", **common)
    assert wide.labels == ["neutral", "smile"] and wide.num_samples == 2
    assert [(s.path, s.reason) for s in wide.skipped] == [("c.png", "no label in labels_csv")]
    with tarfile.open(tmp_path / "wide" / "shard-000000.tar") as tar:
        pixels = np.array(Image.open(io.BytesIO(tar.extractfile("000000000.png").read())))
        assert tar.extractfile("000000000.cls").read() == b"1"  # a.png -> "smile"
    # The full width is kept and the 2:1 image letterboxed: black bars above and below.
    assert pixels[:3].max() == 0 and pixels[-3:].max() == 0 and pixels[6:10].min() == 255
    center = prepare(str(src), str(tmp_path / "center"), crop="center", **common)
    with tarfile.open(tmp_path / "center" / center.shards[0].name) as tar:
        assert np.array(Image.open(io.BytesIO(tar.extractfile("000000000.png").read()))).min() == 255
    with pytest.raises(ValueError, match="crop must be one of"):
        prepare(str(src), str(tmp_path / "x"), crop="tight", **common)


def test_mnist_idx_source_is_stored_losslessly(tmp_path: Path) -> None:
    if not (MNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"MNIST test split not found in {MNIST_DIR}")
    m = prepare(str(MNIST_DIR), str(tmp_path), resolution=28, channels=1, progress=False, processes=2)  # 28 px: exact
    assert m.num_samples == 10000 and len(m.shards) == 10 and m.labels == [str(d) for d in range(10)]
    raw = gzip.decompress((MNIST_DIR / "t10k-images-idx3-ubyte.gz").read_bytes())
    labels = gzip.decompress((MNIST_DIR / "t10k-labels-idx1-ubyte.gz").read_bytes())
    with tarfile.open(tmp_path / "shard-000009.tar") as tar:
        stored = np.array(Image.open(io.BytesIO(tar.extractfile("000009999.png").read())))
        label = int(tar.extractfile("000009999.cls").read())
    expected = np.frombuffer(raw, np.uint8, offset=16).reshape(10000, 28, 28)[-1]
    assert np.array_equal(stored, expected) and label == labels[-1]


def test_inspect_summarises_and_draws_a_grid(digits: Path, tmp_path: Path) -> None:
    text = inspect_dataset(str(digits), StorageConfig(), str(tmp_path / "grid.png"), num=16)
    assert "1797 in 4 shards (297..500 per shard" in text and "10 classes" in text and "32x32" in text
    assert Image.open(tmp_path / "grid.png").size == (4 * 34 + 2, 4 * 34 + 2)  # 4x4 tiles, 2 px padding


# ---- loader ----------------------------------------------------------------------------------------


def test_loader_yields_uint8_batches_forever(digits: Path) -> None:
    batches = build_loader(_cfg(digits), rank=0, world_size=2)
    for _ in range(40):  # 28 batches of 32 per rank per epoch: 40 cross into epoch 1
        batch = next(batches)
        assert batch.shape == (32, 1, 32, 32) and batch.dtype == torch.uint8
    assert batches.skipped == 0 and len(batches.keys) == 32 and batches.keys[0].startswith("shard-00000")
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


def test_loader_rejects_bad_configurations(digits: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="data.resolution=64"):
        build_loader(_cfg(digits, resolution=64), rank=0, world_size=2)
    with pytest.raises(ValueError, match="data.loader_workers=4"):
        build_loader(_cfg(digits, workers=4), rank=0, world_size=2)
    next(build_loader(_cfg(digits, workers=4, mode="resampled"), rank=0, world_size=2))  # any shard count
    (tmp_path / "shard-000000.tar").write_bytes((digits / "shard-000000.tar").read_bytes())
    with pytest.raises(ValueError, match="no manifest.json next to the shards"):
        build_loader(_cfg(tmp_path, world=1), rank=0, world_size=1)


@pytest.mark.parametrize("mode", ["exact", "resampled"])
def test_two_ranks_by_two_workers_over_uneven_shards(tmp_path: Path, mode: str) -> None:
    sizes = [10, 30, 20, 50, 40]  # 150 samples: 18 batches of 4 per rank per epoch (global batch 8)
    write_dataset(tmp_path, sizes)
    shard_of = {f"shard-{s:06d}.tar": s for s in range(len(sizes))}
    per_epoch, epochs = 150 // 8, 2
    seen = {}
    for rank in (0, 1):
        batches = build_loader(_cfg(tmp_path, workers=2, batch=8, mode=mode), rank=rank, world_size=2)
        seen[rank] = _take(batches, per_epoch * epochs)
    for epoch in range(epochs):
        keys = {r: {k for _, ks in seen[r][epoch * per_epoch : (epoch + 1) * per_epoch] for k in ks} for r in (0, 1)}
        if mode == "exact":
            assert not keys[0] & keys[1]  # disjoint data within an epoch
        for r in (0, 1):
            for w in (0, 1):
                got = [k for n in range(epoch * per_epoch + w, (epoch + 1) * per_epoch, 2) for k in seen[r][n][1]]
                assert len(got) == (per_epoch // 2) * 4
                if mode == "exact":  # the worker's own shards of this epoch, every sample once, wrapping if short
                    mine = assign_shards(
                        list(range(5)), rank=r, world_size=2, worker=w, num_workers=2, epoch=epoch, seed=7
                    )
                    assert {shard_of[k.split("/")[0]] for k in got} <= set(mine)
                    assert len(set(got)) == min(len(got), sum(sizes[s] for s in mine))


@pytest.mark.parametrize(("mode", "workers"), [("exact", 0), ("exact", 1), ("exact", 2), ("resampled", 2)])
def test_resume_continues_the_exact_stream(digits: Path, mode: str, workers: int) -> None:
    cfg = _cfg(digits, workers=workers, mode=mode, random_flip=True, shuffle_buffer=100)
    skip, more = 29, 4  # 28 batches per epoch: resume inside epoch 1, on an odd batch number
    straight = _take(build_loader(cfg, rank=1, world_size=2), skip + more)[skip:]
    resumed = _take(build_loader(cfg, rank=1, world_size=2, start_batch=skip), more)
    for (a, keys_a), (b, keys_b) in zip(straight, resumed, strict=True):
        assert keys_a == keys_b and torch.equal(a, b)


def _damaged(root: Path) -> int:
    """4 shards of 16: shard 0 garbled at sample 5, one broken PNG in shard 1, shard 3 missing. Skips per epoch."""
    write_dataset(root, [16, 16, 16, 16], broken=frozenset({20}))
    garble_member_header(root / "shard-000000.tar", member=10)  # members: cls, png per sample -> sample 5
    (root / "shard-000003.tar").unlink()
    return (16 - 5) + 1 + 16


def test_damaged_data_is_skipped_and_counted_once_per_epoch(tmp_path: Path) -> None:
    per_epoch_skips = _damaged(tmp_path)
    batches = build_loader(_cfg(tmp_path, batch=16, world=1, shuffle_buffer=0), rank=0, world_size=1)
    epoch0 = _take(batches, 4)  # 64 samples promised: 4 batches of 16 per epoch
    assert batches.skipped == per_epoch_skips
    _take(batches, 4)
    assert batches.skipped == 2 * per_epoch_skips
    keys = [k for _, ks in epoch0 for k in ks]
    assert "shard-000001.tar/000000020" not in keys  # the broken image's slot holds another image of its batch
    assert all(b.shape == (16, 1, 32, 32) for b, _ in epoch0)


def test_decode_cache_keeps_the_stream_and_decodes_each_image_once(tmp_path: Path, monkeypatch) -> None:
    per_epoch_skips = _damaged(tmp_path)  # damage too: fill-ins and skip counts must not change
    settings = {"batch": 16, "world": 1, "shuffle_buffer": 10, "random_flip": True}
    expected = _take(build_loader(_cfg(tmp_path, **settings), rank=0, world_size=1), 12)  # 3 epochs
    decoded, decode = [], loader_module._pixels

    def counting_decode(sample, *args):
        decoded.append(sample["__key__"])
        return decode(sample, *args)

    monkeypatch.setattr(loader_module, "_pixels", counting_decode)
    cached = build_loader(_cfg(tmp_path, decode_cache_mb=1, **settings), rank=0, world_size=1)
    got = _take(cached, 12)
    assert [k for _, k in got] == [k for _, k in expected]
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(got, expected, strict=True))
    assert cached.skipped == 3 * per_epoch_skips
    # 5 readable samples of shard 0, 16 of shard 1 (one of them broken) and 16 of shard 2, each decoded once
    # although each epoch meets them more than once (the worker wraps around its shards) and there are 3.
    assert len(decoded) == len(set(decoded)) == 5 + 16 + 16


def test_resume_over_damaged_data_is_exact_and_counts_from_there(tmp_path: Path) -> None:
    _damaged(tmp_path)
    cfg = _cfg(tmp_path, batch=8, world=1, shuffle_buffer=10)
    straight = build_loader(cfg, rank=0, world_size=1)
    _take(straight, 5)
    at_resume = straight.skipped
    after = _take(straight, 6)
    resumed = build_loader(cfg, rank=0, world_size=1, start_batch=5)
    again = _take(resumed, 6)
    assert [k for _, k in after] == [k for _, k in again]
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(after, again, strict=True))
    assert resumed.skipped == straight.skipped - at_resume > 0


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def test_loader_streams_over_http(digits: Path) -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(digits)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        assert list_shards(base, StorageConfig()) == [f"{base}/shard-{i:06d}.tar" for i in range(4)]
        expected = _take(build_loader(_cfg(digits, workers=1), rank=0, world_size=2), 3)
        for url in (base, base + "/shard-{000000..000003}.tar"):  # dataset prefix (manifest) and brace pattern
            got = _take(build_loader(_cfg(url, workers=1), rank=0, world_size=2), 3)
            assert all(ka == kb and torch.equal(a, b) for (a, ka), (b, kb) in zip(got, expected, strict=True))
    finally:
        server.shutdown()
        server.server_close()


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
    check_sharding(1, world_size=2, loader_workers=2, mode="resampled")


def test_list_shards_patterns(digits: Path, tmp_path: Path) -> None:
    from_dir = list_shards(str(digits), StorageConfig())
    assert from_dir == [str(digits / f"shard-{i:06d}.tar") for i in range(4)]
    assert list_shards(f"{digits}/shard-{{000000..000003}}.tar", StorageConfig()) == from_dir
    assert list_shards(from_dir[1], StorageConfig()) == [from_dir[1]]
    with pytest.raises(ValueError, match="1 of 5 shards do not exist"):
        list_shards(f"{digits}/shard-{{000000..000004}}.tar", StorageConfig())
    with pytest.raises(ValueError, match="no manifest.json or shard"):
        list_shards(str(tmp_path), StorageConfig())
    with pytest.raises(ValueError, match="not a shard directory"):
        list_shards(str(tmp_path / "missing"), StorageConfig())

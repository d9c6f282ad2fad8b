"""Data stage without Ray: prepare real sources into shards, then stream them back per rank."""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import io
import json
import tarfile
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from webdataset import TarWriter

from gan_dist.config import GanConfig, StorageConfig, build_config
from gan_dist.data import (
    MANIFEST_NAME,
    Batch,
    BatchIterator,
    DataPosition,
    Layout,
    Manifest,
    ShardInfo,
    build_loader,
    list_shards,
    plan_data,
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


def _tar_labels(path: Path) -> list[int]:
    with tarfile.open(path) as tar:
        return [int(tar.extractfile(n).read()) for n in tar.getnames() if n.endswith(".cls")]


def write_dataset(
    root: Path,
    sizes: list[int],
    *,
    broken: frozenset[int] = frozenset(),
    classes: list[str] | None = None,
    label: Callable[[int], int] = lambda n: n % 10,
) -> Manifest:
    """Shards of random grayscale PNGs whose keys are their global ids (``cls`` = ``label(id)``) plus a manifest;
    samples in ``broken`` hold a PNG cut in half, which PIL cannot decode. The manifest lists class names and
    per-sample labels only with ``classes`` (else it is one written before labels were stored)."""
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
                tar.write({"__key__": f"{n:09d}", "png": png[: len(png) // 2] if n in broken else png, "cls": label(n)})
                n += 1
        data = path.read_bytes()
        labels = [label(i) for i in range(n - size, n)] if classes else None
        digest = hashlib.sha256(data).hexdigest()
        infos.append(ShardInfo(name=path.name, num_samples=size, bytes=len(data), sha256=digest, labels=labels))
    manifest = Manifest(
        num_samples=n, resolution=resolution, channels=1, image_format="png", shards=infos, labels=classes
    )
    write_manifest(manifest, root)
    return manifest


def garble_member_header(shard: Path, member: int) -> None:
    """Overwrite the tar header of the ``member``-th file with garbage: the tar reader stops there."""
    with tarfile.open(shard) as tar:
        offset = tar.getmembers()[member].offset
    with open(shard, "r+b") as f:
        f.seek(offset)
        f.write(np.random.default_rng(1).integers(0, 256, 512, dtype=np.uint8).tobytes())


def _take(batches: BatchIterator, n: int) -> list[tuple[Batch, list[str]]]:
    return [(next(batches), list(batches.keys)) for _ in range(n)]


def _ids(taken: list[tuple[Batch, list[str]]]) -> list[int]:
    """Global ids of the delivered images (``write_dataset`` keys are ids)."""
    return [int(k.rsplit("/", 1)[1]) for _, keys in taken for k in keys]


def _same(a: list[tuple[Batch, list[str]]], b: list[tuple[Batch, list[str]]]) -> bool:
    return len(a) == len(b) and all(ka == kb and torch.equal(x.images, y.images) for (x, ka), (y, kb) in zip(a, b))


# ---- prepare ---------------------------------------------------------------------------------------


def test_prepare_digits_writes_shuffled_labelled_shards_and_manifest(digits: Path, tmp_path: Path) -> None:
    from sklearn.datasets import load_digits

    m = read_manifest(digits)
    assert m is not None
    assert [s.name for s in m.shards] == [f"shard-{i:06d}.tar" for i in range(4)]
    assert [s.num_samples for s in m.shards] == [500, 500, 500, 297]
    assert m.num_samples == 1797 and m.labels == [str(d) for d in range(10)]
    assert (m.resolution, m.channels, m.image_format, m.skipped) == (32, 1, "png", [])
    assert (m.settings["shuffle"], m.settings["seed"]) == (True, 0)
    target = load_digits().target
    assert m.class_counts == np.bincount(target).tolist()
    for s in m.shards:
        data = (digits / s.name).read_bytes()
        assert s.bytes == len(data) and s.sha256 == hashlib.sha256(data).hexdigest()
        keys = [int(n.split(".")[0]) for n in _tar_members(digits / s.name) if n.endswith(".png")]
        assert s.labels == _tar_labels(digits / s.name) == target[keys].tolist()  # keys name the source input
        assert set(s.labels) == set(range(10)) and keys != sorted(keys)  # a random sample of the dataset
    assert sorted(p.name for p in digits.iterdir()) == [MANIFEST_NAME] + [s.name for s in m.shards]
    with tarfile.open(digits / "shard-000000.tar") as tar:
        image = Image.open(io.BytesIO(tar.extractfile(tar.getnames()[1]).read()))
    assert (image.mode, image.size) == ("L", (32, 32)) and np.array(image).max() > 200

    ordered = prepare("sklearn:digits", str(tmp_path), resolution=8, channels=1, samples_per_shard=1000,
                      shuffle=False, progress=False)  # fmt: skip
    assert _tar_members(tmp_path / "shard-000001.tar")[:2] == ["000001000.cls", "000001000.png"]
    assert ordered.shards[1].labels == target[1000:].tolist()


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
    m = prepare(str(src), str(out), resolution=32, channels=3, samples_per_shard=5, image_format="jpeg",
                flip_duplicate=True, shuffle=False, progress=False)  # fmt: skip
    assert m.labels == ["cats", "dogs"] and m.class_counts == [12, 12]
    # 2 inputs (4 samples with their mirror images) per shard; the last pair holds only broken files: no shard.
    assert m.num_samples == 2 * 12 and [s.num_samples for s in m.shards] == [4, 4, 4, 2, 4, 4, 2]
    assert sorted(s.path for s in m.skipped) == ["cats/empty.png", "dogs/note.jpg", "dogs/truncated.png"]
    assert all(s.reason for s in m.skipped)
    names = [n for s in m.shards for n in _tar_members(out / s.name)]
    assert sum(n.endswith(".jpg") for n in names) == 24 and sum(n.endswith(".cls") for n in names) == 24
    assert sum(n.endswith("_mirror.jpg") for n in names) == 12
    assert [s.labels for s in m.shards][-1] == [1, 1]  # source order: the sorted paths end with the dogs
    batch = next(build_loader(_cfg(out, batch=4, world=1, channels=3), rank=0, world_size=1))
    assert batch.images.shape == (4, 3, 32, 32) and batch.labels.dtype == torch.int64


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
    labels = np.frombuffer(gzip.decompress((MNIST_DIR / "t10k-labels-idx1-ubyte.gz").read_bytes()), np.uint8, offset=8)
    assert m.class_counts == np.bincount(labels).tolist()
    with tarfile.open(tmp_path / "shard-000009.tar") as tar:
        key = tar.getnames()[-1].split(".")[0]  # the source index of the shard's last sample
        stored = np.array(Image.open(io.BytesIO(tar.extractfile(f"{key}.png").read())))
        label = int(tar.extractfile(f"{key}.cls").read())
    expected = np.frombuffer(raw, np.uint8, offset=16).reshape(10000, 28, 28)[int(key)]
    assert np.array_equal(stored, expected) and label == labels[int(key)] == m.shards[9].labels[-1]


def test_inspect_summarises_and_draws_a_grid(digits: Path, tmp_path: Path) -> None:
    text = inspect_dataset(str(digits), StorageConfig(), str(tmp_path / "grid.png"), num=16)
    assert "1797 in 4 shards (297..500 per shard" in text and "32x32" in text
    assert "10 classes, 174..183 samples each" in text and "\n  0: 178\n" in text and "\n  9: 180\n" in text
    assert Image.open(tmp_path / "grid.png").size == (4 * 34 + 2, 4 * 34 + 2)  # 4x4 tiles, 2 px padding


# ---- loader ----------------------------------------------------------------------------------------


def test_loader_yields_labelled_uint8_batches_forever(digits: Path) -> None:
    batches = build_loader(_cfg(digits, random_flip=True), rank=0, world_size=2)
    for _ in range(30):  # 28 batches of 32 per rank per epoch: 30 cross into epoch 1
        images, labels = next(batches)
        assert images.shape == (32, 1, 32, 32) and images.dtype == torch.uint8
        assert labels.shape == (32,) and labels.dtype == torch.int64 and 0 <= labels.min() <= labels.max() <= 9
    assert batches.skipped == 0 and len(batches.keys) == 32 and batches.keys[0].startswith("shard-00000")
    assert batches.position == DataPosition(30, (Layout(2, 1, 0),))  # in epoch 1, which one layout serves
    x = to_float(images, "cpu")
    assert x.dtype == torch.float32 and x.min() >= -1 and x.max() <= 1 and x.max() > 0.5
    first = next(build_loader(_cfg(digits, random_flip=True), rank=0, world_size=2))
    again = next(build_loader(_cfg(digits, random_flip=True), rank=0, world_size=2))
    other = next(build_loader(_cfg(digits, random_flip=True), rank=1, world_size=2))
    assert torch.equal(first.images, again.images) and not torch.equal(first.images, other.images)


@pytest.mark.timeout(60)
def test_loader_workers_start_while_another_thread_of_the_rank_holds_a_lock(digits: Path, monkeypatch) -> None:
    """Regression: a loader worker forked while the rank's MLflow thread held tempfile's lock waited for that lock
    forever (its copy stays held), and the rank for its first batch. Here a thread holds the same lock while the
    loader starts its worker, in a process that has drawn no temporary name yet (so the worker needs the lock to
    send a batch); the worker must not be a fork of this process."""
    cfg = _cfg(digits, workers=1, batch=8, world=1)
    expected = _take(build_loader(cfg, rank=0, world_size=1), 2)
    monkeypatch.setattr(tempfile, "_name_sequence", None)
    held, started = threading.Event(), threading.Event()

    def hold_the_lock() -> None:
        with tempfile._once_lock:
            held.set()
            started.wait(30)

    holder = threading.Thread(target=hold_the_lock, daemon=True)
    holder.start()
    held.wait()
    batches = build_loader(cfg, rank=0, world_size=1)  # its worker starts now
    started.set()
    holder.join()
    assert _same(_take(batches, 2), expected)


def test_loader_rejects_bad_configurations(digits: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="data.resolution=64"):
        plan_data(_cfg(digits, resolution=64), 2)
    with pytest.raises(ValueError, match=r"holds grayscale \(1 channel\) images but data.channels=3"):
        plan_data(_cfg(digits, channels=3), 2)
    with pytest.raises(ValueError, match="batch_size=64 .* cannot give each of 65 ranks a sample"):
        build_loader(_cfg(digits), rank=0, world_size=65)
    with pytest.raises(ValueError, match="fewer than one global batch of 2048"):
        plan_data(_cfg(digits, batch=2048), 2)
    (tmp_path / "shard-000000.tar").write_bytes((digits / "shard-000000.tar").read_bytes())
    with pytest.raises(ValueError, match="no manifest.json next to the shards"):
        build_loader(_cfg(tmp_path, world=1), rank=0, world_size=1)


def test_old_manifest_loads_and_class_balance_needs_labels(tmp_path: Path) -> None:
    write_dataset(tmp_path, [40, 30])
    old = json.loads((tmp_path / MANIFEST_NAME).read_text())  # as written before labels were stored
    for shard in old["shards"]:
        del shard["labels"]
    del old["class_counts"]
    old["labels"] = [str(d) for d in range(10)]
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(old))
    assert read_manifest(tmp_path).shards[0].labels is None
    batches = build_loader(_cfg(tmp_path, batch=8, world=1), rank=0, world_size=1)
    assert next(batches).labels.tolist() == [int(k[-9:]) % 10 for k in batches.keys]  # from the shards' cls
    with pytest.raises(ValueError, match="data.class_balance needs per-sample class labels"):
        plan_data(_cfg(tmp_path, batch=8, world=1, class_balance=True), 1)


def test_every_sample_once_per_epoch_over_fewer_shards_than_streams(tmp_path: Path) -> None:
    sizes = [40, 70, 45]  # 155 samples in 3 shards for 2 ranks x 2 workers; global batch 8: 19 steps, 152 used
    write_dataset(tmp_path, sizes)
    steps = 155 // 8
    taken = [_take(build_loader(_cfg(tmp_path, workers=2, batch=8), rank=r, world_size=2), 2 * steps) for r in (0, 1)]
    left_out = []
    for epoch in (0, 1):
        ids = [i for r in (0, 1) for i in _ids(taken[r][epoch * steps : (epoch + 1) * steps])]
        assert len(ids) == len(set(ids)) == steps * 8 and set(ids) <= set(range(155))
        left_out.append(set(range(155)) - set(ids))
    assert left_out[0] != left_out[1]  # the fewer-than-a-batch left out differ from epoch to epoch


def test_world_size_changes_mid_epoch_deliver_the_rest_exactly_once(tmp_path: Path) -> None:
    write_dataset(tmp_path, [40, 70, 45])  # global batch 12: 12 steps per epoch, 144 of 155 samples used
    cfg = functools.partial(_cfg, tmp_path, batch=12, shuffle_buffer=10)
    straight = [build_loader(cfg(workers=2), rank=r, world_size=2) for r in (0, 1)]
    first = [_take(s, 4) for s in straight]
    at_4 = straight[0].position
    assert at_4 == straight[1].position and at_4.batches == 4
    rest = [_take(s, 8) for s in straight]
    epoch = set(_ids(first[0] + first[1] + rest[0] + rest[1]))
    assert len(epoch) == 144
    done = _ids(first[0] + first[1])

    def resumed(position: DataPosition, world: int, workers: int, steps: int) -> tuple[list[int], DataPosition]:
        loaders = [build_loader(cfg(workers=workers, world=world), r, world, position) for r in range(world)]
        ids = [i for loader in loaders for i in _ids(_take(loader, steps))]
        return ids, loaders[0].position

    for world, workers in ((1, 1), (3, 0)):
        ids, end = resumed(at_4, world, workers, 8)
        assert len(done + ids) == 144 and set(done + ids) == epoch  # none twice, none missing
        assert end == DataPosition(12, (Layout(world, max(1, workers), 0),))  # epoch 1 starts afresh
    # Two changes in one epoch: 2 -> 3 at step 4, 3 -> 1 at step 7; and a same-world resume in between is exact.
    ids_3, at_7 = resumed(at_4, 3, 0, 3)
    assert [(x.world, x.start) for x in at_7.layouts] == [(2, 0), (3, 4)]
    ids_1, _ = resumed(at_7, 1, 1, 5)
    assert len(done + ids_3 + ids_1) == 144 and set(done + ids_3 + ids_1) == epoch
    at_5 = DataPosition(5, at_7.layouts)
    continued = _take(build_loader(cfg(world=3), 2, 3, at_4), 3)[1:]
    assert _same(_take(build_loader(cfg(world=3), 2, 3, at_5), 2), continued)


@pytest.mark.parametrize(("mode", "workers"), [("exact", 0), ("exact", 1), ("exact", 2), ("resampled", 2)])
def test_resume_continues_the_exact_stream(digits: Path, mode: str, workers: int) -> None:
    # Global batch 66: 27 steps per epoch, odd, so the DataLoader worker that starts epoch 1 is not worker 0.
    cfg = _cfg(digits, batch=66, workers=workers, mode=mode, random_flip=True, shuffle_buffer=100)
    skip, more = 25, 5  # resume at an odd step of epoch 0 and cross into epoch 1
    straight = build_loader(cfg, rank=1, world_size=2)
    _take(straight, skip)
    position = straight.position
    expected = _take(straight, more)
    resumed = build_loader(cfg, rank=1, world_size=2, position=DataPosition.from_state(position.to_state()))
    assert _same(_take(resumed, more), expected)


def _constant_images(src: Path, classes: int, per_class: int) -> None:
    """32 px images whose every pixel is 20 x their class index, in a folder per class."""
    for c in range(classes):
        (src / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            Image.new("L", (32, 32), 20 * c).save(src / f"class{c}" / f"{i}.png")


def test_labels_line_up_with_images_through_shards_shuffle_and_resume(tmp_path: Path) -> None:
    _constant_images(tmp_path / "src", classes=4, per_class=9)
    prepare(str(tmp_path / "src"), str(tmp_path / "ds"), resolution=32, channels=1, samples_per_shard=5, progress=False)
    cfg = functools.partial(_cfg, tmp_path / "ds", batch=8, shuffle_buffer=6, random_flip=True)
    straight = build_loader(cfg(workers=1), rank=0, world_size=2)
    batches = _take(straight, 3)
    batches += _take(build_loader(cfg(world=1), rank=0, world_size=1, position=straight.position), 6)
    for batch, _ in batches:
        assert torch.equal(batch.images, (20 * batch.labels).to(torch.uint8).view(-1, 1, 1, 1).expand_as(batch.images))
    assert {label for batch, _ in batches for label in batch.labels.tolist()} == {0, 1, 2, 3}


def test_class_balance_draws_every_class_equally_often(tmp_path: Path) -> None:
    write_dataset(tmp_path, [30, 30, 40], classes=["common", "rare"], label=lambda n: int(n >= 90))  # 90 / 10
    batches = build_loader(_cfg(tmp_path, batch=10, world=1, class_balance=True), rank=0, world_size=1)
    taken = _take(batches, 30)  # 3 epochs of 10 steps
    labels = [label for batch, _ in taken for label in batch.labels.tolist()]
    assert labels == [int(i >= 90) for i in _ids(taken)]  # each label is its image's
    assert 0.4 < sum(labels) / len(labels) < 0.6  # uniform classes, not 90 / 10


def _damaged(root: Path) -> set[int]:
    """72 samples in shards of 16, 16, 16, 24: shard 0 garbled at sample 5, a broken PNG in shard 1 (id 20) and
    shard 3 missing. Returns the deliverable ids: 5 + 15 + 16 = 36 (the other 36 are skipped every epoch)."""
    write_dataset(root, [16, 16, 16, 24], broken=frozenset({20}), classes=[str(d) for d in range(10)])
    garble_member_header(root / "shard-000000.tar", member=10)  # members: cls, png per sample -> sample 5
    (root / "shard-000003.tar").unlink()
    return set(range(5)) | (set(range(16, 32)) - {20}) | set(range(32, 48))


def test_damaged_data_is_skipped_and_counted_once_per_epoch(tmp_path: Path) -> None:
    deliverable = _damaged(tmp_path)
    # Global batch 8, one rank: 9 steps use all 72 samples each epoch. No shuffle buffer: the 24 missing
    # samples are in a row, so whole batches have nothing deliverable and borrow the stream's next image.
    batches = build_loader(_cfg(tmp_path, batch=8, world=1, workers=2, shuffle_buffer=0), rank=0, world_size=1)
    for epoch in (1, 2):
        taken = _take(batches, 9)
        assert batches.skipped == epoch * 36
        assert set(_ids(taken)) == deliverable  # every deliverable sample, filling the other slots
        assert all(batch.images.shape == (8, 1, 32, 32) for batch, _ in taken)
        assert all(batch.labels.tolist() == [int(k[-9:]) % 10 for k in keys] for batch, keys in taken)


def test_decode_cache_keeps_the_stream_and_decodes_each_image_once(tmp_path: Path, monkeypatch) -> None:
    _damaged(tmp_path)  # damage too: fill-ins and skip counts must not change
    settings = {"batch": 8, "world": 1, "shuffle_buffer": 10, "random_flip": True}
    expected = _take(build_loader(_cfg(tmp_path, **settings), rank=0, world_size=1), 27)  # 3 epochs
    decoded, decode = [], loader_module._pixels

    def counting_decode(sample, *args):
        decoded.append(sample["__key__"])
        return decode(sample, *args)

    monkeypatch.setattr(loader_module, "_pixels", counting_decode)
    cached = build_loader(_cfg(tmp_path, decode_cache_mb=1, **settings), rank=0, world_size=1)
    assert _same(_take(cached, 27), expected)
    assert cached.skipped == 3 * 36
    # The 37 samples that can be read (5 of shard 0, 16 of shard 1 with its broken one, 16 of shard 2): each
    # decoded once in 3 epochs; later epochs do not read them again.
    assert len(decoded) == len(set(decoded)) == 37


def test_resume_over_damaged_data_is_exact_and_counts_from_there(tmp_path: Path) -> None:
    _damaged(tmp_path)
    cfg = _cfg(tmp_path, batch=8, world=1, shuffle_buffer=10)
    straight = build_loader(cfg, rank=0, world_size=1)
    _take(straight, 5)
    at_resume, position = straight.skipped, straight.position
    after = _take(straight, 6)
    resumed = build_loader(cfg, rank=0, world_size=1, position=position)
    assert _same(_take(resumed, 6), after)
    assert resumed.skipped == straight.skipped - at_resume > 0


def test_reads_the_data_once_per_epoch_and_only_what_is_owed_after_a_resume(tmp_path: Path, monkeypatch) -> None:
    write_dataset(tmp_path, [20] * 8)  # global batch 16, one rank: 10 steps use all 160 samples
    reads, read_shard = [], loader_module.read_shard

    def counting_read(url, storage):
        for sample in read_shard(url, storage):
            reads.append(sample["__key__"])
            yield sample

    monkeypatch.setattr(loader_module, "read_shard", counting_read)
    cfg = _cfg(tmp_path, batch=16, world=1, shuffle_buffer=10)
    straight = build_loader(cfg, rank=0, world_size=1)
    _take(straight, 7)
    position = straight.position
    _take(straight, 3)
    assert 160 <= len(reads) < 160 + 20  # the epoch once, plus the skipped head of the shard it starts inside
    reads.clear()
    _take(build_loader(cfg, rank=0, world_size=1, position=position), 3)
    # The 48 samples still owed, plus the positions before the first of them in its shard, and the samples
    # delivered before the resume that the shuffle buffer had left among them.
    assert 48 <= len(reads) < 48 + 20 + 10


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
            assert _same(_take(build_loader(_cfg(url, workers=1), rank=0, world_size=2), 3), expected)
    finally:
        server.shutdown()
        server.server_close()


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

"""Turn an image source into WebDataset tar shards plus a ``manifest.json``, locally or on S3.

Inputs are written in a seeded random order (``shuffle``, the default), so every shard is a random sample of
the dataset (folder sources list their images by class). The ``i``-th input of that order always lands in
shard ``i // k`` (``k`` = inputs per shard), so shard contents and names do not depend on how many processes
write them: each process takes whole shards, writes each to a temporary file and publishes it when complete
(rename, or upload to ``s3://``). The manifest, with every sample's class when the source has labels, is
written last: a dataset without one is unfinished. Unreadable inputs are skipped and listed, never fatal.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import tempfile
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps
from tqdm import tqdm
from webdataset import TarWriter

from gan_dist.storage import StorageConfig
from gan_dist.data.manifest import MANIFEST_NAME, Manifest, ShardInfo, SkippedInput, write_manifest
from gan_dist.data.sources import Source, StackedSource, open_source
from gan_dist.storage import delete, is_remote, is_s3, join, list_objects, upload_file

FILTERS = {"lanczos": Image.Resampling.LANCZOS, "box": Image.Resampling.BOX}
CROPS = ("center", "wide")


@dataclass(frozen=True)
class _Recipe:
    """How every shard is written; sent once to each worker process."""

    out: str
    resolution: int
    mode: str
    image_format: str
    jpeg_quality: int
    resize_filter: str
    flip_duplicate: bool
    crop: str
    inputs_per_shard: int
    order: np.ndarray  # input indices in writing order: shard i holds order[i*k : (i+1)*k]
    storage: StorageConfig


def prepare(
    source: str,
    out: str,
    *,
    resolution: int,
    channels: int,
    samples_per_shard: int = 1000,
    image_format: str = "png",
    jpeg_quality: int = 95,
    resize_filter: str = "lanczos",
    flip_duplicate: bool = False,
    progress: bool = True,
    crop: str = "center",
    labels_csv: str | None = None,
    processes: int = 1,
    storage: StorageConfig | None = None,
    shuffle: bool = True,
    seed: int = 0,
) -> Manifest:
    """Write ``OUT/shard-NNNNNN.tar`` + ``OUT/manifest.json`` from ``source``; returns the manifest.

    ``out``: a local directory or ``s3://bucket/prefix``. ``samples_per_shard``: at most this many samples per
    shard (fewer where inputs were skipped). ``crop``: ``center`` (square center crop) or ``wide`` (StyleGAN's
    wide crop: full width kept, letterboxed). ``labels_csv``: ``filename,label`` rows for a folder source.
    ``processes``: worker processes writing shards in parallel. ``storage``: endpoint settings for S3.
    ``shuffle``: write the inputs in a random order seeded by ``seed`` (False: in source order); ``seed``
    also draws a ``stacked-mnist:`` source's digits.
    """
    out = str(out)
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if image_format not in ("png", "jpeg"):
        raise ValueError(f"image_format must be 'png' or 'jpeg', got '{image_format}'")
    if resize_filter not in FILTERS:
        raise ValueError(f"resize_filter must be one of {sorted(FILTERS)}, got '{resize_filter}'")
    if crop not in CROPS:
        raise ValueError(f"crop must be one of {list(CROPS)}, got '{crop}'")
    if resolution < 1 or samples_per_shard < 1 or processes < 1 or not 1 <= jpeg_quality <= 100:
        raise ValueError("resolution, samples_per_shard and processes must be >= 1 and jpeg_quality in 1..100")
    if is_remote(out) and not is_s3(out):
        raise ValueError(f"{out}: OUT must be a local directory or an s3:// prefix")
    storage = storage or StorageConfig()
    settings = {
        "source": source,
        "resolution": resolution,
        "channels": channels,
        "samples_per_shard": samples_per_shard,
        "image_format": image_format,
        "jpeg_quality": jpeg_quality,
        "resize_filter": resize_filter,
        "flip_duplicate": flip_duplicate,
        "crop": crop,
        "labels_csv": labels_csv,
        "shuffle": shuffle,
        "seed": seed,
    }
    src = open_source(source, labels_csv, seed)
    if isinstance(src, StackedSource) and channels != 3:
        raise ValueError("stacked-mnist is a colour dataset (one digit per channel): use channels=3")
    recipe = _Recipe(
        out=out,
        resolution=resolution,
        mode="L" if channels == 1 else "RGB",
        image_format=image_format,
        jpeg_quality=jpeg_quality,
        resize_filter=resize_filter,
        flip_duplicate=flip_duplicate,
        crop=crop,
        inputs_per_shard=max(1, samples_per_shard // (2 if flip_duplicate else 1)),
        order=np.random.default_rng(seed).permutation(src.total) if shuffle else np.arange(src.total),
        storage=storage,
    )
    if not is_remote(out):
        Path(out).mkdir(parents=True, exist_ok=True)
    # An old manifest would describe a mix of old and new shards if this run dies half-way.
    delete(join(out, MANIFEST_NAME), storage)

    written: list[ShardInfo] = []
    skipped: list[SkippedInput] = []
    num_shards = math.ceil(src.total / recipe.inputs_per_shard)
    with tqdm(total=src.total, desc="prepare", unit="img", disable=not progress) as bar:
        for index, (info, bad) in enumerate(_write_all(src, recipe, num_shards, processes)):
            bar.update(len(_inputs(recipe, index)))
            skipped += bad
            if info is not None:
                written.append(info)
    if not written:
        raise ValueError(f"{source}: no usable images ({len(skipped)} inputs skipped)")
    _remove_stale_shards(out, {s.name for s in written}, storage)

    labels = [label for s in written for label in s.labels or []]
    manifest = Manifest(
        num_samples=sum(s.num_samples for s in written),
        resolution=resolution,
        channels=channels,
        image_format=image_format,
        labels=src.labels,
        class_counts=None if src.labels is None else np.bincount(labels, minlength=len(src.labels)).tolist(),
        shards=written,
        skipped=skipped,
        settings=settings,
    )
    write_manifest(manifest, out, storage)
    return manifest


def _inputs(recipe: _Recipe, index: int) -> list[int]:
    k = recipe.inputs_per_shard
    return recipe.order[index * k : (index + 1) * k].tolist()


def _write_all(
    src: Source, recipe: _Recipe, num_shards: int, processes: int
) -> Iterator[tuple[ShardInfo | None, list[SkippedInput]]]:
    """Results of every shard in shard order, written here or by a pool of processes."""
    if processes == 1 or num_shards == 1:
        yield from (_write_shard(src, recipe, i) for i in range(num_shards))
        return
    pool = ProcessPoolExecutor(min(processes, num_shards), initializer=_init_worker, initargs=(src, recipe))
    try:
        yield from pool.map(_worker_write_shard, range(num_shards))
    except BaseException:
        pool.shutdown(cancel_futures=True)  # do not write the remaining shards before reporting the error
        raise
    pool.shutdown()


_WORKER: tuple[Source, _Recipe] | None = None


def _init_worker(src: Source, recipe: _Recipe) -> None:
    global _WORKER
    _WORKER = (src, recipe)


def _worker_write_shard(index: int) -> tuple[ShardInfo | None, list[SkippedInput]]:
    assert _WORKER is not None, "worker process not initialised"
    return _write_shard(*_WORKER, index)


def _write_shard(src: Source, recipe: _Recipe, index: int) -> tuple[ShardInfo | None, list[SkippedInput]]:
    """Write shard ``index`` from its inputs; None when every input was skipped (no shard is written)."""
    name = f"shard-{index:06d}.tar"
    ext = "png" if recipe.image_format == "png" else "jpg"
    if is_remote(recipe.out):
        fd, tmp_name = tempfile.mkstemp(prefix=f"{name}.", suffix=".tmp")
        os.close(fd)
        tmp = Path(tmp_name)
    else:
        tmp = Path(recipe.out) / f"{name}.tmp"  # same filesystem: the final rename is atomic
    skipped: list[SkippedInput] = []
    labels: list[int] = []
    count = 0
    try:
        with TarWriter(str(tmp), mtime=0) as tar:  # fixed mtime: reruns give identical shards
            for i in _inputs(recipe, index):
                image, label, why = src.load(i)
                if image is None:
                    skipped.append(why)
                    continue
                image = _square(image.convert(recipe.mode), recipe)
                variants = [("", image)]
                if recipe.flip_duplicate:
                    variants.append(("_mirror", ImageOps.mirror(image)))
                for suffix, variant in variants:
                    sample = {"__key__": f"{i:09d}{suffix}", ext: _encode(variant, recipe)}
                    if label is not None:
                        sample["cls"] = label
                        labels.append(label)
                    tar.write(sample)
                    count += 1
        if count == 0:
            return None, skipped
        with open(tmp, "rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
        size, labelled = tmp.stat().st_size, src.labels is not None
        info = ShardInfo(name=name, num_samples=count, bytes=size, sha256=digest, labels=labels if labelled else None)
        if is_remote(recipe.out):
            upload_file(tmp, join(recipe.out, name), recipe.storage)
        else:
            os.replace(tmp, Path(recipe.out) / name)
        return info, skipped
    finally:
        tmp.unlink(missing_ok=True)


def _square(image: Image.Image, recipe: _Recipe) -> Image.Image:
    """A ``resolution``-sized square: center crop, or StyleGAN's wide crop for landscape images."""
    size, resample = recipe.resolution, FILTERS[recipe.resize_filter]
    w, h = image.size
    if recipe.crop == "wide" and w > h:
        return ImageOps.pad(image, (size, size), method=resample, color=0)  # full width, black bars above/below
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    image = image.crop((left, top, left + side, top + side))
    return image if side == size else image.resize((size, size), resample)


def _encode(image: Image.Image, recipe: _Recipe) -> bytes:
    buf = io.BytesIO()
    if recipe.image_format == "png":
        image.save(buf, "PNG")
    else:
        image.save(buf, "JPEG", quality=recipe.jpeg_quality)
    return buf.getvalue()


def _remove_stale_shards(out: str, keep: set[str], storage: StorageConfig) -> None:
    """Shards left over from an earlier, larger run into the same place."""
    if is_remote(out):
        prefix = out.rstrip("/") + "/"
        found = [u for u in list_objects(out, storage) if "/" not in u[len(prefix) :]]
    else:
        found = [str(p) for p in Path(out).iterdir()]
    for url in found:
        name = url.rsplit("/", 1)[-1]
        if name.startswith("shard-") and name.endswith(".tar") and name not in keep:
            delete(url, storage)

"""Turn an image source into WebDataset tar shards plus a ``manifest.json``.

Sources: ``sklearn:digits``, an MNIST idx file (or a folder holding them), or a folder tree of images
whose first-level subfolders name the classes. Every image is center-cropped to a square, resized and
stored as PNG or JPEG; unreadable inputs are skipped and listed in the manifest, never fatal.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm import tqdm
from webdataset import TarWriter

from gan_dist.data.manifest import MANIFEST_NAME, Manifest, ShardInfo, SkippedInput, write_manifest

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
FILTERS = {"lanczos": Image.Resampling.LANCZOS, "box": Image.Resampling.BOX}
_IDX_IMAGES, _IDX_LABELS = 2051, 2049  # idx magic numbers: ubyte data with 3 resp. 1 dimensions


@dataclass
class _Source:
    total: int
    labels: list[str] | None
    images: Iterator[tuple[Image.Image | None, int | None]]  # None image: skipped (already recorded)


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
) -> Manifest:
    """Write ``OUT/shard-NNNNNN.tar`` + ``OUT/manifest.json`` from ``source``; returns the manifest."""
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if image_format not in ("png", "jpeg"):
        raise ValueError(f"image_format must be 'png' or 'jpeg', got '{image_format}'")
    if resize_filter not in FILTERS:
        raise ValueError(f"resize_filter must be one of {sorted(FILTERS)}, got '{resize_filter}'")
    if resolution < 1 or samples_per_shard < 1 or not 1 <= jpeg_quality <= 100:
        raise ValueError("resolution and samples_per_shard must be >= 1 and jpeg_quality in 1..100")
    settings = {
        "source": source,
        "resolution": resolution,
        "channels": channels,
        "samples_per_shard": samples_per_shard,
        "image_format": image_format,
        "jpeg_quality": jpeg_quality,
        "resize_filter": resize_filter,
        "flip_duplicate": flip_duplicate,
    }
    skipped: list[SkippedInput] = []
    src = _open_source(source, skipped)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    # An old manifest would describe a mix of old and new shards if this run dies half-way.
    (out_dir / MANIFEST_NAME).unlink(missing_ok=True)

    mode, ext = ("L" if channels == 1 else "RGB"), ("png" if image_format == "png" else "jpg")
    shards = _ShardSink(out_dir, samples_per_shard)
    for image, label in tqdm(src.images, total=src.total, desc="prepare", unit="img", disable=not progress):
        if image is None:
            continue
        image = _square(image.convert(mode), resolution, FILTERS[resize_filter])
        for variant in (image, ImageOps.mirror(image)) if flip_duplicate else (image,):
            sample = {"__key__": f"{shards.count:09d}", ext: _encode(variant, image_format, jpeg_quality)}
            if src.labels is not None:
                sample["cls"] = label
            shards.write(sample)
    written = shards.close()
    if not written:
        raise ValueError(f"{source}: no usable images ({len(skipped)} inputs skipped)")
    for stale in set(out_dir.glob("shard-*.tar")) - {out_dir / s.name for s in written}:
        stale.unlink()  # left over from an earlier, larger run into the same directory

    manifest = Manifest(
        num_samples=sum(s.num_samples for s in written),
        resolution=resolution,
        channels=channels,
        image_format=image_format,
        labels=src.labels,
        shards=written,
        skipped=skipped,
        settings=settings,
    )
    write_manifest(manifest, out_dir)
    return manifest


def _square(image: Image.Image, size: int, resample: Image.Resampling) -> Image.Image:
    """Center-crop to a square, then resize to ``size`` x ``size``."""
    w, h = image.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    image = image.crop((left, top, left + side, top + side))
    return image if side == size else image.resize((size, size), resample)


def _encode(image: Image.Image, image_format: str, quality: int) -> bytes:
    buf = io.BytesIO()
    if image_format == "png":
        image.save(buf, "PNG")
    else:
        image.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


class _ShardSink:
    """Fills numbered shards; a shard gets its final name only once complete, so a crash leaves none half-written."""

    def __init__(self, out_dir: Path, per_shard: int) -> None:
        self.out_dir, self.per_shard = out_dir, per_shard
        self.count = 0  # samples written in total
        self.shards: list[ShardInfo] = []
        self._tar: TarWriter | None = None
        self._in_shard = 0

    def write(self, sample: dict) -> None:
        if self._tar is None:
            self._tar = TarWriter(str(self._tmp_path()), mtime=0)  # fixed mtime: reruns give identical shards
        self._tar.write(sample)
        self.count += 1
        self._in_shard += 1
        if self._in_shard == self.per_shard:
            self._finish()

    def close(self) -> list[ShardInfo]:
        if self._tar is not None:
            self._finish()
        return self.shards

    def _tmp_path(self) -> Path:
        return self.out_dir / f"shard-{len(self.shards):06d}.tar.tmp"

    def _finish(self) -> None:
        assert self._tar is not None
        self._tar.close()
        tmp = self._tmp_path()
        name = tmp.name.removesuffix(".tmp")
        size, digest = tmp.stat().st_size, _sha256(tmp)
        self.shards.append(ShardInfo(name=name, num_samples=self._in_shard, bytes=size, sha256=digest))
        _publish(tmp, self.out_dir / name)
        self._tar, self._in_shard = None, 0


def _publish(tmp: Path, final: Path) -> None:
    """Make a finished file visible under its final name (the one place to swap for object storage)."""
    os.replace(tmp, final)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


# ---- sources ---------------------------------------------------------------------------------------


def _open_source(source: str, skipped: list[SkippedInput]) -> _Source:
    if source == "sklearn:digits":
        return _digits()
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"source not found: {source}")
    if path.is_file() and _is_idx_images(path):
        return _mnist([path])
    if path.is_dir():
        idx = sorted(p for p in path.iterdir() if "images" in p.name and _is_idx_images(p))
        if idx:
            return _mnist([p for p in idx if not (p.suffix == ".gz" and p.with_suffix("") in idx)])
        return _folder(path, skipped)
    raise ValueError(f"{source}: not 'sklearn:digits', an MNIST idx images file, or a folder of images")


def _arrays(images: np.ndarray, labels: np.ndarray | None, classes: list[str] | None) -> _Source:
    def gen() -> Iterator[tuple[Image.Image, int | None]]:
        for i, pixels in enumerate(images):
            yield Image.fromarray(pixels), (int(labels[i]) if labels is not None else None)

    return _Source(total=len(images), labels=classes, images=gen())


def _digits() -> _Source:
    from sklearn.datasets import load_digits  # slow import, only this source needs it

    digits = load_digits()
    pixels = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)  # stored as 0..16
    return _arrays(pixels, digits.target, [str(d) for d in range(10)])


def _is_idx_images(path: Path) -> bool:
    return path.is_file() and path.name.endswith(("-idx3-ubyte", "-idx3-ubyte.gz"))


def _read_idx(path: Path, magic: int) -> np.ndarray:
    with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
        data = f.read()
    found = struct.unpack(">I", data[:4])[0] if len(data) >= 4 else None
    if found != magic:
        raise ValueError(f"{path}: not an idx file of the expected kind (magic {found}, want {magic})")
    ndim = magic & 0xFF
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says {shape} but holds {body.size} bytes of data")
    return body.reshape(shape)


def _mnist(image_files: list[Path]) -> _Source:
    """MNIST-style idx files; labels are used only when every images file has its labels file."""
    images, labels = [], []
    for path in image_files:
        images.append(_read_idx(path, _IDX_IMAGES))
        stem = path.name.removesuffix(".gz").replace("idx3-ubyte", "idx1-ubyte").replace("images", "labels")
        found = [p for p in (path.with_name(stem), path.with_name(stem + ".gz")) if p.is_file()]
        labels.append(_read_idx(found[0], _IDX_LABELS) if found else None)
        if labels[-1] is not None and len(labels[-1]) != len(images[-1]):
            raise ValueError(f"{found[0]}: {len(labels[-1])} labels for {len(images[-1])} images")
    if any(lab is None for lab in labels):
        return _arrays(np.concatenate(images), None, None)
    stacked = np.concatenate(labels)
    return _arrays(np.concatenate(images), stacked, [str(c) for c in range(int(stacked.max()) + 1)])


def _folder(root: Path, skipped: list[SkippedInput]) -> _Source:
    """Images anywhere under ``root``; classes are the first-level subfolders when every image has one."""
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise ValueError(f"{root}: no image files ({', '.join(IMAGE_SUFFIXES)}) found")
    parts = [p.relative_to(root).parts for p in files]
    classes = sorted({pp[0] for pp in parts}) if all(len(pp) > 1 for pp in parts) else None
    index = {name: i for i, name in enumerate(classes or [])}

    def gen() -> Iterator[tuple[Image.Image | None, int | None]]:
        for path, pp in zip(files, parts, strict=True):
            label = index.get(pp[0])
            reason = "empty file" if path.stat().st_size == 0 else None
            if reason is None:
                try:
                    with Image.open(path) as im:
                        im.load()  # decode now: truncated files fail here, not later
                        image = ImageOps.exif_transpose(im)  # camera photos store rotation in EXIF
                except UnidentifiedImageError:
                    reason = "not an image format PIL can read"
                except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
                    reason = f"{type(exc).__name__}: {exc}"
            if reason is not None:
                skipped.append(SkippedInput(path=str(path.relative_to(root)), reason=reason))
                yield None, label
            else:
                yield image, label

    return _Source(total=len(files), labels=classes, images=gen())

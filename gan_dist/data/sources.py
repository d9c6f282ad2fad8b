"""Image sources for ``prepare``: scikit-learn digits, MNIST idx files, StackedMNIST, or a folder tree of images.

A source is a numbered list of inputs; ``load(i)`` reads input ``i`` on demand, so worker processes can each
take their own slice without the dataset ever being in memory at once (the small array sources are).
Class labels: MNIST label files, folder names (first-level subfolders), or a CSV of ``filename,label``.
StackedMNIST (Metz et al. 2017's mode-collapse benchmark) is composed on demand from the MNIST digits.
"""

from __future__ import annotations

import csv
import gzip
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from gan_dist.data.manifest import SkippedInput

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
_IDX_IMAGES, _IDX_LABELS = 2051, 2049  # idx magic numbers: ubyte data with 3 resp. 1 dimensions
STACKED_MNIST = "stacked-mnist:"
STACKED_DEFAULT_SAMPLES = 60_000
_STACKED_COUNT = re.compile(r"\?samples=(\d+)$")  # stacked-mnist:SRC?samples=N

Loaded = tuple[Image.Image | None, int | None, SkippedInput | None]  # image (None: skipped), label, why skipped


@dataclass
class ArraySource:
    """Images already in memory (digits, MNIST)."""

    images: np.ndarray
    targets: np.ndarray | None
    labels: list[str] | None

    @property
    def total(self) -> int:
        return len(self.images)

    def load(self, index: int) -> Loaded:
        label = int(self.targets[index]) if self.targets is not None else None
        return Image.fromarray(self.images[index]), label, None


@dataclass
class FolderSource:
    """Image files under ``root``, read (and checked) one at a time."""

    root: Path
    files: list[str]  # relative to root, sorted
    targets: list[int | None]
    labels: list[str] | None

    @property
    def total(self) -> int:
        return len(self.files)

    def load(self, index: int) -> Loaded:
        rel, label = self.files[index], self.targets[index]
        path = self.root / rel
        if label is None and self.labels is not None:
            return None, None, SkippedInput(path=rel, reason="no label in labels_csv")
        if path.stat().st_size == 0:
            return None, label, SkippedInput(path=rel, reason="empty file")
        try:
            with Image.open(path) as im:
                im.load()  # decode now: truncated files fail here, not later
                return ImageOps.exif_transpose(im), label, None  # camera photos store rotation in EXIF
        except UnidentifiedImageError:
            reason = "not an image format PIL can read"
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            reason = f"{type(exc).__name__}: {exc}"
        return None, label, SkippedInput(path=rel, reason=reason)


@dataclass
class StackedSource:
    """StackedMNIST: three MNIST digits as the R, G and B channels; class ``100·d_R + 10·d_G + d_B``."""

    digits: np.ndarray  # [M, H, W] uint8
    digit_labels: np.ndarray  # [M]
    picks: np.ndarray  # [N, 3]: the digits (indices) of each sample's R, G and B channel
    labels: list[str]

    @property
    def total(self) -> int:
        return len(self.picks)

    def load(self, index: int) -> Loaded:
        chosen = self.picks[index]
        label = int(self.digit_labels[chosen].astype(np.int64) @ np.array([100, 10, 1]))
        return Image.fromarray(np.ascontiguousarray(np.moveaxis(self.digits[chosen], 0, -1)), "RGB"), label, None


Source = ArraySource | FolderSource | StackedSource


def open_source(source: str, labels_csv: str | None = None, seed: int = 0) -> Source:
    """``sklearn:digits``, an MNIST idx images file (or a folder holding them), ``stacked-mnist:SRC[?samples=N]``
    (StackedMNIST from the MNIST files at SRC, drawn with ``seed``), or a folder of images."""
    stacked = source.startswith(STACKED_MNIST)
    if labels_csv is not None and (stacked or source == "sklearn:digits" or _idx_files(Path(source))):
        raise ValueError("labels_csv applies to folder sources only (digits and MNIST carry their own labels)")
    if source == "sklearn:digits":
        return _digits()
    if stacked:
        return _stacked_mnist(source.removeprefix(STACKED_MNIST), seed)
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"source not found: {source}")
    idx = _idx_files(path)
    if idx:
        return _mnist(idx)
    if path.is_dir():
        return _folder(path, Path(labels_csv) if labels_csv else None)
    raise ValueError(f"{source}: not 'sklearn:digits', an MNIST idx images file, or a folder of images")


def _digits() -> ArraySource:
    from sklearn.datasets import load_digits  # slow import, only this source needs it

    digits = load_digits()
    pixels = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)  # stored as 0..16
    return ArraySource(pixels, digits.target, [str(d) for d in range(10)])


def _is_idx_images(path: Path) -> bool:
    return path.is_file() and path.name.endswith(("-idx3-ubyte", "-idx3-ubyte.gz"))


def _idx_files(path: Path) -> list[Path]:
    """MNIST idx image files at ``path`` (a file or a folder); an unpacked copy wins over its .gz."""
    if _is_idx_images(path):
        return [path]
    if not path.is_dir():
        return []
    idx = sorted(p for p in path.iterdir() if "images" in p.name and _is_idx_images(p))
    return [p for p in idx if not (p.suffix == ".gz" and p.with_suffix("") in idx)]


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


def _mnist(image_files: list[Path]) -> ArraySource:
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
        return ArraySource(np.concatenate(images), None, None)
    stacked = np.concatenate(labels)
    return ArraySource(np.concatenate(images), stacked, [str(c) for c in range(int(stacked.max()) + 1)])


def _stacked_mnist(spec: str, seed: int) -> StackedSource:
    """``SRC[?samples=N]``: N samples (default 60,000), each channel an MNIST digit drawn uniformly and
    independently (with replacement) from every labelled digit at SRC, train and test files alike."""
    count = _STACKED_COUNT.search(spec)
    idx = _idx_files(Path(spec[: count.start()] if count else spec))
    mnist = _mnist(idx) if idx else None
    if mnist is None or mnist.targets is None or mnist.targets.max() > 9:
        raise ValueError(f"{STACKED_MNIST}{spec}: SRC must hold MNIST idx images files with their labels files")
    samples = int(count.group(1)) if count else STACKED_DEFAULT_SAMPLES
    if samples < 1:
        raise ValueError(f"{STACKED_MNIST}{spec}: samples must be >= 1")
    picks = np.random.default_rng((seed, 3)).integers(len(mnist.images), size=(samples, 3))  # not the shuffle's stream
    return StackedSource(mnist.images, mnist.targets, picks, [f"{mode:03d}" for mode in range(1000)])


def _folder(root: Path, labels_csv: Path | None) -> FolderSource:
    """Images anywhere under ``root``; classes from the CSV, else first-level subfolders when all have one."""
    found = (p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    files = sorted(p.relative_to(root).as_posix() for p in found)
    if not files:
        raise ValueError(f"{root}: no image files ({', '.join(IMAGE_SUFFIXES)}) found")
    if labels_csv is not None:
        by_file = _read_labels_csv(labels_csv)
        classes = sorted(set(by_file.values()))
        index = {name: i for i, name in enumerate(classes)}
        return FolderSource(root, files, [index[by_file[f]] if f in by_file else None for f in files], classes)
    firsts = [f.split("/")[0] if "/" in f else None for f in files]
    classes = sorted(set(firsts)) if None not in firsts else None  # type: ignore[type-var]
    index = {name: i for i, name in enumerate(classes or [])}
    return FolderSource(root, files, [index.get(f) if f else None for f in firsts], classes)


def _read_labels_csv(path: Path) -> dict[str, str]:
    """``filename,label`` rows (an optional header row is recognised); filenames relative to the source folder."""
    with open(path, newline="") as f:
        rows = [row for row in csv.reader(f) if row and any(cell.strip() for cell in row)]
    if rows and [c.strip().lower() for c in rows[0][:2]] == ["filename", "label"]:
        rows = rows[1:]
    bad = [i for i, row in enumerate(rows) if len(row) < 2 or not row[0].strip() or not row[1].strip()]
    if bad:
        raise ValueError(f"{path}: row {bad[0] + 1} is not 'filename,label'")
    return {Path(row[0].strip()).as_posix(): row[1].strip() for row in rows}

"""A seeded, evenly spread subset of a dataset's images (and labels), read straight from its shards.

Used for real-image statistics and for training the classifier extractor: not the first N images, because
folder sources store images grouped by class. Split into contiguous shares per rank for sharded work.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np
import torch
from webdataset.tariterators import group_by_keys, tar_file_expander

from gan_dist.data.loader import decode_image
from gan_dist.data.manifest import MANIFEST_NAME, Manifest
from gan_dist.data.shards import list_shards
from gan_dist.storage import StorageConfig, join, open_stream, read_bytes

log = logging.getLogger(__name__)


def dataset_manifest(shards: list[str], storage: StorageConfig) -> tuple[str | None, Manifest | None]:
    """The manifest next to the shards (raw text and parsed), if it describes exactly these shards."""
    try:
        text = read_bytes(join(shards[0].rsplit("/", 1)[0], MANIFEST_NAME), storage).decode()
        manifest = Manifest.model_validate_json(text)
    except (OSError, ValueError):  # none (or unreadable): fall back to reading the shards in order
        return None, None
    if [s.name for s in manifest.shards] != [s.rsplit("/", 1)[-1] for s in shards]:
        return None, None  # a brace pattern picking some of the shards: per-shard counts do not apply
    return text, manifest


def _selection(manifest: Manifest | None, num_images: int) -> torch.Tensor | None:
    """Sorted global indices of the images to use: a seeded uniform sample, not the first N, because
    folder sources store images grouped by class. None: no manifest, take the first ``num_images``."""
    if manifest is None or num_images >= manifest.num_samples:
        return None
    return torch.randperm(manifest.num_samples, generator=torch.Generator().manual_seed(0))[:num_images].sort()[0]


def read_images(
    data_url: str,
    storage: StorageConfig,
    resolution: int,
    channels: int,
    num_images: int,
    labels: bool = False,
    rank: int = 0,
    world: int = 1,
) -> Iterator[tuple[torch.Tensor, int | None]]:
    """``(uint8 [C, R, R] image, class label or None)`` for this rank's contiguous share of the dataset
    sample of ``num_images`` (fewer when the dataset is smaller). Unreadable samples and shards are
    skipped with a warning, as the training loader does: a bad file must not stop training."""
    shards = list_shards(data_url, storage)
    _, manifest = dataset_manifest(shards, storage)
    if manifest is not None and manifest.resolution != resolution:
        raise ValueError(f"{data_url} holds {manifest.resolution}px images, but {resolution}px were asked for")
    chosen = _selection(manifest, num_images)
    total = min(num_images, manifest.num_samples) if manifest is not None else num_images
    lo, hi = total * rank // world, total * (rank + 1) // world
    wanted = set(chosen[lo:hi].tolist()) if chosen is not None else set(range(lo, hi))
    starts = np.cumsum([0, *(s.num_samples for s in manifest.shards)]).tolist() if manifest is not None else None
    mode = "L" if channels == 1 else "RGB"
    errors: list[Exception] = []

    def keep_going(exn: Exception) -> bool:
        errors.append(exn)
        return True

    index, left = 0, len(wanted)
    for i, url in enumerate(shards):
        if left == 0:
            break
        if starts is not None:
            index = starts[i]  # from the manifest, so a damaged shard cannot shift the indices after it
            if not wanted.intersection(range(starts[i], starts[i + 1])):
                continue  # none of ours in this shard: do not even open it
        with open_stream(url, storage) as stream:
            files = tar_file_expander([{"url": url, "stream": stream}], handler=keep_going)
            for sample in group_by_keys(files, handler=keep_going):
                index += 1
                if index - 1 not in wanted:
                    continue
                left -= 1
                image = decode_image(sample, mode, resolution)
                if image is None:
                    errors.append(ValueError(f"{sample['__url__']}: no decodable image in {sample['__key__']}"))
                else:
                    yield image, int(sample["cls"]) if labels and "cls" in sample else None
                if left == 0:
                    break
            else:  # read to the end: a truncated tar just ends early, only the manifest tells
                if starts is not None and index < starts[i + 1]:
                    errors.append(ValueError(f"{url}: {index - starts[i]} samples, the manifest lists "
                                             f"{starts[i + 1] - starts[i]}"))
    if errors:
        log.warning("%s: skipped %d unreadable samples/shards (first: %s)", data_url, len(errors), errors[0])

"""``gan-dist inspect``: a dataset's manifest in words, and a grid of its first samples as a PNG."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import torch

from gan_dist.storage import StorageConfig
from gan_dist.data.images import image_grid
from gan_dist.data.loader import decode_image
from gan_dist.data.manifest import MANIFEST_NAME, Manifest, read_manifest
from gan_dist.data.shards import dataset_base, list_shards, read_shard


def _summary(url: str, m: Manifest) -> list[str]:
    sizes = [s.num_samples for s in m.shards]
    megabytes = sum(s.bytes for s in m.shards) / 1e6
    lines = [
        f"dataset      {url}",
        f"samples      {m.num_samples} in {len(m.shards)} shards "
        f"({min(sizes)}..{max(sizes)} per shard, {megabytes:.1f} MB)",
        f"images       {m.resolution}x{m.resolution}, {m.channels} channel(s), {m.image_format}",
    ]
    lines += _classes(m)
    lines.append(f"skipped      {len(m.skipped)} input(s) at prepare time")
    lines += [f"  {s.path}: {s.reason}" for s in m.skipped[:5]]
    if len(m.skipped) > 5:
        lines.append(f"  ... {len(m.skipped) - 5} more in {MANIFEST_NAME}")
    settings = ", ".join(f"{k}={v}" for k, v in m.settings.items() if k != "source")
    lines += [f"source       {m.settings.get('source', '?')}", f"settings     {settings}", f"created      {m.created}"]
    return lines


def _classes(m: Manifest, shown: int = 20) -> list[str]:
    """Class names, with their sample counts when the manifest has them (prepared with per-sample labels)."""
    if not m.labels:
        return ["labels       none"]
    if m.class_counts is None:
        names = ", ".join(m.labels[:shown]) + (", ..." if len(m.labels) > shown else "")
        return [f"labels       {len(m.labels)} classes: {names}"]
    lines = [f"labels       {len(m.labels)} classes, {min(m.class_counts)}..{max(m.class_counts)} samples each"]
    lines += [f"  {name}: {count}" for name, count in zip(m.labels[:shown], m.class_counts)]
    if len(m.labels) > shown:
        lines.append(f"  ... {len(m.labels) - shown} more in {MANIFEST_NAME}")
    return lines


def _images(shards: list[str], storage: StorageConfig, mode: str, resolution: int) -> Iterator[torch.Tensor]:
    for url in shards:
        for sample in read_shard(url, storage):
            image = decode_image(sample, mode, resolution)
            if image is not None:
                yield image


def inspect_dataset(url: str, storage: StorageConfig, grid_path: str | None, num: int = 64) -> str:
    """A human-readable summary of the dataset at ``url``; with ``grid_path``, also a PNG grid of ``num`` samples."""
    manifest = read_manifest(dataset_base(url), storage)
    if manifest is None:
        raise ValueError(f"{url}: no {MANIFEST_NAME} here or next to the shards; is it a prepared dataset?")
    lines = _summary(url, manifest)
    if grid_path is not None:
        mode = "L" if manifest.channels == 1 else "RGB"
        images = list(itertools.islice(_images(list_shards(url, storage), storage, mode, manifest.resolution), num))
        if not images:
            raise ValueError(f"{url}: no decodable image found for the grid")
        image_grid(torch.stack(images)).save(grid_path)
        lines.append(f"grid         {len(images)} samples -> {grid_path}")
    return "\n".join(lines)

"""Per-rank streaming loader: each (rank, DataLoader worker) reads its own disjoint set of shards.

The stream is endless: every worker walks epochs 0, 1, 2, ... with a shard order and a sample shuffle
that depend only on (seed, epoch, rank, worker), so a run's data order is reproducible.
"""

from __future__ import annotations

import io
import itertools
import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from braceexpand import braceexpand
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from gan_dist.config import GanConfig
from gan_dist.data.manifest import read_manifest

_IMAGE_KEYS = ("png", "jpg", "jpeg")


def list_shards(url: str) -> list[str]:
    """Shard paths/URLs of a dataset directory (manifest order), a brace pattern, or a single .tar."""
    if "{" in url:
        shards = list(braceexpand(url))
        missing = [] if "://" in url else [s for s in shards if not Path(s).is_file()]
        if missing:
            raise ValueError(f"{url}: {len(missing)} of {len(shards)} shards do not exist (first: {missing[0]})")
        return shards
    if "://" in url:
        if url.endswith(".tar"):
            return [url]
        raise ValueError(f"{url}: remote data needs a brace pattern like .../shard-{{000000..000009}}.tar")
    path = Path(url)
    if path.is_dir():
        manifest = read_manifest(path)
        if manifest is not None:
            return [str(path / s.name) for s in manifest.shards]
        shards = sorted(str(p) for p in path.glob("shard-*.tar"))
        if not shards:
            raise ValueError(f"{url}: no manifest.json or shard-*.tar files here; run `gan-dist prepare` first")
        return shards
    if path.suffix == ".tar" and path.is_file():
        return [str(path)]
    raise ValueError(f"{url}: not a shard directory, an existing .tar file or a brace pattern")


def assign_shards(
    shards: list[str], *, rank: int, world_size: int, worker: int, num_workers: int, epoch: int, seed: int
) -> list[str]:
    """This (rank, worker)'s shards for ``epoch``: disjoint from every other pair, reshuffled each epoch."""
    order = list(shards)
    random.Random(f"shards/{seed}/{epoch}").shuffle(order)  # str seed: same on every host and process
    return order[rank::world_size][worker::num_workers]


def check_sharding(num_shards: int, world_size: int, loader_workers: int) -> None:
    """Fail early when some (rank, loader worker) would get no shard and silently starve."""
    need = world_size * max(1, loader_workers)
    if num_shards < need:
        raise ValueError(
            f"data.url has {num_shards} shard(s) but scaling.num_workers={world_size} x "
            f"data.loader_workers={loader_workers} needs at least {need}, one per loader worker; "
            "re-run prepare with a smaller samples_per_shard or lower data.loader_workers"
        )


class ShardStream(IterableDataset):
    """Endless ``(batch, worker id, skipped so far)`` tuples for one rank, batched inside the worker."""

    def __init__(self, shards: list[str], cfg: GanConfig, rank: int, world_size: int) -> None:
        super().__init__()
        self.shards, self.rank, self.world_size = shards, rank, world_size
        self.seed = cfg.train.seed
        self.batch_size = cfg.per_worker_batch()
        self.mode = "L" if cfg.data.channels == 1 else "RGB"
        self.resolution = cfg.data.resolution
        self.shuffle_buffer = cfg.data.shuffle_buffer
        self.random_flip = cfg.data.random_flip

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int, int]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        skipped = 0

        def skip(exn: Exception) -> bool:  # webdataset's warn_and_continue sleeps 0.5 s per error
            nonlocal skipped
            skipped += 1
            return True

        batch: list[torch.Tensor] = []  # carried over epochs, so tiny shards still fill batches
        for epoch in itertools.count():
            mine = assign_shards(
                self.shards,
                rank=self.rank,
                world_size=self.world_size,
                worker=worker,
                num_workers=num_workers,
                epoch=epoch,
                seed=self.seed,
            )
            tag = f"{self.seed}/{epoch}/{self.rank}/{worker}"
            stages = [wds.SimpleShardList(mine), wds.tarfile_to_samples(handler=skip)]
            if self.shuffle_buffer > 0:
                stages.append(wds.shuffle(self.shuffle_buffer, self.shuffle_buffer, rng=random.Random("mix/" + tag)))
            flips = random.Random("flip/" + tag)
            decoded = 0
            for sample in wds.DataPipeline(*stages):
                image = self._decode(sample)
                if image is None:
                    skipped += 1
                    continue
                decoded += 1
                if self.random_flip and flips.random() < 0.5:
                    image = image.flip(-1)
                batch.append(image)
                if len(batch) == self.batch_size:
                    yield torch.stack(batch), worker, skipped
                    batch = []
            if decoded == 0:
                raise RuntimeError(f"rank {self.rank} loader worker {worker}: no readable sample in shards {mine}")

    def _decode(self, sample: dict) -> torch.Tensor | None:
        """uint8 CHW tensor, or None when the sample holds no decodable image."""
        data = next((sample[k] for k in _IMAGE_KEYS if k in sample), None)
        if data is None:
            return None
        try:
            with Image.open(io.BytesIO(data)) as im:
                image = im.convert(self.mode)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
            return None
        if image.size != (self.resolution, self.resolution):
            w, h = image.size
            raise ValueError(
                f"{sample.get('__url__')}: stored images are {w}x{h} but data.resolution={self.resolution}; "
                "set data.resolution to match or re-run prepare at that resolution"
            )
        pixels = torch.from_numpy(np.array(image))
        return pixels.unsqueeze(0) if pixels.ndim == 2 else pixels.permute(2, 0, 1)


class BatchIterator(Iterator[torch.Tensor]):
    """Endless uint8 batches; ``skipped`` counts the unreadable shards and samples met so far."""

    def __init__(self, loader: DataLoader) -> None:
        self._batches = iter(loader)
        self._skipped: dict[int, int] = {}  # per loader worker: each reports its own running total

    def __next__(self) -> torch.Tensor:
        batch, worker, skipped = next(self._batches)
        self._skipped[int(worker)] = int(skipped)
        return batch

    @property
    def skipped(self) -> int:
        return sum(self._skipped.values())


def build_loader(cfg: GanConfig, rank: int, world_size: int) -> BatchIterator:
    """Endless uint8 batches ``[per_worker_batch, channels, R, R]`` for ``rank`` of ``world_size``."""
    shards = list_shards(cfg.data.url)
    check_sharding(len(shards), world_size, cfg.data.loader_workers)
    manifest = read_manifest(cfg.data.url)
    if manifest is not None and manifest.resolution != cfg.data.resolution:
        raise ValueError(
            f"{cfg.data.url} holds {manifest.resolution}px images but data.resolution={cfg.data.resolution}"
        )
    workers = cfg.data.loader_workers
    loader = DataLoader(
        ShardStream(shards, cfg, rank, world_size),
        batch_size=None,  # batched inside the workers
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=torch.cuda.is_available(),
    )
    return BatchIterator(loader)


def to_float(batch: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """uint8 images -> float in [-1, 1] on ``device`` (the copy overlaps compute when memory is pinned)."""
    return batch.to(device, non_blocking=True).float().div_(127.5).sub_(1.0)

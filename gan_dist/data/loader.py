"""Per-rank streaming loader: endless uint8 batches, identical for identical (seed, epoch, rank, worker).

The stream of a rank is numbered: batch ``n`` belongs to epoch ``n // batches_per_epoch`` and comes from
loader worker ``n % W`` (DataLoader takes batches from its workers round-robin). Each worker knows, for
every epoch, how many batches it owes and which samples make them:

- ``exact``: the epoch's shards are split disjointly across ranks x workers; a worker reads its shards in
  order (wrapping around them if it owes more samples than they hold, stopping early if fewer).
- ``resampled``: a worker draws shards with replacement from a seeded RNG until it has what it owes.

A sample's position in that stream does not depend on decoding: an undecodable image keeps its slot and is
replaced by another image of the same batch. That is what makes resuming cheap and exact: ``start_batch``
skips whole epochs by arithmetic and the rest by reading (not decoding) samples.

Skip counting: a sample the manifest promises but the worker cannot deliver (undecodable image, or lost in
a damaged/missing shard) is counted once per epoch in which it is met. Re-reading a shard in the same epoch
(exact-mode wrap-around, resampled redraws) does not count again; a part the epoch never reaches is not
counted. ``BatchIterator.skipped`` is the rank's running total since the loader started (since
``start_batch`` after a resume).

Decode cache (``data.decode_cache_mb``): a worker memoises decoded images by (shard, key) up to its byte
budget. Shards are still read, so the stream, its order and its skip counts are exactly those without it;
only the decoding of an image met again in a later epoch is saved.
"""

from __future__ import annotations

import io
import itertools
import random
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from gan_dist.config import GanConfig
from gan_dist.data.shards import DataPlan, assign_shards, check_sharding, list_shards, plan_data, read_shard

__all__ = ["BatchIterator", "build_loader", "check_sharding", "decode_image", "list_shards", "to_float"]

IMAGE_KEYS = ("png", "jpg", "jpeg")


def _pixels(sample: dict[str, Any], mode: str, resolution: int) -> np.ndarray | None:
    """uint8 CHW array of a sample's image (a transposed view for RGB), or None when it has no decodable one."""
    data = next((sample[k] for k in IMAGE_KEYS if k in sample), None)
    if data is None:
        return None
    try:
        with Image.open(io.BytesIO(data)) as im:
            image = im.convert(mode)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return None
    if image.size != (resolution, resolution):
        w, h = image.size
        raise ValueError(
            f"{sample.get('__url__')}: stored images are {w}x{h} but data.resolution={resolution}; "
            "set data.resolution to match or re-run prepare at that resolution"
        )
    pixels = np.asarray(image)
    return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)


def decode_image(sample: dict[str, Any], mode: str, resolution: int) -> torch.Tensor | None:
    """uint8 CHW tensor of a sample's image, or None when it holds no decodable one.

    A decodable image of the wrong size is a configuration error, not damage: it raises ValueError.
    """
    pixels = _pixels(sample, mode, resolution)
    return None if pixels is None else torch.from_numpy(np.ascontiguousarray(pixels))


def _count_below(limit: int, worker: int, num_workers: int) -> int:
    """How many batch numbers n in [0, limit) belong to ``worker`` (n % num_workers == worker)."""
    return (limit - worker + num_workers - 1) // num_workers


class _Tally:
    """Skipped samples of one loader worker, and which shards already counted theirs this epoch."""

    def __init__(self) -> None:
        self.skipped = 0
        self.counted: set[int] = set()


class ShardStream(IterableDataset):
    """Endless ``(batch, keys, worker, skipped so far)`` tuples for one rank, batched inside the worker."""

    def __init__(self, plan: DataPlan, cfg: GanConfig, rank: int, world_size: int, start_batch: int = 0) -> None:
        super().__init__()
        self.plan, self.rank, self.world_size, self.start_batch = plan, rank, world_size, start_batch
        self.seed, self.mode, self.storage = cfg.train.seed, cfg.data.mode, cfg.storage
        self.batch_size = cfg.per_worker_batch()
        self.image_mode = "L" if cfg.data.channels == 1 else "RGB"
        self.resolution = cfg.data.resolution
        self.shuffle_buffer = cfg.data.shuffle_buffer
        self.random_flip = cfg.data.random_flip
        # Each DataLoader worker process gets its own copy of this stream, so each has its own cache.
        self.decoded: dict[tuple[str, str], np.ndarray | None] = {}
        self.cache_room = int(cfg.data.decode_cache_mb * 2**20)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, list[str], int, int]]:
        info = get_worker_info()
        dl_worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # DataLoader always starts with its worker 0; after a resume at batch s that batch belongs to stream
        # worker s % W, so DataLoader worker i plays stream worker (i + s) % W.
        worker = (dl_worker + self.start_batch) % num_workers
        per_epoch, tally = self.plan.batches_per_epoch, _Tally()
        first = self.start_batch + (worker - self.start_batch) % num_workers  # this worker's first batch number
        for epoch in itertools.count(first // per_epoch):
            # This worker's batches of the epoch are its numbers begin..end-1 (counted over its own batches).
            begin = _count_below(epoch * per_epoch, worker, num_workers)
            end = _count_below((epoch + 1) * per_epoch, worker, num_workers)
            done = _count_below(max(first, epoch * per_epoch), worker, num_workers)
            yield from self._epoch(epoch, worker, num_workers, done - begin, end - begin, tally)

    def _epoch(
        self, epoch: int, worker: int, num_workers: int, skip: int, owed: int, tally: _Tally
    ) -> Iterator[tuple[torch.Tensor, list[str], int, int]]:
        """Batches ``skip..owed-1`` of this worker's share of ``epoch``."""
        if skip >= owed:
            return
        tag = f"{self.seed}/{epoch}/{self.rank}/{worker}"
        tally.counted = set()
        samples = self._samples(epoch, worker, num_workers, tag, tally)
        b = self.batch_size
        for _ in itertools.islice(samples, skip * b):  # fast-forward: read, never decode
            pass
        if skip:
            tally.skipped = 0  # count from the resume point on
        for index in range(skip, owed):
            chunk = list(itertools.islice(samples, b))
            images, keys = self._decode_batch(chunk, tally, f"{tag}/{index}")
            yield images, keys, worker, tally.skipped

    def _samples(self, epoch: int, worker: int, num_workers: int, tag: str, tally: _Tally) -> Iterator[dict]:
        """This worker's raw samples for ``epoch``, shuffled, endless."""
        everything = range(len(self.plan.shards))
        if self.mode == "resampled":
            draw = random.Random("draw/" + tag)
            draws = (draw.choice(everything) for _ in itertools.count())
            return self._shuffled(self._read(draws, everything, tally), tag)
        mine = assign_shards(
            list(everything),
            rank=self.rank,
            world_size=self.world_size,
            worker=worker,
            num_workers=num_workers,
            epoch=epoch,
            seed=self.seed,
        )
        # One pass over the worker's shards after another, each shuffled on its own: the buffer must not pull
        # the next pass's repeats in while this pass still has unseen samples.
        passes = (self._shuffled(self._read(mine, mine, tally), f"{tag}/{p}") for p in itertools.count())
        return itertools.chain.from_iterable(passes)

    def _shuffled(self, samples: Iterator[dict], tag: str) -> Iterator[dict]:
        if self.shuffle_buffer == 0:
            return samples
        return wds.shuffle(self.shuffle_buffer, self.shuffle_buffer, rng=random.Random("mix/" + tag))(samples)

    def _read(self, order: Iterable[int], candidates: Sequence[int], tally: _Tally) -> Iterator[dict]:
        """Samples of the shards in ``order``, tagged ``__first__`` on the epoch's first read of their shard."""
        empty: set[int] = set()
        for i in order:
            first = i not in tally.counted
            tally.counted.add(i)
            seen = 0
            for sample in read_shard(self.plan.shards[i], self.storage):
                seen += 1
                sample["__first__"] = first
                yield sample
            if first:
                tally.skipped += max(0, self.plan.counts[i] - seen)  # lost to damage or a missing object
            if seen == 0:
                empty.add(i)
                if empty.issuperset(candidates):
                    names = [self.plan.shards[j] for j in candidates]
                    raise RuntimeError(f"rank {self.rank}: no readable sample in any of {names}")

    def _decode(self, sample: dict[str, Any]) -> np.ndarray | None:
        """A sample's pixels (read-only: batches copy them), from the decode cache when it holds them."""
        key = (sample["__url__"], sample["__key__"])
        if key in self.decoded:
            return self.decoded[key]
        pixels = _pixels(sample, self.image_mode, self.resolution)
        size = 0 if pixels is None else pixels.nbytes
        if size <= self.cache_room and self.cache_room > 0:
            self.decoded[key] = pixels
            self.cache_room -= size
        return pixels

    def _decode_batch(self, chunk: list[dict], tally: _Tally, tag: str) -> tuple[torch.Tensor, list[str]]:
        """Decode one batch; an undecodable image's slot gets a copy of another image of the batch."""
        decoded = [self._decode(s) for s in chunk]
        good = [i for i, image in enumerate(decoded) if image is not None]
        tally.skipped += sum(1 for s, image in zip(chunk, decoded) if image is None and s["__first__"])
        if not good:
            urls = sorted({s["__url__"] for s in chunk})
            raise RuntimeError(f"all {len(chunk)} images of a batch are undecodable (from {urls}): the data is damaged")
        fill = itertools.cycle(good)
        source = [i if image is not None else next(fill) for i, image in enumerate(decoded)]
        flips = random.Random("flip/" + tag) if self.random_flip else None
        images = [decoded[i][..., ::-1] if flips is not None and flips.random() < 0.5 else decoded[i] for i in source]
        keys = [f"{chunk[i]['__url__'].rsplit('/', 1)[-1]}/{chunk[i]['__key__']}" for i in source]
        # One numpy copy into a contiguous batch (torch.stack of transposed views is a slow strided copy).
        batch = np.empty((len(images), *images[0].shape), dtype=np.uint8)
        for k, image in enumerate(images):
            batch[k] = image
        return torch.from_numpy(batch), keys


class BatchIterator(Iterator[torch.Tensor]):
    """Endless uint8 batches; ``skipped`` counts undeliverable samples, ``keys`` names the last batch's."""

    def __init__(self, loader: DataLoader) -> None:
        self._batches = iter(loader)
        self._skipped: dict[int, int] = {}  # per loader worker: each reports its own running total
        self.keys: list[str] = []  # "shard-000003.tar/000001500" for each image of the last batch

    def __next__(self) -> torch.Tensor:
        batch, keys, worker, skipped = next(self._batches)
        self._skipped[int(worker)] = int(skipped)
        self.keys = list(keys)
        return batch

    @property
    def skipped(self) -> int:
        return sum(self._skipped.values())


def build_loader(cfg: GanConfig, rank: int, world_size: int, start_batch: int = 0) -> BatchIterator:
    """Endless uint8 batches ``[per_worker_batch, channels, R, R]`` for ``rank`` of ``world_size``.

    ``start_batch``: batches this rank already consumed (e.g. restored from a checkpoint); the iterator
    continues exactly where an uninterrupted one would be.
    """
    if start_batch < 0:
        raise ValueError(f"start_batch must be >= 0, got {start_batch}")
    plan = plan_data(cfg, world_size)
    workers = cfg.data.loader_workers
    loader = DataLoader(
        ShardStream(plan, cfg, rank, world_size, start_batch),
        batch_size=None,  # batched inside the workers
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=torch.cuda.is_available(),
    )
    return BatchIterator(loader)


def to_float(batch: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """uint8 images -> float in [-1, 1] on ``device`` (the copy overlaps compute when memory is pinned)."""
    return batch.to(device, non_blocking=True).float().div_(127.5).sub_(1.0)

"""Per-rank streaming loader: delivers the data plan (``gan_dist.data.plan``) as endless uint8 batches.

Rank ``r`` of ``W`` gets batches of ``B = G / W`` images. Its stream worker ``k`` of ``K`` (DataLoader worker
processes, or one in-process stream when ``data.loader_workers=0``) serves the rank's batches ``n`` with
``n % K == k``, counted from the start of the current layout's stretch; DataLoader takes batches from its
workers round-robin, so DataLoader worker ``i`` plays the stream worker whose turn its ``i``-th batch is.

A worker knows its block of ids and their emission order from the plan alone. It reads the block's shards
in read order (from the first id it still owes; the positions before it are read, never decoded), keeps the
samples read but not yet due (at most about ``data.shuffle_buffer`` of them), and emits them in the planned
order. What is delivered is therefore a function of (seed, epoch, layouts, rank, worker) and the data, never
of timing or of where a loader was (re)started.

Damage. An id whose sample cannot be delivered (undecodable image, missing label, a shard that is missing or
ends early) keeps its slot: the batch fills it with another of its own images, or, when none of them is
deliverable, with the stream's next deliverable image (which is still handed out in its own turn too): so
what fills a slot depends on the data only, never on where a loader started. ``BatchIterator.skipped``
counts such slots since the loader started: in exact mode each undeliverable used sample once per epoch.

Decode cache (``data.decode_cache_mb``): a worker keeps decoded images by global id up to its byte budget.
Cached ids are not read again; the stream and its skip counts are exactly those without the cache.
"""

from __future__ import annotations

import io
import itertools
import multiprocessing
import multiprocessing.forkserver
import random
from collections import deque
from collections.abc import Iterator
from contextlib import closing
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from gan_dist.config import GanConfig
from gan_dist.data.plan import DataPlan, DataPosition, Layout, rank_batch, resume_layouts, worker_batches
from gan_dist.data.shards import plan_data, read_shard

__all__ = ["Batch", "BatchIterator", "build_loader", "decode_image", "to_float"]

IMAGE_KEYS = ("png", "jpg", "jpeg")


class Batch(NamedTuple):
    images: torch.Tensor  # uint8 [B, C, R, R]
    labels: torch.Tensor | None  # int64 [B] class indices, when the dataset is labelled


class _Image(NamedTuple):
    """A delivered sample: decoded pixels (CHW, read-only), its class and its name."""

    id: int
    pixels: np.ndarray
    label: int | None
    key: str  # "shard-000003.tar/000001500"


_Slot = tuple[int, _Image | None]  # (epoch, image or None when undeliverable)


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
    return None if pixels is None else torch.from_numpy(pixels.copy())


def _label(sample: dict[str, Any]) -> int | None:
    try:
        return int(sample["cls"])
    except (KeyError, ValueError):
        return None


class ShardStream(IterableDataset):
    """Endless ``(images, labels, keys, worker, skipped so far)`` for one rank, batched inside the worker."""

    def __init__(self, plan: DataPlan, cfg: GanConfig, rank: int, world: int, position: DataPosition) -> None:
        super().__init__()
        self.plan, self.rank, self.world, self.position = plan, rank, world, position
        self.workers = position.layouts[-1].workers
        self.batch_size = rank_batch(plan.batch_size, world, rank)
        self.storage, self.seed, self.random_flip = cfg.storage, cfg.train.seed, cfg.data.random_flip
        self.image_mode = "L" if cfg.data.channels == 1 else "RGB"
        self.resolution = cfg.data.resolution
        # Each DataLoader worker process gets its own copy of this stream, so each has its own cache and count.
        self.decoded: dict[int, _Image | None] = {}
        self.cache_room = int(cfg.data.decode_cache_mb * 2**20)
        self.skipped = 0

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor | None, list[str], int, int]]:
        info = get_worker_info()
        loader_worker = info.id if info is not None else 0
        slots = self._slots(loader_worker)
        ahead: deque[_Slot] = deque()  # slots looked at early, to fill a batch that has no deliverable image
        while True:
            batch = [ahead.popleft() if ahead else next(slots) for _ in range(self.batch_size)]
            yield self._batch(batch, slots, ahead) + (loader_worker, self.skipped)

    def _slots(self, loader_worker: int) -> Iterator[_Slot]:
        """This DataLoader worker's ``(epoch, image or None)`` in the order it hands them out, endless."""
        per_epoch, workers = self.plan.batches_per_epoch, self.workers
        epoch, step = divmod(self.position.batches, per_epoch)
        layouts, handed = self.position.layouts, 0  # handed: loader batches before this stretch
        while True:
            # Loader batch ``handed + j`` is the stretch's batch ``n = step - start + j``, served by stream
            # worker ``n % K``; DataLoader worker ``i`` hands out the loader batches ``i, i + K, ...``.
            n = step - layouts[-1].start
            worker = (loader_worker + n - handed) % workers
            owed = worker_batches(per_epoch - layouts[-1].start, worker, workers)
            done = worker_batches(n, worker, workers)
            images = self._stretch(epoch, layouts, worker, done, owed)
            yield from ((epoch, image) for image in images)
            handed += per_epoch - step
            epoch, step, layouts = epoch + 1, 0, (Layout(self.world, workers, 0),)

    def _stretch(
        self, epoch: int, layouts: tuple[Layout, ...], worker: int, done: int, owed: int
    ) -> Iterator[_Image | None]:
        """Images ``done*B .. owed*B - 1`` of stream ``worker``'s block under the last of ``layouts``, in
        emission order (None: undeliverable); samples read before they are due wait in ``held``."""
        ids, order = self.plan.stream(epoch, layouts, self.rank, worker)
        b = self.batch_size
        wanted = np.fromiter((i not in self.decoded for i in ids.tolist()), dtype=bool, count=len(ids))
        wanted[list(itertools.islice(order, done * b))] = False  # emitted before this loader started
        held: dict[int, dict[str, Any] | None] = {}
        with closing(self._read(ids, wanted)) as samples:
            for j in itertools.islice(order, (owed - done) * b):
                if not wanted[j]:  # cached when the stretch began
                    yield self.decoded[int(ids[j])]
                    continue
                while j not in held:
                    index, sample = next(samples)
                    held[index] = sample
                yield self._decode(int(ids[j]), held.pop(j))

    def _read(self, ids: np.ndarray, wanted: np.ndarray) -> Iterator[tuple[int, dict[str, Any] | None]]:
        """``(index, sample)`` for each wanted index of ``ids``, in order; None where its shard ends before it."""
        shard, position = self.plan.locate(ids)
        # A run is read in one pass over its shard: a new one starts where the shard changes or goes back.
        breaks = np.flatnonzero((np.diff(shard) != 0) | (np.diff(position) < 0)) + 1
        for run in np.split(np.arange(len(ids)), breaks):
            run = run[wanted[run]]
            if len(run):
                with closing(read_shard(self.plan.shards[shard[run[0]]], self.storage)) as samples:
                    at, sample = -1, None
                    for index, target in zip(run.tolist(), position[run].tolist()):
                        while at < target and (sample := next(samples, None)) is not None:
                            at += 1
                        yield index, sample if at == target else None

    def _decode(self, gid: int, sample: dict[str, Any] | None) -> _Image | None:
        """The sample's image, from the decode cache when it holds it; None when it cannot be delivered."""
        if gid in self.decoded:
            return self.decoded[gid]
        if sample is None:  # not in its shard: not cached, a later epoch tries again
            return None
        pixels = _pixels(sample, self.image_mode, self.resolution)
        label = _label(sample) if self.plan.labelled else None
        image = None
        if pixels is not None and (label is not None or not self.plan.labelled):
            image = _Image(gid, pixels, label, f"{sample['__url__'].rsplit('/', 1)[-1]}/{sample['__key__']}")
        size = 0 if image is None else pixels.nbytes
        if self.cache_room >= size and self.cache_room > 0:
            self.decoded[gid] = image
            self.cache_room -= size
        return image

    def _next_good(self, slots: Iterator[_Slot], ahead: deque[_Slot]) -> _Slot:
        """The stream's next deliverable image, looked at early (it is still handed out in its own turn)."""
        found = next((slot for slot in ahead if slot[1] is not None), None)
        while found is None and len(ahead) <= self.plan.num_samples:
            ahead.append(next(slots))
            found = ahead[-1] if ahead[-1][1] is not None else None
        if found is None:
            raise RuntimeError(f"rank {self.rank}: no deliverable image in a whole epoch's worth of the stream")
        return found

    def _batch(
        self, slots: list[_Slot], rest: Iterator[_Slot], ahead: deque[_Slot]
    ) -> tuple[torch.Tensor, torch.Tensor | None, list[str]]:
        """One batch; an undeliverable slot gets another image of the batch, or the stream's next one."""
        good = [slot for slot in slots if slot[1] is not None]
        self.skipped += len(slots) - len(good)
        fill = itertools.cycle(good or [self._next_good(rest, ahead)])
        chosen = [slot if slot[1] is not None else next(fill) for slot in slots]
        batch = np.empty((len(chosen), *chosen[0][1].pixels.shape), dtype=np.uint8)
        for k, (epoch, image) in enumerate(chosen):
            # A sample's flip depends on (seed, epoch, id) only: the same whatever the layout that delivers it.
            flip = self.random_flip and random.Random(f"flip/{self.seed}/{epoch}/{image.id}").random() < 0.5
            batch[k] = image.pixels[..., ::-1] if flip else image.pixels
        labels = torch.tensor([image.label for _, image in chosen]) if self.plan.labelled else None
        return torch.from_numpy(batch), labels, [image.key for _, image in chosen]


class BatchIterator(Iterator[Batch]):
    """Endless batches; ``skipped``: undeliverable samples met, ``position``: where to resume, ``keys``: names."""

    def __init__(self, loader: DataLoader, plan: DataPlan, start: DataPosition) -> None:
        self._batches = iter(loader)
        self._skipped: dict[int, int] = {}  # per DataLoader worker: each reports its own running total
        self.plan, self._start, self._served = plan, start, 0
        self.keys: list[str] = []  # "shard-000003.tar/000001500" for each image of the last batch

    def __next__(self) -> Batch:
        images, labels, keys, worker, skipped = next(self._batches)
        self._skipped[int(worker)] = int(skipped)
        self.keys = list(keys)
        self._served += 1
        return Batch(images, labels)

    @property
    def skipped(self) -> int:
        return sum(self._skipped.values())

    @property
    def position(self) -> DataPosition:
        """The data position after the batches handed out so far (same on every rank)."""
        batches, per_epoch = self._start.batches + self._served, self.plan.batches_per_epoch
        if batches // per_epoch == self._start.batches // per_epoch:
            return DataPosition(batches, self._start.layouts)
        current = self._start.layouts[-1]
        return DataPosition(batches, (Layout(current.world, current.workers, 0),))


def build_loader(cfg: GanConfig, rank: int, world_size: int, position: DataPosition | None = None) -> BatchIterator:
    """Endless ``Batch``es of ``rank_batch(train.batch_size, world_size, rank)`` images for ``rank`` of
    ``world_size`` (the global batch split as evenly as integers allow).

    ``position``: where the run stands (from a checkpoint); the loader continues the epoch from there, on any
    world size, and exactly as an uninterrupted run would when the world size and loader workers are unchanged.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
    plan = plan_data(cfg, world_size)
    workers = cfg.data.loader_workers
    start = position or DataPosition()
    start = DataPosition(start.batches, resume_layouts(start, plan.batches_per_epoch, world_size, max(1, workers)))
    loader = DataLoader(
        ShardStream(plan, cfg, rank, world_size, start),
        batch_size=None,  # batched inside the workers
        num_workers=workers,
        persistent_workers=workers > 0,
        multiprocessing_context=_worker_context() if workers else None,
        pin_memory=torch.cuda.is_available(),
        generator=torch.Generator().manual_seed(cfg.train.seed),  # not the global RNG: a resume restores that
    )
    return BatchIterator(loader, plan, start)


def start_worker_server(cfg: GanConfig) -> None:
    """Start the loader workers' forkserver now (it imports torch: seconds), so that it loads while the rank
    builds its models and reads its checkpoint instead of when the loader first asks for a worker."""
    if cfg.data.loader_workers:
        _worker_context()
        multiprocessing.forkserver.ensure_running()


def _worker_context() -> multiprocessing.context.BaseContext:
    """Loader workers start from a forkserver, not from a fork of the rank: a fork copies every lock as it
    stands, and one that another thread of the rank held (Ray's, MLflow's, pyarrow's) stays held forever in the
    worker, which then never delivers a batch. The server (one per process) imports this module and Ray, which
    each worker imports again as the rank's main module (Ray's worker script): a worker starts in milliseconds."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__, "ray"])
    return context


def to_float(batch: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """uint8 images -> float in [-1, 1] on ``device`` (the copy overlaps compute when memory is pinned)."""
    return batch.to(device, non_blocking=True).float().div_(127.5).sub_(1.0)

"""The data plan: which samples an epoch uses, and which (rank, loader worker) delivers each, in which order.

Everything here is a pure function of the manifest's sample counts (and labels) and the config: no I/O, the
same on every host and process, computed on sample ids alone.

Sample ids. Shard ``s`` (in listing order) holds ids ``offset[s] .. offset[s+1]-1``; id ``offset[s] + p`` is
the ``p``-th sample ``read_shard`` yields from it.

Epoch. ``N`` samples, global batch ``G``: an epoch is ``T = N // G`` global steps. Its sequence is the shards
in a seeded random order, each shard's ids in position order, rotated by a seeded offset; the first ``T*G``
are used, the rest (fewer than ``G``) left out, different ones each epoch. ``resampled`` draws the shard
list with replacement; ``class_balance`` draws ``T*G`` ids with replacement, weighted 1/count(class), kept
in read order.

Layout. ``W`` ranks with ``K`` stream workers each serve steps ``start..T-1`` of the epoch from the ids not
yet served, split into contiguous blocks: rank ``r`` takes the ``r``-th share (``B_r`` ids per step,
``rank_batch(G, W, r)``: ``G`` split as evenly as integers allow, so any world size up to ``G`` works), and
within it worker ``k`` a sub-block for the batches ``n`` (counted from ``start``) with ``n % K == k``. A
worker reads its block in order and emits it through a seeded shuffle buffer; its ``c``-th batch is
emissions ``c*B_r .. (c+1)*B_r-1``.

Guarantees. In exact mode every used id is emitted exactly once per epoch, by one (rank, worker). A
``DataPosition`` records the epoch's layouts, so the ids a new layout serves are exactly those the earlier
ones did not: a change of world size mid-epoch neither repeats nor drops a sample, and a resume with an
unchanged layout replays exactly the stream an uninterrupted run would have delivered.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property
from itertools import islice
from typing import Any

import numpy as np
import webdataset as wds

__all__ = ["DataPlan", "DataPosition", "Layout", "emission_order", "rank_batch", "resume_layouts", "worker_batches"]


def rank_batch(global_batch: int, world: int, rank: int) -> int:
    """Rank ``rank``'s share of each global batch: ``G`` split over ``world`` ranks as evenly as integers
    allow (shares differ by at most one; the trainer weights each rank's loss by its share)."""
    return global_batch * (rank + 1) // world - global_batch * rank // world


@dataclass(frozen=True)
class Layout:
    """One stretch of an epoch served by one world size."""

    world: int  # ranks
    workers: int  # stream workers per rank (data.loader_workers, at least 1)
    start: int  # epoch step at which this layout took over


@dataclass
class DataPosition:
    """Where a run stands in its data: checkpointed by the trainer, the same on every rank."""

    batches: int = 0  # global batches consumed since the run started (a batch = G samples)
    layouts: tuple[Layout, ...] = ()  # the current epoch's layouts, oldest first (empty: none yet)

    def to_state(self) -> dict[str, Any]:
        """Plain ints and lists, for ``torch.save(weights_only)`` and JSON."""
        return {"batches": self.batches, "layouts": [[x.world, x.workers, x.start] for x in self.layouts]}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> DataPosition:
        return cls(int(state["batches"]), tuple(Layout(*map(int, x)) for x in state["layouts"]))


def worker_batches(steps: int, worker: int, workers: int) -> int:
    """How many of batches ``0..steps-1`` stream worker ``worker`` serves (batch ``n`` goes to ``n % workers``)."""
    return (steps - worker + workers - 1) // workers


def emission_order(size: int, buffer: int, tag: str) -> Iterator[int]:
    """Indices ``0..size-1`` of a block (its read order) in the order its shuffle buffer emits them."""
    if buffer <= 1:
        return iter(range(size))
    return wds.shuffle(buffer, buffer, rng=random.Random(tag))(iter(range(size)))


def resume_layouts(position: DataPosition, steps_per_epoch: int, world: int, workers: int) -> tuple[Layout, ...]:
    """The layouts of the current epoch for a loader started at ``position`` with ``world`` x ``workers``.

    At an epoch boundary the history restarts. Otherwise a different (world, workers) than the last layout's
    takes over at the current step; a layout that served no step is dropped. A position without layouts
    mid-epoch (written before layouts were recorded) counts as served by the current layout from step 0.
    """
    t, history = position.batches % steps_per_epoch, position.layouts
    if position.batches < 0:
        raise ValueError(f"data position {position}: negative batch count")
    if t == 0 or not history:
        return (Layout(world, workers, 0),)
    starts = [x.start for x in history]
    if starts[0] != 0 or starts != sorted(set(starts)) or starts[-1] > t:
        raise ValueError(f"inconsistent data position {position}: layouts start at {starts}, epoch step is {t}")
    if history[-1].start == t:
        history = history[:-1]
    if (history[-1].world, history[-1].workers) == (world, workers):
        return history
    return (*history, Layout(world, workers, t))


def _rng(*parts: object) -> np.random.Generator:
    """A generator seeded by a string: the same on every host, platform and process."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:16], "little"))


@dataclass(frozen=True, eq=False)
class DataPlan:
    """What the loader needs before reading: the shards, their sample counts, and the sampling settings."""

    shards: tuple[str, ...]  # paths/URLs, in id order
    counts: tuple[int, ...]  # samples per shard, from the manifest
    batch_size: int  # G, the global batch
    seed: int
    mode: str = "exact"  # or "resampled"
    shuffle_buffer: int = 0
    class_balance: bool = False
    labelled: bool = False  # the samples carry class indices (``cls``)
    labels: np.ndarray | None = field(default=None, repr=False)  # class of every id, when the manifest lists them
    class_names: tuple[str, ...] = ()  # the manifest's classes (a labelled dataset), by index
    class_counts: tuple[int, ...] = ()  # samples per class

    @cached_property
    def offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.counts, dtype=np.int64)])

    @property
    def num_samples(self) -> int:
        return int(self.offsets[-1])

    @property
    def batches_per_epoch(self) -> int:
        """T: global steps (batches per rank) per epoch."""
        return self.num_samples // self.batch_size

    def locate(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shard index, position in the shard) of each id."""
        shard = np.searchsorted(self.offsets, ids, side="right") - 1
        return shard, ids - self.offsets[shard]

    def epoch_ids(self, epoch: int) -> np.ndarray:
        """The ``T*G`` ids epoch ``epoch`` uses, in read order (shard order, then position)."""
        rng = _rng("epoch", self.seed, epoch)
        used = self.batches_per_epoch * self.batch_size
        if self.class_balance:
            return self._balanced(rng, used)
        shards = rng.permutation(len(self.counts)) if self.mode == "exact" else self._drawn_shards(rng)
        ids = np.concatenate([np.arange(self.offsets[s], self.offsets[s + 1]) for s in shards])
        # Rotating makes the left-out tail (fewer than G ids) a different part of the data each epoch.
        return np.roll(ids, -int(rng.integers(len(ids))))[:used]

    def _drawn_shards(self, rng: np.random.Generator) -> np.ndarray:
        """Shards drawn with replacement until they hold at least N samples (resampled mode)."""
        counts = np.asarray(self.counts)
        drawn = rng.integers(len(counts), size=len(counts))
        while counts[drawn].sum() < self.num_samples:
            drawn = np.append(drawn, rng.integers(len(counts), size=len(counts)))
        return drawn[: np.searchsorted(np.cumsum(counts[drawn]), self.num_samples) + 1]

    def _balanced(self, rng: np.random.Generator, used: int) -> np.ndarray:
        """``used`` ids drawn with weights 1/count(class), sorted into a random shard order for sequential reads."""
        assert self.labels is not None, "class_balance needs per-sample labels (plan_data checks this)"
        weights = 1.0 / np.bincount(self.labels)[self.labels]
        ids = rng.choice(self.num_samples, size=used, p=weights / weights.sum())
        rank_of_shard = np.argsort(rng.permutation(len(self.counts)))
        return ids[np.lexsort((ids, rank_of_shard[self.locate(ids)[0]]))]

    def blocks(self, layout: Layout) -> Iterator[tuple[int, int, slice]]:
        """``(rank, worker, slice)``: each stream's contiguous share of the ids not served before ``layout``."""
        steps = self.batches_per_epoch - layout.start
        begin = 0
        for rank in range(layout.world):
            per_rank = rank_batch(self.batch_size, layout.world, rank)
            for worker in range(layout.workers):
                size = worker_batches(steps, worker, layout.workers) * per_rank
                yield rank, worker, slice(begin, begin + size)
                begin += size

    def _emission(self, epoch: int, layout: Layout, rank: int, worker: int, size: int) -> Iterator[int]:
        return emission_order(size, self.shuffle_buffer, f"mix/{self.seed}/{epoch}/{layout.start}/{rank}/{worker}")

    def remaining(self, epoch: int, layouts: tuple[Layout, ...]) -> np.ndarray:
        """The ids of ``epoch`` not served before the last layout took over, in read order."""
        ids = self.epoch_ids(epoch)
        for layout, successor in zip(layouts, layouts[1:]):
            steps = successor.start - layout.start
            served = np.zeros(len(ids), dtype=bool)
            for rank, worker, part in self.blocks(layout):
                order = self._emission(epoch, layout, rank, worker, part.stop - part.start)
                per_rank = rank_batch(self.batch_size, layout.world, rank)
                emitted = list(islice(order, worker_batches(steps, worker, layout.workers) * per_rank))
                served[part.start + np.asarray(emitted, dtype=np.int64)] = True
            ids = ids[~served]
        return ids

    def stream(
        self, epoch: int, layouts: tuple[Layout, ...], rank: int, worker: int
    ) -> tuple[np.ndarray, Iterator[int]]:
        """The block of (``rank``, ``worker``) under the last layout (ids in read order) and its emission order."""
        layout = layouts[-1]
        part = next(p for r, w, p in self.blocks(layout) if (r, w) == (rank, worker))
        ids = self.remaining(epoch, layouts)[part]
        return ids, self._emission(epoch, layout, rank, worker, len(ids))

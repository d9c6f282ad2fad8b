"""The data plan on ids alone (no shards, no I/O): what an epoch uses and who delivers it, across layouts."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace
from itertools import islice

import numpy as np
import pytest
import torch

from gan_dist.data.plan import DataPlan, DataPosition, Layout, rank_batch, resume_layouts, worker_batches

COUNTS = (40, 70, 45, 3, 0, 17)  # uneven, a tiny and an empty shard: 175 samples


def _plan(batch: int = 12, **settings) -> DataPlan:
    shards = tuple(f"s{i}" for i in range(len(COUNTS)))
    return DataPlan(shards=shards, counts=COUNTS, batch_size=batch, seed=3, **settings)


def _delivered(plan: DataPlan, epoch: int, layouts: tuple[Layout, ...], end: int) -> list[list[int]]:
    """Per epoch step, the ids the ranks deliver: under each layout, rank r's batch n (from the layout's start)
    is the (n // K)-th batch of the emissions of its stream worker n % K (what the loader hands out)."""
    steps = []
    for i, layout in enumerate(layouts):
        stop = layouts[i + 1].start if i + 1 < len(layouts) else end
        b, k = [rank_batch(plan.batch_size, layout.world, r) for r in range(layout.world)], layout.workers
        streams = {}
        for rank in range(layout.world):
            for worker in range(k):
                ids, order = plan.stream(epoch, layouts[: i + 1], rank, worker)
                streams[rank, worker] = ids[list(order)].tolist()
        for n in range(stop - layout.start):
            c = n // k
            steps.append([i for r in range(layout.world) for i in streams[r, n % k][c * b[r] : (c + 1) * b[r]]])
    return steps


def test_worker_batches_split_every_stretch() -> None:
    for steps in range(12):
        for workers in (1, 2, 3, 5):
            counts = [worker_batches(steps, w, workers) for w in range(workers)]
            assert sum(counts) == steps and counts == [len(range(w, steps, workers)) for w in range(workers)]


def test_exact_epoch_is_a_pass_over_the_data_leaving_out_a_different_tail() -> None:
    plan = _plan(batch=10)  # 17 steps of 10: 170 used, 5 left out per epoch
    left_out = []
    for epoch in range(4):
        ids = plan.epoch_ids(epoch)
        assert len(ids) == len(set(ids.tolist())) == 170 and ids.min() >= 0 and ids.max() < 175
        assert np.array_equal(ids, _plan(batch=10).epoch_ids(epoch))  # a pure function of (seed, epoch)
        left_out.append(frozenset(range(175)) - set(ids.tolist()))
        shard, position = plan.locate(ids)
        assert (np.diff(position)[np.diff(shard) == 0] > 0).all()  # each shard in position order: sequential reads
    assert len(set(left_out)) == 4
    assert not np.array_equal(plan.epoch_ids(0), plan.epoch_ids(1))
    assert not np.array_equal(plan.epoch_ids(0), replace(plan, seed=4).epoch_ids(0))


def test_resampled_epoch_draws_whole_shards_with_replacement() -> None:
    plan = _plan(mode="resampled")
    repeats = 0
    for epoch in range(4):
        ids = plan.epoch_ids(epoch)
        assert len(ids) == plan.batches_per_epoch * 12 and ids.min() >= 0 and ids.max() < 175
        repeats += len(ids) - len(set(ids.tolist()))
    assert repeats > 0


def test_class_balance_draws_classes_equally_in_read_order() -> None:
    labels = np.array([0] * 157 + [1] * 18)  # about 90 / 10
    plan = _plan(batch=25, class_balance=True, labels=labels)
    ids = np.concatenate([plan.epoch_ids(e) for e in range(6)])  # 6 x 175 draws
    assert 0.45 < labels[ids].mean() < 0.55
    shard, position = plan.locate(plan.epoch_ids(0))
    runs = [s for i, s in enumerate(shard) if i == 0 or s != shard[i - 1]]
    assert len(runs) == len(set(runs)) and (np.diff(position)[np.diff(shard) == 0] >= 0).all()  # one pass per shard


@pytest.mark.parametrize(
    ("world", "workers", "buffer"),
    [(1, 1, 0), (2, 2, 7), (3, 4, 30), (4, 3, 1000), (5, 2, 20)],  # 12 streams > 6 shards; 5 ranks: shares of 2-3
)
def test_one_layout_delivers_every_used_id_once(world: int, workers: int, buffer: int) -> None:
    plan = _plan(shuffle_buffer=buffer)
    layouts = (Layout(world, workers, 0),)
    steps = _delivered(plan, 1, layouts, plan.batches_per_epoch)
    assert len(steps) == plan.batches_per_epoch and all(len(s) == 12 for s in steps)
    assert sorted(i for s in steps for i in s) == sorted(plan.epoch_ids(1).tolist())
    if buffer > 1:  # the buffer mixes: no stream emits its block in read order
        ids, order = plan.stream(1, layouts, 0, 0)
        assert list(order) != list(range(len(ids)))


CHANGES = [((2, 2, 0), (3, 1, 5)), ((2, 2, 0), (1, 1, 3)), ((2, 2, 0), (3, 1, 4), (1, 2, 9)), ((4, 1, 0), (6, 3, 13)),
           ((2, 1, 0), (5, 2, 6), (7, 1, 10))]  # world sizes that do not divide the global batch of 12


@pytest.mark.parametrize(
    "settings",
    [
        {"shuffle_buffer": 0},
        {"shuffle_buffer": 9},
        {"mode": "resampled", "shuffle_buffer": 9},
        {"class_balance": True, "labels": np.arange(sum(COUNTS)) % 3, "shuffle_buffer": 9},
    ],
)
def test_world_size_changes_neither_repeat_nor_drop_a_sample(settings: dict) -> None:
    plan = _plan(**settings)  # 14 steps of 12
    epoch = 2
    used = Counter(plan.epoch_ids(epoch).tolist())
    for changes in CHANGES:  # (world, workers, start) of each layout
        layouts = tuple(Layout(*c) for c in changes)
        steps = _delivered(plan, epoch, layouts, plan.batches_per_epoch)
        assert len(steps) == 14 and all(len(s) == 12 for s in steps)
        assert Counter(i for s in steps for i in s) == used  # exactly the epoch's samples, each as often as drawn
        # The steps before a change are those the earlier layout delivered without knowing of it.
        assert steps[: changes[1][2]] == _delivered(plan, epoch, layouts[:1], changes[1][2])


def test_resume_layouts() -> None:
    t = 14  # steps per epoch
    a, b = Layout(2, 2, 0), Layout(3, 1, 5)
    assert resume_layouts(DataPosition(), t, 2, 2) == (a,)
    assert resume_layouts(DataPosition(5, (a,)), t, 2, 2) == (a,)  # same world: continue, bit-identical
    assert resume_layouts(DataPosition(5, (a,)), t, 3, 1) == (a, b)  # a change takes over at step 5
    assert resume_layouts(DataPosition(7, (a, b)), t, 3, 1) == (a, b)
    assert resume_layouts(DataPosition(7, (a, b)), t, 2, 2) == (a, b, Layout(2, 2, 7))
    assert resume_layouts(DataPosition(5, (a, b)), t, 1, 1) == (a, Layout(1, 1, 5))  # b served no step
    assert resume_layouts(DataPosition(28, (a, b)), t, 1, 1) == (Layout(1, 1, 0),)  # epoch boundary: afresh
    assert resume_layouts(DataPosition(9), t, 3, 1) == (Layout(3, 1, 0),)  # no history: the current one
    for bad in [(b,), (a, Layout(3, 1, 9)), (a, b, Layout(1, 1, 5))]:
        with pytest.raises(ValueError, match="inconsistent data position"):
            resume_layouts(DataPosition(8, bad), t, 2, 2)


def test_position_is_plain_data(tmp_path) -> None:
    position = DataPosition(31, (Layout(2, 2, 0), Layout(3, 1, 5)))
    state = position.to_state()
    assert DataPosition.from_state(json.loads(json.dumps(state))) == position
    torch.save({"data": state}, tmp_path / "state.pt")
    assert DataPosition.from_state(torch.load(tmp_path / "state.pt", weights_only=True)["data"]) == position


def test_emission_keeps_reads_within_the_shuffle_buffer() -> None:
    plan = _plan(shuffle_buffer=16)
    ids, order = plan.stream(0, (Layout(1, 1, 0),), 0, 0)
    emitted = list(order)
    # Emission j needs reads up to its index: what is read but not yet emitted stays within the buffer.
    held = max(max(emitted[: j + 1]) - j for j in range(len(emitted)))
    assert sorted(emitted) == list(range(len(ids))) and 8 <= held <= 16  # read ahead: at most the buffer
    assert list(islice(plan.stream(0, (Layout(1, 1, 0),), 0, 0)[1], 20)) == emitted[:20]


def test_rank_shares_split_the_global_batch_as_evenly_as_integers_allow() -> None:
    assert [rank_batch(12, 5, r) for r in range(5)] == [2, 2, 3, 2, 3]
    for g, w in ((64, 3), (64, 24), (7, 7), (100, 1)):
        shares = [rank_batch(g, w, r) for r in range(w)]
        assert sum(shares) == g and max(shares) - min(shares) <= 1

"""Resuming across world sizes: a checkpoint written by 2 DDP ranks restores at 1 and at 3 ranks to the same
generator, discriminator, EMA-G and optimizer state, on every rank."""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gan_dist.config import build_config
from gan_dist.models.io import read_state
from gan_dist.train.checkpoint import restore_modules, save_checkpoint, seed_rank_streams, training_state
from gan_dist.train.modules import bare, build_modules
from gan_dist.train.step import DiscriminatorBatch, GeneratorBatch, discriminator_step, generator_step

OVERRIDES = ["model.g_width=8", "model.d_width=8", "model.z_dim=16", "train.batch_size=12", "loss.name=hinge",
             "model.d_norm=none", "loss.r1_gamma=1", "loss.r1_every=2", "optim.d_schedule.kind=cosine"]  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cfg(world: int):
    return build_config({"data": {"url": "/unused"}}, OVERRIDES + [f"scaling.num_workers={world}"])


def _state_tensors(m) -> dict[str, torch.Tensor]:
    """Every tensor of G, D, EMA-G and both optimizers (moments included), by name."""
    state = training_state(m)
    out = {}
    for part in ("g", "d", "g_ema"):
        out.update({f"{part}.{k}": v for k, v in state[part].items()})
    for part in ("opt_g", "opt_d"):
        for i, moments in state[part]["state"].items():
            out.update({f"{part}.{i}.{k}": v for k, v in moments.items()})
    out["sched_d.last_epoch"] = torch.tensor(state["sched_d"]["last_epoch"])
    return out


def _group(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)


def _train_and_save(rank: int, world: int, port: int, directory: str) -> None:
    _group(rank, world, port)
    try:
        cfg = _cfg(world)
        m = build_modules(cfg, torch.device("cpu"))
        noise = torch.Generator()
        seed_rank_streams(noise, cfg.train.seed, rank, world, 0, None)  # each rank's own streams, as the trainer sets them
        for step in range(3):
            real = torch.rand(12 // world, 1, 32, 32, generator=noise) * 2 - 1
            discriminator_step(m, cfg, DiscriminatorBatch(real, torch.randn(12 // world, 16, generator=noise)), step)
            generator_step(m, cfg, GeneratorBatch(torch.randn(12 // world, 16, generator=noise)), step)
        if rank == 0:
            save_checkpoint(directory, training_state(m, step=3, config=cfg.model_dump(mode="json")))
    finally:
        dist.destroy_process_group()


def _restore(rank: int, world: int, port: int, directory: str) -> None:
    _group(rank, world, port)
    try:
        m = build_modules(_cfg(world), torch.device("cpu"))
        assert isinstance(m.g, torch.nn.parallel.DistributedDataParallel)
        restore_modules(m, read_state(directory))
        torch.save(_state_tensors(m), os.path.join(directory, f"restored-{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_a_checkpoint_of_two_ranks_restores_at_one_and_at_three(tmp_path) -> None:
    mp.spawn(_train_and_save, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    saved = read_state(tmp_path)

    single = build_modules(_cfg(1), torch.device("cpu"))
    restore_modules(single, saved)
    expected = _state_tensors(single)
    assert bare(single.g) is single.g  # one rank: no DDP wrapper, same state
    reference = {**{f"g.{k}": v for k, v in saved["g"].items()}, **{f"d.{k}": v for k, v in saved["d"].items()}}
    assert all(torch.equal(expected[k], v) for k, v in reference.items())

    mp.spawn(_restore, args=(3, _free_port(), str(tmp_path)), nprocs=3, join=True)
    for rank in range(3):
        restored = torch.load(tmp_path / f"restored-{rank}.pt", weights_only=True)
        assert restored.keys() == expected.keys()
        for key, value in expected.items():
            assert torch.equal(restored[key], value), f"rank {rank}: {key}"

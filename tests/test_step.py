"""The train step: EMA maths, and every loss and regularizer under a real 2-process gloo DDP group compared
with one process doing the same work on the whole batch (same initial weights, same inputs)."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from gan_dist.config import build_config
from gan_dist.train.modules import bare, build_modules, parameter_digest
from gan_dist.train.step import (
    DiscriminatorBatch,
    GeneratorBatch,
    discriminator_step,
    ema_beta,
    ema_decay_at,
    generator_step,
    standing_statistics,
    update_ema,
)

BATCH = 8
TINY = ["model.g_width=8", "model.d_width=8", "model.z_dim=16", f"train.batch_size={BATCH}"]
NO_BATCHNORM = ["model.g_batchnorm=false", "model.d_norm=none"]  # per-rank BN statistics differ by design


def test_ema_update_rule_by_hand():
    ema, model = nn.Linear(2, 1), nn.Linear(2, 1)
    with torch.no_grad():
        ema.weight.copy_(torch.tensor([[1.0, 2.0]]))
        model.weight.copy_(torch.tensor([[3.0, -2.0]]))
    update_ema(ema, model, decay=0.75)
    # 0.75 * [1, 2] + 0.25 * [3, -2] = [1.5, 1.0]
    assert torch.allclose(ema.weight, torch.tensor([[1.5, 1.0]]))


def test_ema_keeps_its_own_batchnorm_statistics_and_copies_other_buffers():
    ema, model = nn.Sequential(nn.BatchNorm1d(3)), nn.Sequential(nn.BatchNorm1d(3))
    model[0].running_mean.fill_(4.0)
    model.register_buffer("w_avg", torch.full((2,), 7.0))
    ema.register_buffer("w_avg", torch.zeros(2))
    update_ema(ema, model, decay=0.9)
    assert torch.equal(ema[0].running_mean, torch.zeros(3))  # not G's: recomputed for EMA-G's own weights
    assert torch.equal(ema.w_avg, model.w_avg)


def test_standing_statistics_match_the_generators_own_outputs():
    torch.manual_seed(0)
    g = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)).eval()
    g[1].running_mean.fill_(100.0)  # stale statistics from other weights
    standing_statistics(g, z_dim=4, batch_size=16, batches=3, seed=5)
    noise = torch.Generator().manual_seed(5)
    with torch.no_grad():
        outputs = torch.stack([g[0](torch.randn(16, 4, generator=noise)) for _ in range(3)])
    assert torch.allclose(g[1].running_mean, outputs.mean((0, 1)), atol=1e-6)
    assert torch.allclose(g[1].running_var, outputs.var(1, unbiased=True).mean(0), atol=1e-6)
    assert not g.training and g[1].momentum == 0.1


def test_ema_decay_warms_up_then_caps():
    assert ema_decay_at(0, 0.999) == pytest.approx(0.1)
    assert ema_decay_at(90, 0.999) == pytest.approx(91 / 100)
    assert ema_decay_at(10**6, 0.999) == 0.999


def test_ema_half_life_in_images_with_rampup():
    cfg = build_config({"data": {"url": "/unused"}}, ["train.batch_size=64", "train.ema_kimg=10"])
    assert ema_beta(cfg, 0) == pytest.approx(0.5 ** (64 / 10_000))  # half-life of 10k images
    ramped = build_config({"data": {"url": "/unused"}}, ["train.batch_size=64", "train.ema_kimg=10", "train.ema_rampup=0.05"])
    assert ema_beta(ramped, 0) == pytest.approx(0.5 ** (64 / (64 * 0.05)))  # 1 step seen: 3.2 images
    assert ema_beta(ramped, 10**6) == ema_beta(cfg, 10**6)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _inputs(cfg, steps: int = 1):
    """The whole global batch's inputs for ``steps`` iterations, the same in every process."""
    gen = torch.Generator().manual_seed(1234)
    res, z_dim, n = cfg.data.resolution, cfg.model.z_dim, cfg.train.n_critic
    return [
        {
            "real": torch.rand(n, BATCH, cfg.data.channels, res, res, generator=gen) * 2 - 1,
            "z_d": torch.randn(n, BATCH, z_dim, generator=gen),
            "eps": torch.rand(n, BATCH, generator=gen),
            "z_g": torch.randn(BATCH, z_dim, generator=gen),
            "labels": torch.randint(0, 4, (n, BATCH), generator=gen),
        }
        for _ in range(steps)
    ]


def _train(cfg, rank: int, world: int, steps: int = 1) -> dict:
    """Run ``steps`` iterations on this rank's share of the inputs; return the state to compare."""
    device = torch.device("cpu")
    m = build_modules(cfg, device)
    share = slice(rank * BATCH // world, (rank + 1) * BATCH // world)  # the trainer's rank_batch split
    untouched = True
    for step, x in enumerate(_inputs(cfg, steps)):
        labels = x["labels"][:, share] if cfg.model.conditional else [None] * cfg.train.n_critic
        for k in range(cfg.train.n_critic):
            batch = DiscriminatorBatch(x["real"][k][share], x["z_d"][k][share], x["eps"][k][share], labels[k])
            discriminator_step(m, cfg, batch, step * cfg.train.n_critic + k)
        d_before = [(p.detach().clone(), p.grad.clone()) for p in bare(m.d).parameters()]
        generator_step(m, cfg, GeneratorBatch(x["z_g"][share], labels[-1]), step)
        untouched &= all(torch.equal(a, p) and torch.equal(g, p.grad) for (a, g), p in zip(d_before, bare(m.d).parameters()))
    tensors = {f"{name}.{k}": v.detach().clone() for name, net in (("g", bare(m.g)), ("d", bare(m.d)), ("g_ema", m.g_ema))
               for k, v in net.state_dict().items()}  # fmt: skip
    for name, net in (("g", bare(m.g)), ("d", bare(m.d))):
        tensors.update({f"{name}.grad.{i}": p.grad.clone() for i, p in enumerate(net.parameters())})
    for name, opt in (("opt_g", m.opt_g), ("opt_d", m.opt_d)):
        for i, moments in opt.state_dict()["state"].items():
            tensors.update({f"{name}.{i}.{k}": v.clone() for k, v in moments.items() if k != "step"})
    return {"tensors": tensors, "digest": parameter_digest(m), "d_untouched_by_g_step": untouched}


def _ddp_worker(rank, world, port, overrides, steps, result_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        cfg = build_config({"data": {"url": "/unused"}}, overrides + [f"scaling.num_workers={world}"])
        torch.save(_train(cfg, rank, world, steps), os.path.join(result_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


CASES = {
    "minimax": ["loss.name=minimax"],
    "nonsaturating": ["loss.name=nonsaturating"],
    "lsgan": ["loss.name=lsgan"],
    "wgan-clipping": ["loss.name=wgan", "loss.clip=0.01"],
    "wgan-gp": ["loss.name=wgan-gp"],
    "hinge-resnet-sn": ["loss.name=hinge", "model.arch=resnet"],
    "lazy-r1": ["loss.name=nonsaturating", "loss.r1_gamma=2.0", "loss.r1_every=2"],
    "n-critic-2": ["loss.name=wgan-gp", "train.n_critic=2", "loss.r1_gamma=1.0", "loss.r1_every=2"],
    "accumulate-2": ["loss.name=hinge", "train.accumulate=2", "loss.r1_gamma=1.0", "loss.r1_every=1"],
    "conditional-mlp-acgan": ["model.arch=mlp", "model.conditional=true", "model.num_classes=4", "loss.ac_weight=1"],
    "three-uneven-ranks-micro-batches": ["loss.name=hinge", "scaling.num_workers=3", "train.micro_batch=2",
                                         "loss.r1_gamma=1.0", "loss.r1_every=1"],  # shares 2, 3, 3; micro 2+1
    "clip-and-schedule": ["optim.d_clip_norm=0.01", "optim.g_clip_norm=0.01", "optim.g_schedule.warmup_steps=3",
                          "optim.d_schedule.kind=cosine"],
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_two_ranks_equal_one_process_on_the_whole_batch(tmp_path, case):
    """One (or two, for EMA and Adam's second moments) D+G iterations on 2 gloo ranks with B/2 each equal
    the same iterations in one process with batch B: gradients, parameters, Adam moments, EMA-G."""
    overrides = TINY + NO_BATCHNORM + CASES[case]
    steps, world = 2, 3 if "scaling.num_workers=3" in overrides else 2
    mp.spawn(_ddp_worker, args=(world, _free_port(), overrides, steps, str(tmp_path)), nprocs=world, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)]
    single = ["scaling.num_workers=1", "train.accumulate=1", "train.micro_batch=null"]
    single_cfg = build_config({"data": {"url": "/unused"}}, overrides + single)
    reference = _train(single_cfg, rank=0, world=1, steps=steps)

    assert all(r["d_untouched_by_g_step"] for r in ranks + [reference]), "the G step changed D's weights or gradients"
    assert len({r["digest"] for r in ranks}) == 1, "replicas diverged"
    got, want = ranks[0]["tensors"], reference["tensors"]
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=5e-4, atol=1e-5, msg=lambda m: f"{case}: {key}: {m}")


STYLEGAN2 = ["model.arch=stylegan2", "model.channel_base=256", "model.channel_max=16", "model.z_dim=16",
             "model.w_dim=16", "model.mapping_layers=2", "train.batch_size=8", "loss.r1_gamma=1", "loss.r1_every=1",
             "loss.pl_every=1", "augment.kind=ada", "augment.interval=1", "augment.target=0.1"]  # fmt: skip


def _stylegan2_worker(rank, world, port, result_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        cfg = build_config({"data": {"url": "/unused"}}, STYLEGAN2 + [f"scaling.num_workers={world}"])
        m = build_modules(cfg, torch.device("cpu"))
        torch.manual_seed(100 + rank)  # each rank its own noise inputs, style mixing and augmentations
        terms = {}
        for step in range(3):
            real = torch.rand(4, 1, 32, 32) * 2 - 1
            terms.update(discriminator_step(m, cfg, DiscriminatorBatch(real, torch.randn(4, 16)), step))
            m.ada.update(m.augment)
            terms.update(generator_step(m, cfg, GeneratorBatch(torch.randn(4, 16)), step))
        record = {"digest": parameter_digest(m), "pl_mean": m.pl_mean.clone(), "p": m.augment.p.clone(),
                  "w_avg": bare(m.g).mapping.w_avg.clone(), "terms": sorted(terms)}  # fmt: skip
        torch.save(record, os.path.join(result_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_stylegan2_with_r1_path_length_and_ada_keeps_replicas_identical(tmp_path):
    """Every parameter gets a gradient (DDP would raise on an unused one), and the state every rank must
    share stays bit-identical: weights, EMA-G, the mean style, the running path length, ADA's p."""
    mp.spawn(_stylegan2_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert ranks[0]["digest"] == ranks[1]["digest"]
    for key in ("pl_mean", "p", "w_avg"):
        assert torch.equal(ranks[0][key], ranks[1][key]), key
    assert ranks[0]["pl_mean"] > 0 and ranks[0]["w_avg"].abs().sum() > 0 and ranks[0]["p"] > 0
    assert {"losses/d_r1", "losses/g_pl", "regularizers/pl_mean"} <= set(ranks[0]["terms"])

"""The train step: EMA maths, and alternating D/G updates under a real 2-process gloo DDP group."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from gan_dist.config import build_config
from gan_dist.train.modules import bare, build_modules, parameter_digest
from gan_dist.train.step import discriminator_step, ema_decay_at, generator_step, update_ema


def test_ema_update_rule_by_hand():
    ema, model = nn.Linear(2, 1), nn.Linear(2, 1)
    with torch.no_grad():
        ema.weight.copy_(torch.tensor([[1.0, 2.0]]))
        model.weight.copy_(torch.tensor([[3.0, -2.0]]))
    update_ema(ema, model, decay=0.75)
    # 0.75 * [1, 2] + 0.25 * [3, -2] = [1.5, 1.0]
    assert torch.allclose(ema.weight, torch.tensor([[1.5, 1.0]]))


def test_ema_copies_buffers():
    ema, model = nn.BatchNorm1d(3), nn.BatchNorm1d(3)
    model.running_mean.fill_(4.0)
    update_ema(ema, model, decay=0.9)
    assert torch.equal(ema.running_mean, model.running_mean)


def test_ema_decay_warms_up_then_caps():
    assert ema_decay_at(0, 0.999) == pytest.approx(0.1)
    assert ema_decay_at(90, 0.999) == pytest.approx(91 / 100)
    assert ema_decay_at(10**6, 0.999) == 0.999


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, overrides, result_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        cfg = build_config({"data": {"url": "/unused"}}, overrides)
        device = torch.device("cpu")
        m = build_modules(cfg, device)
        gen = torch.Generator().manual_seed(100 + rank)  # each rank sees different data and noise
        b, z_dim, res = cfg.per_worker_batch(), cfg.model.z_dim, cfg.data.resolution
        record = {}
        for step in range(3):
            real = torch.rand(b, cfg.data.channels, res, res, generator=gen) * 2 - 1
            terms = discriminator_step(m, cfg, real, torch.randn(b, z_dim, generator=gen), step, device)
            d_params = [p.detach().clone() for p in bare(m.d).parameters()]
            d_grads = [p.grad.clone() for p in bare(m.d).parameters()]
            generator_step(m, cfg, torch.randn(b, z_dim, generator=gen), step, device)
            record["d_untouched_by_g_step"] = all(
                torch.equal(a, p) and torch.equal(g, p.grad)
                for a, g, p in zip(d_params, d_grads, bare(m.d).parameters())
            )
        record["terms"] = sorted(terms)
        record["finite"] = all(bool(torch.isfinite(v)) for v in terms.values())
        record["digest"] = parameter_digest(m)
        torch.save(record, os.path.join(result_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(
    "overrides, expected_terms",
    [
        (["loss.name=nonsaturating"], {"losses/d_adv", "losses/d"}),
        (["loss.name=wgan-gp", "model.d_norm=none", "loss.r1_gamma=1.0", "loss.r1_every=2"], {"losses/d_gp", "losses/d_r1"}),
        (["loss.name=hinge", "model.arch=resnet", "model.g_width=8", "model.d_width=8"], {"losses/d_adv"}),
    ],
    ids=["nonsaturating-bn", "wgan-gp+r1-double-backward", "hinge-resnet-sn"],
)
def test_ddp_alternating_updates_stay_in_sync(tmp_path, overrides, expected_terms):
    base = ["model.g_width=8", "model.d_width=8", "model.z_dim=16", "train.batch_size=8", "scaling.num_workers=2"]
    mp.spawn(_ddp_worker, args=(2, _free_port(), base + overrides, str(tmp_path)), nprocs=2, join=True)
    records = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for record in records:
        assert record["d_untouched_by_g_step"], "the G step changed D's weights or gradients"
        assert record["finite"]
        assert expected_terms <= set(record["terms"])
    assert records[0]["digest"] == records[1]["digest"], "G/D replicas diverged across ranks"

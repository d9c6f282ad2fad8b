"""Training modes in one process: mixed precision (fp16 overflow is a skip, not a divergence), what counts as
diverged, every D iteration in the log window, LR schedules that resume exactly."""

from __future__ import annotations

import pytest
import torch

from gan_dist.config import build_config
from gan_dist.data.loader import Batch
from gan_dist.data.plan import DataPosition
from gan_dist.tracking.tracker import NullTracker
from gan_dist.train.checkpoint import restore_modules, training_state
from gan_dist.train.loop import train_step
from gan_dist.train.modules import build_modules
from gan_dist.train.phases import PARAMS_FINITE, Window, Worker, diverged
from gan_dist.train.step import DiscriminatorBatch, GeneratorBatch, discriminator_step, generator_step

BASE = {"data": {"url": "/unused"}}
TINY = ["model.g_width=8", "model.d_width=8", "model.z_dim=16", "train.batch_size=8", "scaling.num_workers=1"]
CPU = torch.device("cpu")


class _Batches:
    """Stands in for the loader: uint8 batches and the position the trainer reads."""

    def __init__(self) -> None:
        self.gen, self.position = torch.Generator().manual_seed(0), DataPosition(batches=1)

    def __next__(self) -> Batch:
        self.position = DataPosition(self.position.batches + 1)
        return Batch((torch.rand(8, 1, 32, 32, generator=self.gen) * 255).to(torch.uint8), None)


def _iteration(m, cfg, step=0):
    real = torch.rand(8, 1, 32, 32) * 2 - 1
    terms = discriminator_step(m, cfg, DiscriminatorBatch(real, torch.randn(8, 16)), step)
    return terms, generator_step(m, cfg, GeneratorBatch(torch.randn(8, 16)), step)


def test_fp16_overflow_is_skipped_and_counted_not_a_divergence():
    cfg = build_config(BASE, TINY + ["train.precision=fp16"])
    m = build_modules(cfg, CPU)
    m.scaler_d = torch.amp.GradScaler("cpu", init_scale=2.0**40)  # every fp16 gradient overflows at first
    before = [p.detach().clone() for p in m.d.parameters()]
    window = Window()
    d_terms, g_terms = _iteration(m, cfg)
    window.add(d_terms)
    window.add(g_terms)
    assert all(torch.equal(a, p) for a, p in zip(before, m.d.parameters())), "an overflowing step must not update D"
    assert m.scaler_d.get_scale() < 2.0**40  # the scaler backed off
    for step in range(1, 60):  # the scale falls until D's steps go through
        d_terms, _ = _iteration(m, cfg, step)
        window.add(d_terms)
    window.add({PARAMS_FINITE: torch.tensor(1.0)})
    metrics = window.means(world=1)
    assert 0 < metrics["optim/d_amp_skipped"] < 1
    assert metrics["optim/d_grad_norm"] > 0 and torch.isfinite(torch.tensor(metrics["optim/d_grad_norm"]))
    assert diverged(metrics) == []  # skips are the scaler's business, not a reason to stop or roll back
    assert not any(torch.equal(a, p) for a, p in zip(before, m.d.parameters()))


def test_bf16_autocast_steps_run_on_cpu():
    cfg = build_config(BASE, TINY + ["train.precision=bf16", "loss.name=wgan-gp", "model.d_norm=none"])
    m = build_modules(cfg, CPU)
    d_terms, g_terms = _iteration(m, cfg)
    assert all(torch.isfinite(v if not isinstance(v, tuple) else v[0]).all() for v in {**d_terms, **g_terms}.values())
    assert "losses/d_gp" in d_terms and "optim/d_amp_skipped" not in d_terms  # bf16 needs no loss scaling


def test_divergence_means_a_non_finite_loss_or_parameter():
    assert diverged({"losses/d": 1.0, "optim/g_grad_norm": float("inf"), PARAMS_FINITE: 1.0}) == []
    assert diverged({"losses/d": float("nan"), "losses/g": 1.0, PARAMS_FINITE: 1.0}) == ["losses/d"]
    assert diverged({"losses/d": 1.0, PARAMS_FINITE: 0.5}) == ["parameters"]


def test_every_d_iteration_reaches_the_log_window():
    cfg = build_config(BASE, TINY + ["train.n_critic=3", "loss.name=hinge", "model.d_norm=none", "loss.r1_gamma=1",
                                     "loss.r1_every=3"])  # fmt: skip
    m = build_modules(cfg, CPU)
    w = Worker(cfg=cfg, rank=0, world=1, device=CPU, m=m, noise=torch.Generator().manual_seed(0),
               data=_Batches(), tracker=NullTracker(), fixed_z=torch.zeros(1, 16), evaluation=None,
               last_good={})  # fmt: skip
    train_step(w)
    assert w.data.position.batches == 4 and w.window.steps == 1
    assert w.window.counts["losses/d_adv"] == 3  # each of the 3 D iterations, not the last one only
    assert w.window.counts["losses/d_r1"] == 1  # R1 fell on one of them (index 0), and it is logged
    assert w.window.counts["losses/g"] == 1


@pytest.mark.parametrize("kind", ["step", "cosine"])
def test_lr_schedules_follow_their_shape_and_resume_exactly(kind):
    overrides = TINY + [f"optim.d_schedule.kind={kind}", "optim.d_schedule.warmup_steps=4", "optim.d_schedule.step_every=3",
                        "optim.d_schedule.min_ratio=0.1", "train.steps=20"]  # fmt: skip
    cfg = build_config(BASE, overrides)
    m = build_modules(cfg, CPU)
    rates = []
    for step in range(10):
        _iteration(m, cfg, step)
        rates.append(m.opt_d.param_groups[0]["lr"])
        if step == 4:
            saved = training_state(m)
    base = cfg.optim.d_lr
    assert rates[:3] == pytest.approx([base * 2 / 4, base * 3 / 4, base])  # linear warm-up over 4 steps
    assert rates[-1] < base and m.opt_g.param_groups[0]["lr"] == cfg.optim.g_lr  # G keeps its constant rate

    resumed = build_modules(cfg, CPU)
    restore_modules(resumed, saved)
    again = []
    for step in range(5, 10):
        _iteration(resumed, cfg, step)
        again.append(resumed.opt_d.param_groups[0]["lr"])
    assert again == rates[5:]


def test_a_fine_tune_starts_fresh_optimizers_but_keeps_the_weights():
    from gan_dist.train.checkpoint import restore_weights

    cfg = build_config(BASE, TINY)
    m = build_modules(cfg, CPU)
    for step in range(2):
        _iteration(m, cfg, step)
    tuned = build_modules(cfg, CPU)
    restore_weights(tuned, training_state(m))
    assert all(torch.equal(a, b) for a, b in zip(m.g.parameters(), tuned.g.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(m.g_ema.parameters(), tuned.g_ema.parameters()))
    assert tuned.opt_g.state_dict()["state"] == {}  # fresh Adam moments: a new task, a new optimizer


def test_window_means_are_weighted_and_skip_absent_terms():
    window = Window()
    for value, weight in ((2.0, 1.0), (100.0, 0.0), (4.0, 1.0)):
        window.add({"optim/d_grad_norm": (torch.tensor(value), torch.tensor(weight)), "losses/d": torch.tensor(value)})
    means = window.means(world=1)
    assert means["optim/d_grad_norm"] == pytest.approx(3.0) and means["losses/d"] == pytest.approx(106 / 3)

"""Scheduled knobs (``schedules.*``): ramp values against hand-computed ones, and where each value lands."""

from __future__ import annotations

import math

import pytest
import torch

from gan_dist.config import ConfigError, build_config
from gan_dist.ramps import RampConfig, ramp_value
from gan_dist.train.modules import build_modules
from gan_dist.train.schedules import apply_to_modules, config_at, scheduled_values
from gan_dist.train.step import ema_beta

BASE = {"data": {"url": "/unused"}}
TINY = ["model.g_width=8", "model.d_width=8", "model.z_dim=8", "model.g_batchnorm=false", "model.d_norm=none",
        "train.batch_size=10", "scaling.num_workers=1"]  # fmt: skip


def test_cosine_and_linear_ramps_by_hand() -> None:
    """R3GAN's half-cosine: start at 0, the mean of start and end halfway, end from kimg on (and after)."""
    gamma = RampConfig(start=0.05, end=0.005, kimg=20)
    assert ramp_value(gamma, 0) == pytest.approx(0.05)
    assert ramp_value(gamma, 10_000) == pytest.approx(0.0275)
    assert ramp_value(gamma, 5_000) == pytest.approx(0.05 - 0.045 * (1 - math.sqrt(0.5)) / 2)  # (1 - cos(pi/4)) / 2
    assert ramp_value(gamma, 20_000) == ramp_value(gamma, 90_000) == pytest.approx(0.005)
    beta2 = RampConfig(start=0.9, end=0.99, kimg=1, shape="linear")
    assert ramp_value(beta2, 250) == pytest.approx(0.9225)


def test_config_at_a_step_moves_penalties_and_ema_and_leaves_the_config_alone() -> None:
    ramps = ["schedules.r1_gamma={start: 2, end: 0.2, kimg: 1}", "schedules.r2_gamma={start: 1, end: 0.1, kimg: 1}",
             "schedules.ema_kimg={start: 0, end: 0.5, kimg: 1}"]  # fmt: skip
    cfg = build_config(BASE, TINY + ramps + ["loss.r1_gamma=7"])
    at = config_at(cfg, 50)  # 500 images: half of the ramps
    assert (at.loss.r1_gamma, at.loss.r2_gamma, at.train.ema_kimg) == pytest.approx((1.1, 0.55, 0.25))
    assert (cfg.loss.r1_gamma, cfg.loss.r2_gamma, cfg.train.ema_kimg) == (7, 0, None)
    # an EMA half-life ramping from 0 starts as a copy of G (beta 0), then averages 10 images over a 250 half-life
    assert ema_beta(config_at(cfg, 0), 0) == 0.0
    assert ema_beta(at, 50) == pytest.approx(0.5 ** (10 / 250))
    plain = build_config(BASE, TINY)
    assert config_at(plain, 50) is plain and scheduled_values(plain, 50) == {}


def test_optimizers_and_augmentation_take_the_step_values() -> None:
    ramps = ["schedules.g_lr={start: 0.002, end: 0.0005, kimg: 1}", "schedules.d_lr={start: 0.001, end: 0.0001, kimg: 1}",
             "schedules.beta2={start: 0.9, end: 0.99, kimg: 1}", "schedules.augment_p={start: 0, end: 0.5, kimg: 1}",
             "augment.kind=ada", "optim.betas=[0.0,0.99]"]  # fmt: skip
    cfg = build_config(BASE, TINY + ramps)
    m = build_modules(cfg, torch.device("cpu"))
    assert m.ada is None, "a scheduled p is not adapted"
    apply_to_modules(m, cfg, 100)  # 1000 images: the end values
    assert m.opt_g.param_groups[0]["lr"] == pytest.approx(0.0005) and m.opt_d.param_groups[0]["lr"] == pytest.approx(1e-4)
    assert all(group["betas"] == pytest.approx((0.0, 0.99)) for opt in (m.opt_g, m.opt_d) for group in opt.param_groups)
    assert m.augment.p.item() == pytest.approx(0.5)
    apply_to_modules(m, cfg, 50)
    assert m.opt_g.param_groups[0]["lr"] == pytest.approx(0.00125) and m.augment.p.item() == pytest.approx(0.25)
    assert scheduled_values(cfg, 50)["beta2"] == pytest.approx(0.945)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["schedules.g_lr={start: 1e-3, end: 1e-4, kimg: 1}", "optim.g_schedule.kind=cosine"], "optim.g_schedule.kind"),
        (["schedules.d_lr={start: 1e-3, end: 1e-4, kimg: 1}", "optim.d_schedule.warmup_steps=5"], "optim.d_schedule.kind"),
        (["schedules.augment_p={start: 0, end: 0.3, kimg: 1}"], "schedules.augment_p"),
        (["schedules.augment_p={start: 0, end: 0.3, kimg: 1}", "augment.kind=ada", "augment.p=0.2"], "augment.p"),
        (["schedules.r2_gamma={start: 1, end: 0.1, kimg: 1}", "model.d_norm=batch"], "loss.r2_gamma"),
        (["schedules.beta2={start: 0.9, end: 0.99}"], "schedules.beta2.kimg"),
        (["schedules.lr={start: 1, end: 2, kimg: 1}"], "schedules.lr"),
    ],
)
def test_schedules_that_cannot_work_are_refused_naming_the_key(overrides: list[str], key: str) -> None:
    with pytest.raises(ConfigError) as err:
        build_config(BASE, TINY + overrides)
    assert err.value.key == key

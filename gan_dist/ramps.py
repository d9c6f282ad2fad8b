"""Knobs that move with the images seen (``schedules.*``, R3GAN's presets): what a ramp is and its value.

Applying the values to a training run is ``gan_dist.train.schedules``; this module is config and arithmetic only,
so the config can validate ramps without importing the trainer.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field

from gan_dist.schema import Section


class RampConfig(Section):
    """A value that moves from ``start`` to ``end`` over the first ``kimg`` thousand images seen, then stays."""

    start: float = Field(ge=0)
    end: float = Field(ge=0)
    kimg: float = Field(gt=0, description="Thousands of images (global batch x steps) the move takes")
    shape: Literal["cosine", "linear"] = Field("cosine", description="cosine: R3GAN's half-cosine from start to end")


class SchedulesConfig(Section):
    """Knobs that move with the images seen (R3GAN's presets), for any arch; an unset one keeps its key's value."""

    r1_gamma: RampConfig | None = Field(None, description="loss.r1_gamma over training")
    r2_gamma: RampConfig | None = Field(None, description="loss.r2_gamma over training")
    g_lr: RampConfig | None = Field(None, description="G's learning rate (instead of optim.g_lr and its schedule)")
    d_lr: RampConfig | None = Field(None, description="D's learning rate (instead of optim.d_lr and its schedule)")
    beta2: RampConfig | None = Field(None, description="Adam's beta2 of G and D (instead of optim.betas[1])")
    ema_kimg: RampConfig | None = Field(None, description="The EMA-G half-life in kimg (instead of train.ema_kimg)")
    augment_p: RampConfig | None = Field(None, description="augment.kind=ada: a scheduled p instead of adapting it")


# Keys a ramp makes idle: the ramp sets the value at every step in their place (or, augment_p, ends ADA's
# adaptation that the augment keys steer); a value given there is not used while the ramp is set.
REPLACED_KEYS = {"loss.r1_gamma": "r1_gamma", "loss.r2_gamma": "r2_gamma", "optim.g_lr": "g_lr",
                 "optim.d_lr": "d_lr", "train.ema_kimg": "ema_kimg", "train.ema_decay": "ema_kimg",
                 "augment.p": "augment_p", "augment.target": "augment_p", "augment.speed_kimg": "augment_p",
                 "augment.interval": "augment_p"}  # fmt: skip (a scheduled p also ends ADA's adaptation)


def ramp_value(ramp: RampConfig, images: float) -> float:
    """The ramp's value after ``images`` images: ``start`` at 0, ``end`` from ``kimg`` thousand on; in between
    along half a cosine (R3GAN's schedules) or a straight line."""
    progress = min(images / (ramp.kimg * 1000), 1.0)
    if ramp.shape == "cosine":
        progress = (1 - math.cos(math.pi * progress)) / 2
    return ramp.start + progress * (ramp.end - ramp.start)

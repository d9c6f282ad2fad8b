"""Knobs that move with the images seen (``schedules.*``): R3GAN's presets ramp R1/R2's gamma, the learning
rates, Adam's beta2, the EMA half-life and the augmentation probability from a start to an end value.

A ramp's value depends only on the step (images seen = step x global batch), so a resumed or elastically
resized run finds every knob where an uninterrupted run has it, with nothing kept in the checkpoint.
"""

from __future__ import annotations

from gan_dist.config import GanConfig
from gan_dist.ramps import ramp_value
from gan_dist.train.modules import GanModules, lazy_ratio


def scheduled_values(cfg: GanConfig, step: int) -> dict[str, float]:
    """Each scheduled knob's value at ``step`` (before that step's update), by its ``schedules.*`` name."""
    images = step * cfg.train.batch_size
    return {name: ramp_value(ramp, images) for name, ramp in cfg.schedules if ramp is not None}


def config_at(cfg: GanConfig, step: int) -> GanConfig:
    """``cfg`` as the step functions read it at ``step``: the scheduled penalty weights and EMA half-life in
    their keys (a copy; ``cfg`` itself keeps the configured values). The learning rates, beta2 and the
    augmentation probability live in the optimizers and the pipeline: ``apply_to_modules``."""
    values = scheduled_values(cfg, step)
    loss = {k: values[k] for k in ("r1_gamma", "r2_gamma") if k in values}
    train = {"ema_kimg": values["ema_kimg"]} if "ema_kimg" in values else {}
    if not loss and not train:
        return cfg
    return cfg.model_copy(update={"loss": cfg.loss.model_copy(update=loss), "train": cfg.train.model_copy(update=train)})


def apply_to_modules(m: GanModules, cfg: GanConfig, step: int) -> None:
    """Set the scheduled learning rates and beta2 in the optimizers (with lazy-regularization scaling where it
    applies) and the scheduled probability in the augmentation pipeline, for ``step``."""
    values = scheduled_values(cfg, step)
    for net, optimizer in (("g", m.opt_g), ("d", m.opt_d)):
        ratio = lazy_ratio(cfg, net)
        for group in optimizer.param_groups:
            if f"{net}_lr" in values:
                group["lr"] = values[f"{net}_lr"] * ratio
            if "beta2" in values:
                group["betas"] = (group["betas"][0], values["beta2"] ** ratio)
    if "augment_p" in values and m.augment is not None:
        m.augment.p.fill_(values["augment_p"])

"""One discriminator step and one generator step, correct under DDP.

DDP all-reduces gradients of every parameter used in a DDP forward. So each step runs only the network
it trains through its DDP wrapper and calls the other one's bare module:

- D step: fakes come from the bare G under ``no_grad`` (no G graph, no G all-reduce); D runs through DDP.
- G step: D's parameters are frozen and D is called bare, so D gets no gradient, no all-reduce and no
  update; only G's gradients are averaged across ranks.

Penalties (WGAN-GP, R1) are computed in float32 outside autocast; their double backward goes through the
same single ``backward()`` as the adversarial loss, so DDP reduces once per step.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn

from gan_dist.config import GanConfig
from gan_dist.losses import discriminator_loss, generator_loss, gradient_penalty, r1_penalty
from gan_dist.train.modules import GanModules, bare

# Losses whose D output is a logit of "real": report D(x) as a probability, as the seeds do.
PROBABILITY_LOSSES = ("minimax", "nonsaturating")


def autocast_context(cfg: GanConfig, device: torch.device) -> contextlib.AbstractContextManager:
    if cfg.train.precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def ema_decay_at(step: int, decay: float) -> float:
    """EMA decay with warm-up: early on the average follows G closely instead of lagging its random init."""
    return min(decay, (1.0 + step) / (10.0 + step))


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model for parameters; buffers (BN statistics) are copied."""
    for e, p in zip(ema.parameters(), model.parameters(), strict=True):
        e.lerp_(p, 1.0 - decay)
    for e, b in zip(ema.buffers(), model.buffers(), strict=True):
        e.copy_(b)


def _score_mean(logits: Tensor, loss_name: str) -> Tensor:
    scores = torch.sigmoid(logits) if loss_name in PROBABILITY_LOSSES else logits
    return scores.detach().float().mean()


def discriminator_step(
    m: GanModules, cfg: GanConfig, real: Tensor, z: Tensor, d_step_index: int, device: torch.device
) -> dict[str, Tensor]:
    """One D update on a real batch and G(z). Returns detached scalar tensors (no host sync)."""
    loss_cfg = cfg.loss
    with torch.no_grad(), autocast_context(cfg, device):
        fake = bare(m.g)(z)
    with autocast_context(cfg, device):
        real_logits = m.d(real)
        fake_logits = m.d(fake)
        adv = discriminator_loss(loss_cfg.name, real_logits.float(), fake_logits.float())
    total = adv
    terms = {"losses/d_adv": adv.detach()}
    if loss_cfg.name == "wgan-gp":
        gp = gradient_penalty(m.d, real, fake.float())
        total = total + loss_cfg.gp_weight * gp
        terms["losses/d_gp"] = gp.detach()
    if loss_cfg.r1_gamma > 0 and d_step_index % loss_cfg.r1_every == 0:
        # Lazy R1 (StyleGAN2): applied every k steps with weight scaled by k.
        r1 = r1_penalty(m.d, real)
        total = total + (loss_cfg.r1_gamma / 2) * loss_cfg.r1_every * r1
        terms["losses/d_r1"] = r1.detach()
    m.opt_d.zero_grad(set_to_none=True)
    m.scaler_d.scale(total).backward()
    m.scaler_d.unscale_(m.opt_d)
    terms["optim/d_grad_norm"] = _grad_norm(m.d)
    m.scaler_d.step(m.opt_d)
    m.scaler_d.update()
    if loss_cfg.name == "wgan":
        with torch.no_grad():
            for p in bare(m.d).parameters():
                p.clamp_(-loss_cfg.clip, loss_cfg.clip)
    terms["losses/d"] = total.detach()
    terms["discriminator/real"] = _score_mean(real_logits, loss_cfg.name)
    terms["discriminator/fake"] = _score_mean(fake_logits, loss_cfg.name)
    return terms


def generator_step(m: GanModules, cfg: GanConfig, z: Tensor, step: int, device: torch.device) -> dict[str, Tensor]:
    """One G update through a frozen, bare D; then the EMA generator follows."""
    d_bare = bare(m.d)
    d_bare.requires_grad_(False)
    try:
        with autocast_context(cfg, device):
            fake_logits = d_bare(m.g(z))
            loss = generator_loss(cfg.loss.name, fake_logits.float())
        m.opt_g.zero_grad(set_to_none=True)
        m.scaler_g.scale(loss).backward()
    finally:
        d_bare.requires_grad_(True)
    m.scaler_g.unscale_(m.opt_g)
    grad_norm = _grad_norm(m.g)
    m.scaler_g.step(m.opt_g)
    m.scaler_g.update()
    update_ema(m.g_ema, bare(m.g), ema_decay_at(step, cfg.train.ema_decay))
    return {"losses/g": loss.detach(), "optim/g_grad_norm": grad_norm}


def _grad_norm(module: nn.Module) -> Tensor:
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if not grads:
        return torch.zeros((), device=next(module.parameters()).device)
    return torch.nn.utils.get_total_norm(grads)

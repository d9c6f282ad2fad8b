"""What a rank trains: G, D, the EMA generator, their optimizers and gradient scalers, built identically
on every rank and wrapped in DDP when there is more than one."""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from gan_dist.config import GanConfig
from gan_dist.models import build_discriminator, build_generator


@dataclass
class GanModules:
    """Everything a step mutates. ``g``/``d`` may be DDP-wrapped; ``g_ema`` never is."""

    g: nn.Module
    d: nn.Module
    g_ema: nn.Module
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    scaler_g: torch.amp.GradScaler
    scaler_d: torch.amp.GradScaler


def bare(module: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (or the module itself)."""
    return module.module if isinstance(module, DistributedDataParallel) else module


def build_modules(cfg: GanConfig, device: torch.device) -> GanModules:
    """G, D, EMA-G and their optimizers; G and D wrapped in DDP when there is more than one rank."""
    torch.manual_seed(cfg.train.seed)  # same init everywhere; DDP also broadcasts rank 0's weights
    res, ch = cfg.data.resolution, cfg.data.channels
    g = build_generator(cfg.model, res, ch)
    d = build_discriminator(cfg.model, res, ch)
    if cfg.train.sync_batchnorm:
        g, d = (torch.nn.SyncBatchNorm.convert_sync_batchnorm(m) for m in (g, d))
    g, d = g.to(device), d.to(device)
    g_ema = copy.deepcopy(g).eval().requires_grad_(False)
    # Ray Train sets up a process group even for one worker; DDP there would only add hooks and copies.
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        ids = [device.index] if device.type == "cuda" else None
        g, d = DistributedDataParallel(g, device_ids=ids), DistributedDataParallel(d, device_ids=ids)
    # One fused kernel per optimizer step on GPU instead of a launch per parameter tensor.
    adam = {"betas": cfg.optim.betas, "fused": True if device.type == "cuda" else None}
    fp16 = cfg.train.precision == "fp16"
    return GanModules(
        g=g,
        d=d,
        g_ema=g_ema,
        opt_g=torch.optim.Adam(g.parameters(), lr=cfg.optim.g_lr, **adam),
        opt_d=torch.optim.Adam(d.parameters(), lr=cfg.optim.d_lr, **adam),
        scaler_g=torch.amp.GradScaler(device.type, enabled=fp16),
        scaler_d=torch.amp.GradScaler(device.type, enabled=fp16),
    )


def parameter_digest(m: GanModules) -> str:
    """sha256 over G's and D's parameters: equal on every rank iff the DDP replicas are in sync."""
    h = hashlib.sha256()
    for module in (bare(m.g), bare(m.d)):
        for p in module.parameters():
            h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()

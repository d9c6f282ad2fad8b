"""What a rank trains: G, D, the EMA generator, their optimizers, schedules and gradient scalers, the
augmentation pipeline and the running regularizer state, built identically on every rank and wrapped in
DDP when there is more than one."""

from __future__ import annotations

import copy
import hashlib
import inspect
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parallel import DistributedDataParallel
from torch.optim.lr_scheduler import ConstantLR, CosineAnnealingLR, LinearLR, LRScheduler, SequentialLR, StepLR

from gan_dist.augment import AdaController, build_augment
from gan_dist.config import GanConfig, ScheduleConfig
from gan_dist.models import build_discriminator, build_generator


# torch 2.14 renamed DDP's broadcast_buffers (deprecated there) to forward_sync_buffers; earlier releases lack it.
NO_FORWARD_BUFFER_SYNC = (
    {"forward_sync_buffers": False}
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
    else {"broadcast_buffers": False}
)


@dataclass
class GanModules:
    """Everything a step mutates. ``g``/``d`` may be DDP-wrapped; ``g_ema`` never is."""

    g: nn.Module
    d: nn.Module
    g_ema: nn.Module
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    sched_g: LRScheduler
    sched_d: LRScheduler
    scaler_g: torch.amp.GradScaler
    scaler_d: torch.amp.GradScaler
    g_fast: nn.Module  # g and d as the adversarial passes call them: torch.compile'd with train.compile
    d_fast: nn.Module  # (the penalties' double backward cannot be compiled, so they call g and d)
    augment: nn.Module | None = None  # applied to every image D sees
    ada: AdaController | None = None  # adapts augment.p (ADA without a fixed p)
    pl_mean: torch.Tensor | None = None  # running path length (style-based G with the penalty on)


def bare(module: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (or the module itself)."""
    return module.module if isinstance(module, DistributedDataParallel) else module


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, total_steps: int) -> LRScheduler:
    """``cfg``'s schedule over ``total_steps`` optimizer steps: a linear warm-up, then constant/step/cosine."""
    after = max(1, total_steps - cfg.warmup_steps)
    if cfg.kind == "step":
        main: LRScheduler = StepLR(optimizer, step_size=cfg.step_every, gamma=cfg.gamma)
    elif cfg.kind == "cosine":
        base = optimizer.param_groups[0]["lr"]
        main = CosineAnnealingLR(optimizer, T_max=after, eta_min=base * cfg.min_ratio)
    else:
        main = ConstantLR(optimizer, factor=1.0, total_iters=0)
    if not cfg.warmup_steps:
        return main
    # The k-th step (from 0) runs at (k+1)/warmup of the rate: no step at a rate of exactly 0.
    warmup = LinearLR(optimizer, start_factor=1.0 / cfg.warmup_steps, total_iters=cfg.warmup_steps - 1)
    return SequentialLR(optimizer, [warmup, main], milestones=[cfg.warmup_steps])


def lazy_ratio(cfg: GanConfig, net: str) -> float:
    """StyleGAN2-ADA's ``mb_ratio`` for ``net`` ("g" or "d"): k/(k+1) for a style-based model whose penalty
    is lazy (path length for G, R1 for D, every k > 1 steps) with ``optim.lazy_reg_scaling``, else 1; Adam's
    lr is multiplied by it and each beta raised to it. StyleGAN2-ADA needs it because its penalties take
    optimizer steps of their own; here a due penalty joins the step's loss, so it is off by default."""
    d_penalized = cfg.loss.r1_gamma or cfg.loss.r2_gamma or cfg.schedules.r1_gamma or cfg.schedules.r2_gamma
    every, weight = (cfg.loss.pl_every, cfg.loss.pl_weight) if net == "g" else (cfg.loss.r1_every, d_penalized)
    if not (cfg.optim.lazy_reg_scaling and hasattr(cfg.model, "mapping_layers") and weight and every > 1):
        return 1.0
    return every / (every + 1)


def build_modules(cfg: GanConfig, device: torch.device) -> GanModules:
    """G, D, EMA-G, optimizers, schedules, scalers and augmentation; G and D in DDP above one rank."""
    # The same initial weights everywhere (DDP also broadcasts rank 0's); each rank's own random streams are
    # set after set-up (train.checkpoint.seed_rank_streams).
    torch.manual_seed(cfg.train.seed)
    res, ch = cfg.data.resolution, cfg.data.channels
    g = build_generator(cfg.model, res, ch)
    d = build_discriminator(cfg.model, res, ch, classify=cfg.loss.ac_weight > 0)
    if cfg.train.sync_batchnorm:
        g, d = (torch.nn.SyncBatchNorm.convert_sync_batchnorm(m) for m in (g, d))
    memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    g, d = g.to(device, memory_format=memory_format), d.to(device, memory_format=memory_format)
    g_ema = copy.deepcopy(g).eval().requires_grad_(False)
    # Ray Train sets up a process group even for one worker; DDP there would only add hooks and copies.
    # No buffer broadcast before every forward: the buffers are constants (FIR filters, fixed noise), kept equal
    # by the step itself (the mean style: all-reduced; spectral norm's vectors: the same power iterations on
    # the same weights, as every rank runs the same passes), or per rank by design (BatchNorm statistics).
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        ids = [device.index] if device.type == "cuda" else None
        g, d = (DistributedDataParallel(m, device_ids=ids, **NO_FORWARD_BUFFER_SYNC) for m in (g, d))
    # One fused kernel per optimizer step on GPU instead of a launch per parameter tensor.
    fused = True if device.type == "cuda" else None
    opt_g, opt_d = (
        torch.optim.Adam(net.parameters(), lr=lr * ratio, betas=tuple(b**ratio for b in cfg.optim.betas),
                         eps=cfg.optim.eps, fused=fused)
        for net, lr, ratio in ((g, cfg.optim.g_lr, lazy_ratio(cfg, "g")), (d, cfg.optim.d_lr, lazy_ratio(cfg, "d")))
    )  # fmt: skip
    fp16 = cfg.train.precision == "fp16"
    aug = cfg.augment
    options = {"policy": aug.policy} if aug.kind == "diffaug" else {}
    augment = build_augment(aug.kind, ch, **options)
    if augment is not None:
        augment = augment.to(device)
        if aug.kind == "ada" and aug.p is not None:
            augment.p.fill_(aug.p)
    adaptive = aug.kind == "ada" and aug.p is None and cfg.schedules.augment_p is None
    return GanModules(
        g=g,
        d=d,
        g_ema=g_ema,
        opt_g=opt_g,
        opt_d=opt_d,
        sched_g=build_scheduler(opt_g, cfg.optim.g_schedule, cfg.train.steps),
        sched_d=build_scheduler(opt_d, cfg.optim.d_schedule, cfg.train.steps * cfg.train.n_critic),
        scaler_g=torch.amp.GradScaler(device.type, enabled=fp16),
        scaler_d=torch.amp.GradScaler(device.type, enabled=fp16),
        g_fast=torch.compile(g) if cfg.train.compile else g,
        # Spectral norm updates its power-iteration vectors in place on every forward; a compiled D's backward
        # then finds the ones it saved changed by the next pass (D runs on reals, fakes and penalties before
        # one backward). Such a D stays eager; G is compiled all the same.
        d_fast=torch.compile(d) if cfg.train.compile and not getattr(cfg.model, "d_spectral_norm", False) else d,
        augment=augment,
        ada=AdaController(aug.target, aug.interval, aug.speed_kimg, batch_size=cfg.train.batch_size) if adaptive else None,
        pl_mean=torch.zeros((), device=device) if cfg.loss.pl_weight else None,
    )


def batchnorm_statistics(module: nn.Module) -> set[int]:
    """ids of the running-statistics buffers of the BatchNorm layers in ``module``."""
    return {id(b) for m in module.modules() if isinstance(m, _BatchNorm) for b in m.buffers(recurse=False)}


def replicated_tensors(m: GanModules) -> Iterator[torch.Tensor]:
    """Every tensor that must be identical on all ranks: the parameters and buffers of G, D and EMA-G, except
    the BatchNorm statistics of G and D (each rank's come from its own batches, and training never reads
    them: G and D run in training mode, samples come from EMA-G, whose statistics are recomputed)."""
    for module in (bare(m.g), bare(m.d)):
        per_rank = batchnorm_statistics(module)
        yield from module.parameters()
        yield from (b for b in module.buffers() if id(b) not in per_rank)
    yield from m.g_ema.parameters()
    yield from m.g_ema.buffers()


def parameter_digest(m: GanModules) -> str:
    """sha256 over the replicated tensors: equal on every rank iff the DDP replicas are in sync."""
    h = hashlib.sha256()
    for tensor in replicated_tensors(m):
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()

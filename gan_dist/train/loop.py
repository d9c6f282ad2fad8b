"""The per-worker training function that Ray Train runs on every rank.

Read top to bottom: build data, models and optimizers; restore from the latest checkpoint if any; run
``train.steps`` generator steps (each preceded by ``n_critic`` D steps); log from rank 0; checkpoint
through ``ray.train.report`` from every rank (only rank 0 attaches the files).
"""

from __future__ import annotations

import copy
import hashlib
import logging
import sys
import tempfile
import time
from typing import Any

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torchvision.utils import make_grid
from PIL import Image

from gan_dist.config import GanConfig
from gan_dist.data.loader import build_loader, to_float
from gan_dist.models import build_discriminator, build_generator
from gan_dist.tracking import MlflowTracker, NullTracker, Tracker
from gan_dist.train.checkpoint import load_checkpoint, save_checkpoint
from gan_dist.train.step import GanModules, bare, discriminator_step, generator_step


def progress_logger() -> logging.Logger:
    """Progress lines on stderr: Ray Train V2 echoes a worker's stdout twice, its stderr once."""
    log = logging.getLogger("gan_dist.progress")
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[gan_dist] %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    return log


def build_modules(cfg: GanConfig, device: torch.device) -> GanModules:
    """G, D, EMA-G and their optimizers; G and D wrapped in DDP when a process group exists."""
    torch.manual_seed(cfg.train.seed)  # same init everywhere; DDP also broadcasts rank 0's weights
    res, ch = cfg.data.resolution, cfg.data.channels
    g = build_generator(cfg.model, res, ch)
    d = build_discriminator(cfg.model, res, ch)
    if cfg.train.sync_batchnorm:
        g, d = (torch.nn.SyncBatchNorm.convert_sync_batchnorm(m) for m in (g, d))
    g, d = g.to(device), d.to(device)
    g_ema = copy.deepcopy(g).eval().requires_grad_(False)
    if dist.is_available() and dist.is_initialized():
        ids = [device.index] if device.type == "cuda" else None
        g, d = DistributedDataParallel(g, device_ids=ids), DistributedDataParallel(d, device_ids=ids)
    betas = cfg.optim.betas
    fp16 = cfg.train.precision == "fp16"
    return GanModules(
        g=g,
        d=d,
        g_ema=g_ema,
        opt_g=torch.optim.Adam(g.parameters(), lr=cfg.optim.g_lr, betas=betas),
        opt_d=torch.optim.Adam(d.parameters(), lr=cfg.optim.d_lr, betas=betas),
        scaler_g=torch.amp.GradScaler(device.type, enabled=fp16),
        scaler_d=torch.amp.GradScaler(device.type, enabled=fp16),
    )


def training_state(m: GanModules, cfg: GanConfig, step: int, rng_states: list[dict], run_id: str | None) -> dict:
    return {
        "g": bare(m.g).state_dict(),
        "d": bare(m.d).state_dict(),
        "g_ema": m.g_ema.state_dict(),
        "opt_g": m.opt_g.state_dict(),
        "opt_d": m.opt_d.state_dict(),
        "scaler_g": m.scaler_g.state_dict(),
        "scaler_d": m.scaler_d.state_dict(),
        "step": step,
        "rng": rng_states,
        "mlflow_run_id": run_id,
        "config": cfg.model_dump(mode="json"),
    }


def restore(m: GanModules, state: dict[str, Any]) -> None:
    bare(m.g).load_state_dict(state["g"])
    bare(m.d).load_state_dict(state["d"])
    m.g_ema.load_state_dict(state["g_ema"])
    m.opt_g.load_state_dict(state["opt_g"])
    m.opt_d.load_state_dict(state["opt_d"])
    m.scaler_g.load_state_dict(state["scaler_g"])
    m.scaler_d.load_state_dict(state["scaler_d"])


def parameter_digest(m: GanModules) -> str:
    """sha256 over G's and D's parameters: equal on every rank iff the DDP replicas are in sync."""
    h = hashlib.sha256()
    for module in (bare(m.g), bare(m.d)):
        for p in module.parameters():
            h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def sample_grid(g_ema: torch.nn.Module, z: torch.Tensor) -> Image.Image:
    with torch.no_grad():
        images = g_ema(z).float().cpu()
    grid = make_grid(images, nrow=int(len(images) ** 0.5), normalize=True, value_range=(-1, 1))
    return Image.fromarray(grid.mul(255).round().byte().permute(1, 2, 0).numpy())


def _all_gather(obj: Any, world: int) -> list[Any]:
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


def _mean_across_ranks(sums: dict[str, torch.Tensor], counts: dict[str, int], world: int) -> dict[str, float]:
    """Window means, averaged over ranks: one all-reduce (one host sync) per log interval."""
    keys = sorted(sums)
    stacked = torch.stack([sums[k].float() / counts[k] for k in keys])
    if world > 1:
        dist.all_reduce(stacked)
        stacked /= world
    return dict(zip(keys, stacked.tolist()))


def _format_eta(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def train_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point (``train_loop_per_worker``)."""
    cfg = GanConfig.model_validate(config)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    m = build_modules(cfg, device)

    start_step, run_id = 0, None
    checkpoint = ray.train.get_checkpoint()
    noise = torch.Generator(device=device)
    noise.manual_seed(cfg.train.seed * 100_003 + rank)  # different noise on each rank, reproducible
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            state = load_checkpoint(ckpt_dir, map_location=device)
        restore(m, state)
        start_step, run_id = state["step"], state["mlflow_run_id"]
        if len(state["rng"]) == world:  # same world size: continue each rank's noise stream exactly
            noise.set_state(state["rng"][rank]["noise"].cpu())

    tracker: Tracker = NullTracker()
    if rank == 0:
        tracker = MlflowTracker(cfg, run_id)
        if start_step:
            progress_logger().info("resumed run '%s' at step %d", cfg.run.name, start_step)
    fixed_z = torch.randn(cfg.train.sample_grid, cfg.model.z_dim, generator=torch.Generator().manual_seed(cfg.train.seed))
    fixed_z = fixed_z.to(device)

    batch = cfg.per_worker_batch()
    data = build_loader(cfg, rank, world)
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    window_start, window_steps, d_steps = time.perf_counter(), 0, start_step * cfg.train.n_critic
    status = "FAILED"
    try:
        for step in range(start_step, cfg.train.steps):
            for _ in range(cfg.train.n_critic):
                real = to_float(next(data), device)
                z = torch.randn(batch, cfg.model.z_dim, device=device, generator=noise)
                terms = discriminator_step(m, cfg, real, z, d_steps, device)
                d_steps += 1
            z = torch.randn(batch, cfg.model.z_dim, device=device, generator=noise)
            terms.update(generator_step(m, cfg, z, step, device))
            for k, v in terms.items():  # lazy terms (R1) appear on some steps only: count per key
                sums[k] = sums.get(k, 0) + v
                counts[k] = counts.get(k, 0) + 1
            window_steps += 1
            done = step + 1

            if done % cfg.train.log_every == 0 or done == cfg.train.steps:
                metrics = _mean_across_ranks(sums, counts, world)
                elapsed = time.perf_counter() - window_start
                metrics["images_per_sec"] = window_steps * cfg.train.n_critic * cfg.train.batch_size / elapsed
                metrics["lr_g"] = m.opt_g.param_groups[0]["lr"]
                metrics["lr_d"] = m.opt_d.param_groups[0]["lr"]
                tracker.log_metrics(metrics, step=done)
                if rank == 0:
                    eta = (cfg.train.steps - done) * elapsed / window_steps
                    progress_logger().info(
                        f"step {done}/{cfg.train.steps} | d_loss {metrics['d_loss']:.4f} "
                        f"g_loss {metrics['g_loss']:.4f} | D(x) {metrics['d_real']:.3f} "
                        f"D(G(z)) {metrics['d_fake']:.3f} | {metrics['images_per_sec']:.0f} img/s | "
                        f"ETA {_format_eta(eta)}"
                    )
                sums, counts, window_start, window_steps = {}, {}, time.perf_counter(), 0

            if rank == 0 and (done % cfg.train.sample_every == 0 or done == cfg.train.steps):
                tracker.log_image(sample_grid(m.g_ema, fixed_z), key="samples", step=done)

            if done % cfg.checkpoint.every == 0 or done == cfg.train.steps:
                _report_checkpoint(m, cfg, done, rank, world, noise, tracker.run_id, data.skipped)
        status = "FINISHED"
    finally:
        tracker.finish(status)


def _report_checkpoint(
    m: GanModules,
    cfg: GanConfig,
    step: int,
    rank: int,
    world: int,
    noise: torch.Generator,
    run_id: str | None,
    skipped: int,
) -> None:
    """Every rank reports (Ray requires it); rank 0 attaches the checkpoint files."""
    rng = _all_gather({"noise": noise.get_state()}, world)
    digests = _all_gather(parameter_digest(m), world)
    steps = _all_gather(step, world)
    skipped_total = sum(_all_gather(skipped, world))
    if len(set(digests)) != 1:
        raise RuntimeError(f"DDP replicas diverged at step {step}: parameter digests {digests}")
    metrics = {"step": step, "rank_steps": steps, "param_digests": digests, "mlflow_run_id": run_id or ""}
    metrics["data_skipped"] = skipped_total
    if rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(tmp, training_state(m, cfg, step, rng, run_id))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))

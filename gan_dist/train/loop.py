"""The per-worker training function that Ray Train runs on every rank.

Read top to bottom: build models and optimizers; restore the latest checkpoint (Ray's, after a restart or
on a same-name rerun, else ``checkpoint.resume_from``); run ``train.steps`` generator steps (each after
``n_critic`` D steps); log from rank 0; checkpoint through ``ray.train.report`` from every rank (only rank
0 attaches files). A resumed run continues the data stream, every RNG and the MLflow run exactly where the
checkpoint left them, so on CPU it ends bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import sys
import tempfile
import time
from typing import Any

import pyarrow.fs
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from PIL import Image
from torch.nn.parallel import DistributedDataParallel

from gan_dist.config import GanConfig
from gan_dist.data.images import image_grid, to_uint8
from gan_dist.data.loader import build_loader, to_float
from gan_dist.evaluate import evaluate_generator_distributed, real_statistics
from gan_dist.metrics.features import build_extractor
from gan_dist.models import build_discriminator, build_generator
from gan_dist import storage
from gan_dist.storage import pyarrow_filesystem
from gan_dist.tracking import MlflowTracker, NullTracker, Tracker
from gan_dist.train.checkpoint import (
    capture_rng,
    export_generator,
    load_checkpoint,
    restore_modules,
    restore_rng,
    save_checkpoint,
    training_state,
)
from gan_dist.train.step import GanModules, bare, discriminator_step, generator_step


class NonFiniteLoss(RuntimeError):
    """Raised on the driver when a run stopped on NaN/Inf losses."""


STOP_MARKER = "stopped.json"


def stop_marker_url(cfg: GanConfig) -> str:
    """Where rank 0 records why a run stopped early (Ray's result only carries checkpointed metrics)."""
    return storage.join(storage.join(cfg.checkpoint.storage, cfg.run.name), STOP_MARKER)


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


def sample_grid(g_ema: torch.nn.Module, z: torch.Tensor) -> Image.Image:
    with torch.no_grad():
        return image_grid(to_uint8(g_ema(z)))


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


def _resume_state(cfg: GanConfig, device: torch.device) -> dict[str, Any] | None:
    """Ray's latest checkpoint of this run (restart or same-name rerun), else ``checkpoint.resume_from``."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None and cfg.checkpoint.resume_from:
        fs, path = pyarrow_filesystem(cfg.checkpoint.resume_from, cfg.storage)
        checkpoint = ray.train.Checkpoint(path=path, filesystem=fs)
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as ckpt_dir:
        return load_checkpoint(ckpt_dir, map_location=device)


CHAOS_ENV = "GAN_DIST_CHAOS_FILE"


def _chaos_step(run_name: str, rank: int) -> int | None:
    """Fault drill: if $GAN_DIST_CHAOS_FILE names a JSON file {"run": NAME, "rank": R, "step": S}, rank R
    of run NAME dies (os._exit) after step S, once: the file is removed first. Read once per worker start."""
    path = os.environ.get(CHAOS_ENV)
    if not path or not os.path.isfile(path):
        return None
    with open(path) as f:
        plan = json.load(f)
    return int(plan["step"]) if plan.get("run") == run_name and int(plan.get("rank", 0)) == rank else None


def _cpu_copy(state: dict[str, Any]) -> dict[str, Any]:
    """A snapshot of ``state`` in host memory, for rolling back: state dicts alias the live parameters and
    optimizer moments, and a copy kept on the GPU would double their memory there."""
    return _to_cpu({k: v for k, v in state.items() if k != "config"})


def _to_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if type(value) in (list, tuple):
        return type(value)(_to_cpu(v) for v in value)
    return copy.deepcopy(value)


def train_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point (``train_loop_per_worker``)."""
    cfg = GanConfig.model_validate(config)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    m = build_modules(cfg, device)
    noise = torch.Generator(device=device)
    noise.manual_seed(cfg.train.seed * 100_003 + rank)  # different noise on each rank, reproducible

    step, data_batches, skipped_before, run_id = 0, 0, 0, None
    resumed = _resume_state(cfg, device)
    if resumed is not None:
        restore_modules(m, resumed)
        step, data_batches = resumed["step"], resumed["data_batches"]
        skipped_before = resumed["data_skipped"]  # the loader counts from its start_batch on
        if resumed["config"]["run"]["name"] == cfg.run.name:  # fine-tuning into a new name opens a new run
            run_id = resumed["mlflow_run_id"]
        if len(resumed["rng"]) == world:  # same world size: continue each rank's random streams exactly
            restore_rng(resumed["rng"][rank], noise)

    num_nodes = len(set(_all_gather(ray.get_runtime_context().get_node_id(), world)))
    tracker: Tracker = NullTracker()
    if rank == 0:
        tracker = MlflowTracker(cfg, run_id)
        tracker.log_cluster(world_size=world, num_nodes=num_nodes, gpus=world if cfg.scaling.use_gpu else 0)
        if step:
            progress_logger().info("resumed run '%s' at step %d", cfg.run.name, step)
    fixed_z = torch.randn(cfg.train.sample_grid, cfg.model.z_dim, generator=torch.Generator().manual_seed(cfg.train.seed))
    fixed_z = fixed_z.to(device)

    extractor = real_stats = None
    if cfg.eval.every:  # every rank, together: the real-data statistics are computed sharded (and cached)
        extractor = build_extractor(cfg.eval, device)
        cache = storage.join(storage.join(cfg.checkpoint.storage, cfg.run.name), "eval-cache")
        real_stats = real_statistics(
            cfg.data.url, cfg.storage, extractor, cfg.data.resolution, cfg.data.channels, cfg.eval.num_images,
            cache, cfg.eval.batch_size, rank, world, device,
        )

    batch = cfg.per_worker_batch()
    data = build_loader(cfg, rank, world, start_batch=data_batches)
    last_good = _cpu_copy(resumed or {"step": 0, **training_state(m)})
    rollbacks = 0
    crash_after = _chaos_step(cfg.run.name, rank)
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    window_start, window_steps, data_wait = time.perf_counter(), 0, 0.0
    status, stop_reason = "FAILED", ""
    try:
        while step < cfg.train.steps:
            for k in range(cfg.train.n_critic):
                wait_start = time.perf_counter()
                real = to_float(next(data), device)
                data_wait += time.perf_counter() - wait_start
                if data_batches == 0 and rank == 0:  # a fresh run shows what it learns from, once
                    tracker.log_image(image_grid(to_uint8(real[: cfg.train.sample_grid])), key="real_samples", step=0)
                data_batches += 1
                z = torch.randn(batch, cfg.model.z_dim, device=device, generator=noise)
                terms = discriminator_step(m, cfg, real, z, step * cfg.train.n_critic + k, device)
            z = torch.randn(batch, cfg.model.z_dim, device=device, generator=noise)
            terms.update(generator_step(m, cfg, z, step, device))
            for key, value in terms.items():  # lazy terms (R1) appear on some steps only: count per key
                sums[key] = sums.get(key, 0) + value
                counts[key] = counts.get(key, 0) + 1
            window_steps += 1
            step += 1
            if step == crash_after:
                os.remove(os.environ[CHAOS_ENV])
                progress_logger().warning("chaos drill: rank %d exits after step %d", rank, step)
                os._exit(3)
            log_now = step % cfg.train.log_every == 0 or step == cfg.train.steps
            save_now = step % cfg.checkpoint.every == 0 or step == cfg.train.steps

            if log_now or save_now:
                metrics = _mean_across_ranks(sums, counts, world)  # identical on all ranks: same decision
                if not all(math.isfinite(v) for v in metrics.values()):
                    bad = sorted(k for k, v in metrics.items() if not math.isfinite(v))
                    if cfg.train.nan_action == "stop" or rollbacks >= cfg.train.max_rollbacks:
                        stop_reason = f"non-finite {', '.join(bad)} at step {step}"
                        break
                    rollbacks += 1
                    restore_modules(m, last_good)
                    step = last_good["step"]
                    noise.manual_seed(cfg.train.seed * 100_003 + rank + 7919 * rollbacks)  # a different path
                    progress_logger().warning("non-finite %s: rolled back to step %d (%d)", bad, step, rollbacks)
                    sums, counts, window_start, window_steps, data_wait = {}, {}, time.perf_counter(), 0, 0.0
                    continue

            if log_now:
                elapsed = time.perf_counter() - window_start
                metrics["images_per_sec"] = window_steps * cfg.train.n_critic * cfg.train.batch_size / elapsed
                metrics["lr_g"] = m.opt_g.param_groups[0]["lr"]
                metrics["lr_d"] = m.opt_d.param_groups[0]["lr"]
                metrics["nan_rollbacks"] = rollbacks
                metrics["data_wait_fraction"] = data_wait / elapsed  # rank 0's share of time spent waiting
                metrics["data_skipped"] = skipped_before + data.skipped  # rank 0's running total
                if device.type == "cuda":
                    metrics["gpu_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
                tracker.log_metrics(metrics, step=step)
                if rank == 0:
                    eta = (cfg.train.steps - step) * elapsed / window_steps
                    progress_logger().info(
                        f"step {step}/{cfg.train.steps} | d_loss {metrics['d_loss']:.4f} "
                        f"g_loss {metrics['g_loss']:.4f} | D(x) {metrics['d_real']:.3f} "
                        f"D(G(z)) {metrics['d_fake']:.3f} | {metrics['images_per_sec']:.0f} img/s | "
                        f"ETA {_format_eta(eta)}"
                    )
                sums, counts, window_start, window_steps, data_wait = {}, {}, time.perf_counter(), 0, 0.0

            if rank == 0 and (step % cfg.train.sample_every == 0 or step == cfg.train.steps):
                tracker.log_image(sample_grid(m.g_ema, fixed_z), key="samples", step=step)

            if extractor is not None and (step % cfg.eval.every == 0 or step == cfg.train.steps):
                scores = evaluate_generator_distributed(
                    m.g_ema, cfg.model.z_dim, extractor, real_stats, cfg.eval.num_images, cfg.eval.batch_size,
                    rank, world, device, seed=cfg.train.seed,
                )
                if scores is not None:  # rank 0
                    tracker.log_metrics({f"eval/{k}": v for k, v in scores.items()}, step=step)
                    progress_logger().info("step %d | %s", step, " ".join(f"{k} {v:.4g}" for k, v in scores.items()))

            if save_now:
                state = training_state(
                    m,
                    step=step,
                    data_batches=data_batches,
                    data_skipped=skipped_before + sum(_all_gather(data.skipped, world)),
                    samples_seen=data_batches * cfg.train.batch_size,
                    rng=_all_gather(capture_rng(noise), world),
                    mlflow_run_id=tracker.run_id,
                    config=cfg.model_dump(mode="json"),
                )
                last_good = _cpu_copy(state)
                _report_checkpoint(state, m, cfg, rank, world)
        status = "FINISHED"
        if rank == 0 and not stop_reason:
            _log_generator(tracker, m, cfg, step)
    finally:
        tracker.finish(status if not stop_reason else "FAILED")
    if stop_reason:
        progress_logger().error("stopping: %s", stop_reason)
        if rank == 0:
            marker = {"step": step, "reason": stop_reason, "mlflow_run_id": tracker.run_id}
            storage.write_bytes(stop_marker_url(cfg), json.dumps(marker).encode(), cfg.storage)


def _report_checkpoint(state: dict[str, Any], m: GanModules, cfg: GanConfig, rank: int, world: int) -> None:
    """Every rank reports (Ray requires it); rank 0 attaches the checkpoint files."""
    step = state["step"]
    digests = _all_gather(parameter_digest(m), world)
    if len(set(digests)) != 1:
        raise RuntimeError(f"DDP replicas diverged at step {step}: parameter digests {digests}")
    metrics = {
        "step": step,
        "rank_steps": _all_gather(step, world),
        "param_digests": digests,
        "data_skipped": state["data_skipped"],
        "mlflow_run_id": state["mlflow_run_id"] or "",
    }
    if rank != 0:
        ray.train.report(metrics)
        return
    local = tempfile.mkdtemp(prefix="gan_dist_ckpt_")  # Ray deletes it once uploaded
    save_checkpoint(local, state)
    name = f"step-{step:09d}"
    if cfg.checkpoint.keep_every and step % cfg.checkpoint.keep_every == 0:
        _archive(local, cfg, name)
    mode = ray.train.CheckpointUploadMode.ASYNC if cfg.checkpoint.async_upload else ray.train.CheckpointUploadMode.SYNC
    ray.train.report(
        metrics,
        checkpoint=ray.train.Checkpoint.from_directory(local),
        checkpoint_dir_name=name,
        checkpoint_upload_mode=mode,
        delete_local_checkpoint_after_upload=True,
    )


def _log_generator(tracker: Tracker, m: GanModules, cfg: GanConfig, step: int) -> None:
    """The final EMA generator as an MLflow model (optionally registered); bounded wait inside the tracker."""
    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(tmp, training_state(m, step=step, config=cfg.model_dump(mode="json")))
        exported = export_generator(tmp, f"{tmp}/generator.pt")
        tracker.log_generator(exported, register_as=cfg.tracking.register_model)


def _archive(local_dir: str, cfg: GanConfig, name: str) -> None:
    """Copy a checkpoint to ``<storage>/<run>/archive/<name>``, outside Ray's ``num_to_keep`` retention."""
    fs, root = pyarrow_filesystem(cfg.checkpoint.storage, cfg.storage)
    dest = f"{root.rstrip('/')}/{cfg.run.name}/archive/{name}"
    fs = fs or pyarrow.fs.LocalFileSystem()
    fs.create_dir(dest, recursive=True)
    pyarrow.fs.copy_files(local_dir, dest, destination_filesystem=fs)

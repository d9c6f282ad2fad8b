"""The per-worker function Ray Train runs on every rank: set up, then a short loop of steps and phases.

A resumed run continues the data stream, every RNG and the MLflow run exactly where the checkpoint left
them, so on CPU it ends bit-identical to an uninterrupted one. Only rank 0 logs and writes checkpoint files;
every rank reports to Ray Train.
"""

from __future__ import annotations

import json
import os
import signal
import time
from typing import Any

import ray.train
import ray.train.torch
import torch

from gan_dist import storage
from gan_dist.config import GanConfig
from gan_dist.data.images import image_grid, to_uint8
from gan_dist.data.loader import build_loader, start_worker_server, to_float
from gan_dist.data.plan import DataPosition, rank_batch
from gan_dist.metrics.runner import build_extractor, real_statistics
from gan_dist.models.io import read_state
from gan_dist.storage import pyarrow_filesystem
from gan_dist.tracking.experiment import mlflow_run_name
from gan_dist.tracking.tracker import MlflowTracker, NullTracker, Tracker
from gan_dist.train.checkpoint import restore_modules, restore_weights, seed_rank_streams, training_state
from gan_dist.train.modules import GanModules, build_modules
from gan_dist.train.phases import (
    Evaluation,
    checkpoint_on_request,
    StopTraining,
    Worker,
    all_gather,
    handle_nonfinite,
    host_copy,
    log_final_generator,
    maybe_checkpoint,
    maybe_evaluate,
    maybe_log,
    maybe_sample,
    record_stop,
    window_metrics,
)
from gan_dist.train.progress import ProgressChannel, progress_logger  # gan_dist console: rank 0 -> driver
from gan_dist.train.stop import StopWatch
from gan_dist.train.schedules import apply_to_modules, config_at
from gan_dist.train.step import DiscriminatorBatch, discriminator_step, generator_step

CHAOS_ENV = "GAN_DIST_CHAOS_FILE"


def train_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point (``train_loop_per_worker``)."""
    w = start_worker(GanConfig.model_validate(config))
    drill = _fault_drill(w.cfg.run.name, w.rank)
    status = "FAILED"
    try:
        while w.step < w.cfg.train.steps:
            train_step(w)
            w.step += 1
            if drill and w.step == drill["step"]:
                _inject_fault(w, drill.get("fault", "exit"))
                drill = None
            metrics = window_metrics(w)
            if metrics is not None and handle_nonfinite(w, metrics):
                continue
            maybe_log(w, metrics)
            maybe_sample(w)
            maybe_evaluate(w)
            if reason := w.stop.poll(w.step):
                checkpoint_on_request(w, reason)
            maybe_checkpoint(w)
        if w.rank == 0:
            log_final_generator(w)
        status = "FINISHED"
    except StopTraining as stop:
        status = stop.status
        record_stop(w, stop)
    finally:
        try:
            w.tracker.finish(status)
        finally:
            w.stop.close()  # SIGTERM is Ray's again: with training over, it must end the process at once


def train_step(w: Worker) -> None:
    """``n_critic`` D steps, each on the next real batch, then one G step; every step's terms to the window.

    A conditional model draws its fakes for the classes of the real batch (so fakes follow the data's class
    distribution); the G step reuses the last real batch's classes (and, for a relativistic loss, its images).
    Scheduled knobs (``schedules.*``) take their values for this step first."""
    cfg, batch = config_at(w.cfg, w.step), rank_batch(w.cfg.train.batch_size, w.world, w.rank)
    apply_to_modules(w.m, w.cfg, w.step)
    labels = None
    for k in range(cfg.train.n_critic):
        fresh = w.data.position.batches == 0
        wait_start = time.perf_counter()
        data = next(w.data)
        real = to_float(data.images, w.device)
        if cfg.train.channels_last:
            real = real.contiguous(memory_format=torch.channels_last)
        if cfg.model.conditional:
            labels = data.labels.to(w.device, non_blocking=True)
        w.window.data_wait += time.perf_counter() - wait_start
        if fresh and w.rank == 0:  # a fresh run shows what it learns from, once
            w.tracker.log_image(image_grid(to_uint8(real[: cfg.train.sample_grid])), key="real_samples", step=0)
        z = torch.randn(batch, cfg.model.z_dim, device=w.device, generator=w.noise)
        gp_eps = torch.rand(batch, device=w.device, generator=w.noise) if cfg.loss.name == "wgan-gp" else None
        index = w.step * cfg.train.n_critic + k
        d_batch = DiscriminatorBatch(real, z, gp_eps, labels)
        w.window.add(discriminator_step(w.m, cfg, d_batch, index))
        if cfg.data.audit:
            w.audit.append((w.step, w.data.keys))
        if w.m.ada is not None and (index + 1) % cfg.augment.interval == 0:
            w.augment_stats = w.m.ada.update(w.m.augment)  # one host sync per interval
    z = torch.randn(batch, cfg.model.z_dim, device=w.device, generator=w.noise)
    w.window.add(generator_step(w.m, cfg, d_batch.then_generator(z), w.step))
    w.window.steps += 1


def start_worker(cfg: GanConfig) -> Worker:
    """Build this rank's models, restore the run's latest state, open tracking, evaluation and data."""
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    start_worker_server(cfg)
    device = ray.train.torch.get_device()
    m = build_modules(cfg, device)
    noise = torch.Generator(device=device)  # this rank's latents and mixing weights; seeded last, below
    step = skipped_before = 0
    run_id, position = None, DataPosition()
    resumed, source = _resume_state(cfg, device)
    if source == "finetune":  # the weights, on a fresh step count and data stream
        restore_weights(m, resumed)
        resumed = None
    if resumed is not None:
        configured = [[{k: g[k] for k in ("initial_lr", "betas", "eps")} for g in o.param_groups] for o in (m.opt_g, m.opt_d)]
        restore_modules(m, resumed)
        if source == "continue":  # another run's state, under this run's optimizer settings (a PBT trial's own)
            _use_configured_rates(m, configured)
        step, skipped_before = resumed["step"], resumed["data_skipped"]
        # A checkpoint from before data positions existed continues the stream at its batch count.
        position = DataPosition.from_state(resumed.get("data_position", {"batches": resumed["data_batches"],
                                                                         "layouts": []}))  # fmt: skip
        # Continuing into another MLflow run (a new run name, a sweep trial taking over another's state) opens it.
        if mlflow_run_name(resumed["config"]) == mlflow_run_name(cfg.model_dump(mode="json")):
            run_id = resumed["mlflow_run_id"]
    data = build_loader(cfg, rank, world, position)
    tracker = _open_tracker(cfg, rank, world, run_id, step)
    progress = ProgressChannel.connect(cfg, rank)  # gan_dist console: the driver's live view and Ctrl-C
    progress.started(step, world, tracker)
    fixed_z = torch.randn(cfg.train.sample_grid, cfg.model.z_dim, generator=torch.Generator().manual_seed(cfg.train.seed))
    evaluation = _start_evaluation(cfg, rank, world, device)
    # Last, because setting up tracking, evaluation and data may draw from the global RNG.
    seed_rank_streams(noise, cfg.train.seed, rank, world, step, resumed["rng"] if resumed is not None else None)
    w = Worker(
        cfg=cfg, rank=rank, world=world, device=device, m=m, noise=noise, tracker=tracker, data=data,
        stop=StopWatch(rank, world, cfg.train.preempt_grace_s, user_stop=progress.stop_requested), progress=progress,
        fixed_z=fixed_z.to(device),
        class_names=list(data.plan.class_names), class_counts=list(data.plan.class_counts),
        evaluation=evaluation,
        last_good=host_copy(resumed or {"step": 0, **training_state(m)}),
        step=step, skipped_before=skipped_before, attempt=all_gather(time.time_ns() // 10**6, world)[0],
    )  # fmt: skip
    if source == "continue":  # another run's whole state: this run's first checkpoint is the state it took over
        maybe_checkpoint(w, now=True)
    return w


def _resume_state(cfg: GanConfig, device: torch.device) -> tuple[dict[str, Any] | None, str | None]:
    """The state to start from and what to take of it: Ray's latest checkpoint of this run (a restart or a
    same-name rerun: "run", all of it), else ``checkpoint.resume_from`` (its ``resume_mode``: "continue", all of it,
    or "finetune", the weights only)."""
    checkpoint, source = ray.train.get_checkpoint(), "run"
    if checkpoint is None and cfg.checkpoint.resume_from:
        fs, path = pyarrow_filesystem(cfg.checkpoint.resume_from, cfg.storage)
        checkpoint = ray.train.Checkpoint(path=path, filesystem=fs)
        source = cfg.checkpoint.resume_mode
    if checkpoint is None:
        return None, None
    with checkpoint.as_directory() as ckpt_dir:
        return read_state(ckpt_dir, map_location=device), source


def _use_configured_rates(m: GanModules, configured: list[list[dict[str, Any]]]) -> None:
    """After restoring a state: the Adam moments and the schedules' positions stay, the base learning rates, betas
    and eps become ``configured`` (the fresh optimizers'). Every schedule here is the base rate times a function
    of the step, so scaling the current rate (and the schedules' bases) by new / old base puts it where this
    run's schedule has it at this step."""
    for optimizer, schedule, groups in ((m.opt_g, m.sched_g, configured[0]), (m.opt_d, m.sched_d, configured[1])):
        ratios = [want["initial_lr"] / group["initial_lr"] for group, want in zip(optimizer.param_groups, groups)]
        for group, want, ratio in zip(optimizer.param_groups, groups, ratios):
            group.update(want, lr=group["lr"] * ratio)
        for part in getattr(schedule, "_schedulers", [schedule]):  # SequentialLR: the warm-up and the main one
            part.base_lrs = [lr * ratio for lr, ratio in zip(part.base_lrs, ratios)]
            if hasattr(part, "eta_min"):  # cosine's floor: base x min_ratio
                part.eta_min *= ratios[0]


def _open_tracker(cfg: GanConfig, rank: int, world: int, run_id: str | None, step: int) -> Tracker:
    """Rank 0 logs to MLflow (continuing ``run_id`` if given); the other ranks log nothing."""
    num_nodes = len(set(all_gather(ray.get_runtime_context().get_node_id(), world)))  # every rank takes part
    if rank != 0:
        return NullTracker()
    tracker = MlflowTracker(cfg, run_id)
    tracker.log_cluster(world_size=world, num_nodes=num_nodes, gpus=world if cfg.scaling.use_gpu else 0)
    if step:
        progress_logger().info("resumed run '%s' at step %d", cfg.run.name, step)
    return tracker


def _start_evaluation(cfg: GanConfig, rank: int, world: int, device: torch.device) -> Evaluation | None:
    """The feature extractor and (on rank 0) the real-data statistics, computed sharded by every rank once
    and cached in the checkpoint storage, for every run there (a sweep's trials share its root's)."""
    if not cfg.eval.every:
        return None
    extractor = build_extractor(cfg.eval, device)
    cache = storage.join(cfg.checkpoint.storage, "eval-cache")  # keyed by data, extractor and count: shareable
    real_stats = real_statistics(
        cfg.data.url, cfg.storage, extractor, cfg.data.resolution, cfg.data.channels, cfg.eval.num_images,
        cache, cfg.eval.batch_size, rank, world, device, per_class=cfg.eval.per_class if cfg.model.conditional else 0,
    )  # fmt: skip
    return Evaluation(extractor, real_stats)


def _fault_drill(run_name: str, rank: int) -> dict[str, Any] | None:
    """Fault drill: if $GAN_DIST_CHAOS_FILE names a JSON file {"run": NAME, "rank": R, "step": S, "fault": F},
    rank R of run NAME suffers fault F after step S, once (the file is removed when it fires): "exit" (the
    default) kills the process, "nan" poisons a parameter of D, "raise" raises an exception in the training
    function, "sigterm" sends the process SIGTERM. Read once per worker start."""
    path = os.environ.get(CHAOS_ENV)
    if not path or not os.path.isfile(path):
        return None
    with open(path) as f:
        plan = json.load(f)
    return plan if plan.get("run") == run_name and int(plan.get("rank", 0)) == rank else None


def _inject_fault(w: Worker, fault: str) -> None:
    os.remove(os.environ[CHAOS_ENV])
    progress_logger().warning("fault drill: rank %d, %s after step %d", w.rank, fault, w.step)
    if fault == "sigterm":  # what an eviction sends; the rank then checkpoints this step and exits
        os.kill(os.getpid(), signal.SIGTERM)
        w.stop.wait_for_sigterm()
    elif fault == "nan":
        with torch.no_grad():
            next(w.m.d.parameters()).fill_(float("nan"))
    elif fault == "raise":
        raise RuntimeError(f"fault drill: an exception in rank {w.rank} after step {w.step}")
    else:
        os._exit(3)

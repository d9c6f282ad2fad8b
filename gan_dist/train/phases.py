"""The phases of the training loop after each step: what is logged, sampled, evaluated and checkpointed when,
and what happens on a non-finite loss. Each is a small function of the worker's state (``Worker``).

Decisions that need every rank (checkpoint, evaluation, rollback) depend only on values that are identical on
all ranks (the step, and metrics averaged across ranks), so every rank takes the same branch.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import pyarrow.fs
import ray.train
import torch
import torch.distributed as dist
from PIL import Image

from gan_dist import storage
from gan_dist.config import GanConfig
from gan_dist.data.images import image_grid, labelled_rows, to_uint8
from gan_dist.data.loader import BatchIterator
from gan_dist.metrics.extractors import FeatureExtractor
from gan_dist.metrics.classifier import ClassifierExtractor
from gan_dist.metrics.runner import RealStats, build_mode_classifier, evaluate_generator_distributed
from gan_dist.models.io import export_generator
from gan_dist.storage import pyarrow_filesystem
from gan_dist.tracking.redact import redact
from gan_dist.tracking.tracker import Tracker
from gan_dist.train.checkpoint import capture_rng, restore_modules, save_checkpoint, training_state
from gan_dist.train.modules import GanModules, parameter_digest
from gan_dist.train.progress import ProgressChannel, progress_logger  # gan_dist console: rank 0 -> driver
from gan_dist.train.schedules import scheduled_values
from gan_dist.train.step import Terms, standing_statistics
from gan_dist.train.stop import PREEMPTED, STOPPED, Preempted, StopWatch

STOP_MARKER = "stopped.json"
PARAMS_FINITE = "train/params_finite"
STANDING_BATCHES = 8  # batches of noise over which EMA-G's BatchNorm statistics are recomputed


class NonFiniteLoss(RuntimeError):
    """Raised on the driver when a run stopped on NaN/Inf losses."""


class StopTraining(Exception):
    """Raised on every rank (same step, same reason) when the run must end early."""

    def __init__(self, reason: str, status: str = "FAILED") -> None:
        super().__init__(reason)
        self.status = status  # the MLflow run's final status


def run_root(cfg: GanConfig) -> str:
    """The run's directory in the checkpoint storage."""
    return storage.join(cfg.checkpoint.storage, cfg.run.name)


def stop_marker_url(cfg: GanConfig) -> str:
    """Where rank 0 records why a run stopped early (Ray's result only carries checkpointed metrics)."""
    return storage.join(run_root(cfg), STOP_MARKER)


def all_gather(obj: Any, world: int) -> list[Any]:
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


@dataclass
class Window:
    """Sums of the step terms since the last log, kept as tensors on the device: no host sync per step.

    A term is a tensor, or ``(value, weight)`` for a weighted mean (a gradient norm counts only on the
    steps where it is finite). Terms that appear on some steps only (lazy R1) are averaged over those."""

    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    counts: dict[str, torch.Tensor | float] = field(default_factory=dict)
    steps: int = 0  # G steps
    data_wait: float = 0.0
    start: float = field(default_factory=time.perf_counter)

    def add(self, terms: Terms) -> None:
        for key, term in terms.items():
            value, weight = term if isinstance(term, tuple) else (term, 1.0)
            self.sums[key] = self.sums.get(key, 0) + value * weight
            self.counts[key] = self.counts.get(key, 0) + weight

    def means(self, world: int) -> dict[str, float]:
        """Weighted means over the window and every rank: one all-reduce (one host sync) per log interval."""
        keys = sorted(self.sums)
        sums = torch.stack([self.sums[k].float() for k in keys])
        stacked = torch.stack([sums, torch.stack([torch.as_tensor(self.counts[k]).to(sums) for k in keys])])
        if world > 1:
            dist.all_reduce(stacked)
        totals, counts = stacked
        return dict(zip(keys, torch.where(counts > 0, totals / counts.clamp_min(1e-12), 0.0).tolist()))


@dataclass
class Evaluation:
    extractor: FeatureExtractor
    real_stats: RealStats | None  # rank 0 only
    mode_classifier: ClassifierExtractor | None = None  # eval.mode_classifier, loaded at the first evaluation


@dataclass
class Worker:
    """One rank's training state between steps."""

    cfg: GanConfig
    rank: int
    world: int
    device: torch.device
    m: GanModules
    noise: torch.Generator  # this rank's latent noise stream
    data: BatchIterator
    tracker: Tracker
    fixed_z: torch.Tensor  # the sample grid's latents, the same all run long
    evaluation: Evaluation | None
    last_good: dict[str, Any]  # host copy of the state to roll back to
    step: int = 0
    skipped_before: int = 0  # samples skipped before this attempt's loader started
    rollbacks: int = 0
    window: Window = field(default_factory=Window)
    stop: StopWatch | None = None
    progress: ProgressChannel = field(default_factory=ProgressChannel.null)  # gan_dist console: rank 0 -> driver
    checkpointed_at: int = -1
    audit: list[tuple[int, list[str]]] = field(default_factory=list)  # (step, sample keys), with data.audit
    attempt: int = 0  # when this worker group started (rank 0's clock, ms): names the audit files
    class_names: list[str] = field(default_factory=list)  # the dataset's classes (a labelled dataset)
    class_counts: list[int] = field(default_factory=list)
    augment_stats: dict[str, float] = field(default_factory=dict)  # ADA's latest p and r_t
    ema_ready_at: int = -1  # the step at which EMA-G's BatchNorm statistics were last recomputed

    def due(self, every: int) -> bool:
        return self.step % every == 0 or self.step == self.cfg.train.steps


def window_metrics(w: Worker) -> dict[str, float] | None:
    """The window's means across ranks at log and checkpoint steps (identical on every rank), else None.

    They include ``train/params_finite`` (1.0 iff every parameter of G and D is finite on every rank)."""
    if not (w.due(w.cfg.train.log_every) or w.due(w.cfg.checkpoint.every)):
        return None
    params = [p for module in (w.m.g, w.m.d) for p in module.parameters()]
    w.window.add({PARAMS_FINITE: torch.stack([torch.isfinite(p).all() for p in params]).all().float()})
    return w.window.means(w.world)


def diverged(metrics: dict[str, float]) -> list[str]:
    """What makes a run diverged: a non-finite loss or parameter. Not a gradient norm: an fp16 step the
    GradScaler skipped has an infinite one, and that is the scaler doing its job."""
    bad = sorted(k for k, v in metrics.items() if k.startswith("losses/") and not math.isfinite(v))
    return bad + (["parameters"] if metrics.get(PARAMS_FINITE, 1.0) < 1.0 else [])


def handle_nonfinite(w: Worker, metrics: dict[str, float]) -> bool:
    """On NaN/Inf: roll back to the last good state (True: the caller skips this step's other phases), or
    raise StopTraining when the config says stop or the rollbacks are used up."""
    bad = diverged(metrics)
    metrics.pop(PARAMS_FINITE, None)
    if not bad:
        return False
    if w.cfg.train.nan_action == "stop" or w.rollbacks >= w.cfg.train.max_rollbacks:
        raise StopTraining(f"non-finite {', '.join(bad)} at step {w.step}")
    w.rollbacks += 1
    restore_modules(w.m, w.last_good)
    w.step = w.last_good["step"]
    w.noise.manual_seed(w.cfg.train.seed * 100_003 + w.rank + 7919 * w.rollbacks)  # a different path
    progress_logger().warning("non-finite %s: rolled back to step %d (%d)", bad, w.step, w.rollbacks)
    w.window = Window()
    return True


def maybe_log(w: Worker, metrics: dict[str, float] | None) -> None:
    """Metrics to MLflow (rank 0) and a progress line, every ``train.log_every`` steps."""
    cfg = w.cfg
    if metrics is None or not w.due(cfg.train.log_every):
        return
    elapsed = time.perf_counter() - w.window.start
    metrics["throughput/images_per_sec"] = w.window.steps * cfg.train.n_critic * cfg.train.batch_size / elapsed
    metrics["throughput/data_wait_fraction"] = w.window.data_wait / elapsed  # rank 0's share spent waiting
    metrics["throughput/data_skipped"] = w.skipped_before + w.data.skipped  # rank 0's running total
    metrics["optim/lr_g"] = w.m.opt_g.param_groups[0]["lr"]
    metrics["optim/lr_d"] = w.m.opt_d.param_groups[0]["lr"]
    metrics["optim/nan_rollbacks"] = w.rollbacks
    # the values the window's last step trained with (step w.step - 1), like the learning rates above
    metrics.update({f"schedules/{name}": value for name, value in scheduled_values(cfg, w.step - 1).items()})
    metrics["throughput/world_size"] = w.world  # an elastic run shows here when it shrank and grew
    metrics.update(w.augment_stats)
    if w.device.type == "cuda":
        metrics["throughput/gpu_memory_gb"] = torch.cuda.max_memory_allocated(w.device) / 2**30
    w.tracker.log_metrics(metrics, step=w.step)
    w.progress.publish("log", w.step, metrics)  # gan_dist console: rank 0's live view (stderr line without one)
    w.window = Window()


def ready_ema(w: Worker) -> torch.nn.Module:
    """EMA-G with BatchNorm statistics that belong to its weights (recomputed once per step at most)."""
    if w.ema_ready_at != w.step:
        cfg = w.cfg
        standing_statistics(
            w.m.g_ema, cfg.model.z_dim, cfg.train.batch_size, STANDING_BATCHES, cfg.train.seed, cfg.model.classes()
        )
        w.ema_ready_at = w.step
    return w.m.g_ema


MAX_GRID_CLASSES = 10  # rows of a conditional run's sample grid


@torch.no_grad()
def sample_grid(g_ema: torch.nn.Module, z: torch.Tensor, class_names: list[str] | None = None) -> Image.Image:
    """The fixed-noise grid; for a conditional G one labelled row per class (the first 10), the same
    latents in every row, so what changes down a column is the class alone."""
    if not class_names:
        return image_grid(to_uint8(g_ema(z)))
    names = class_names[:MAX_GRID_CLASSES]
    per_row = max(1, z.shape[0] // len(names))
    labels = torch.arange(len(names), device=z.device).repeat_interleave(per_row)
    return labelled_rows(to_uint8(g_ema(z[:per_row].repeat(len(names), 1), labels)), names)


def maybe_sample(w: Worker) -> None:
    """The fixed-noise EMA sample grid to MLflow (rank 0), every ``train.sample_every`` steps."""
    if w.rank == 0 and w.due(w.cfg.train.sample_every):
        names = w.class_names if w.cfg.model.conditional else None
        w.tracker.log_image(sample_grid(ready_ema(w), w.fixed_z, names), key="samples", step=w.step)


def maybe_evaluate(w: Worker) -> None:
    """FID/KID/IS (and, on a labelled dataset, mode coverage) of the EMA generator, sharded over every rank,
    every ``eval.every`` steps."""
    cfg, ev = w.cfg, w.evaluation
    if ev is None or not w.due(cfg.eval.every):
        return
    ev.mode_classifier = ev.mode_classifier or build_mode_classifier(cfg.eval, w.device)
    scores = evaluate_generator_distributed(
        ready_ema(w), cfg.model.z_dim, ev.extractor, ev.real_stats, cfg.eval.num_images,
        cfg.eval.batch_size, w.rank, w.world, w.device, seed=cfg.train.seed,
        class_counts=w.class_counts if cfg.model.conditional else None,
        mode_counts=w.class_counts or None, mode_classifier=ev.mode_classifier,
    )  # fmt: skip
    if scores is not None:  # rank 0
        w.tracker.log_metrics({f"quality/{k}": v for k, v in scores.items()}, step=w.step)
        w.progress.publish("eval", w.step, scores)  # gan_dist console (stderr line without one)


def maybe_checkpoint(w: Worker, now: bool = False) -> None:
    """Every ``checkpoint.every`` steps (or ``now``, uploaded before returning): the whole training state
    through Ray Train (rank 0's files)."""
    if not (now or w.due(w.cfg.checkpoint.every)) or w.checkpointed_at == w.step:
        return
    w.checkpointed_at = w.step
    ready_ema(w)  # the saved EMA-G, and the replica digest, include its statistics
    state = training_state(
        w.m,
        step=w.step,
        data_batches=w.data.position.batches,
        data_position=w.data.position.to_state(),
        data_skipped=w.skipped_before + sum(all_gather(w.data.skipped, w.world)),
        samples_seen=w.data.position.batches * w.cfg.train.batch_size,
        rng=all_gather(capture_rng(w.noise), w.world),
        mlflow_run_id=w.tracker.run_id,
        config=redact(w.cfg.model_dump(mode="json")),
        class_names=w.class_names,
    )
    w.last_good = host_copy(state)
    if w.cfg.data.audit:  # before the report: a checkpoint Ray registers has every rank's records up to it
        write_audit(w)
    report_checkpoint(state, w, sync=now)


def write_audit(w: Worker) -> None:
    """``data.audit``: this rank's sample keys since its last checkpoint, by step, next to the checkpoints. The
    name carries the attempt (its start, in ms): steps an attempt trained past the checkpoint a restart resumed
    from appear again in the next attempt's files, and the run kept the later ones."""
    if not w.audit:  # a checkpoint before any step (a continued or PBT-taken-over run) has nothing to record
        return
    name = f"audit/attempt-{w.attempt}-rank{w.rank:03d}-steps-{w.audit[0][0]:09d}-{w.step:09d}.json"
    storage.write_bytes(storage.join(run_root(w.cfg), name), json.dumps(w.audit).encode(), w.cfg.storage)
    w.audit = []


def checkpoint_on_request(w: Worker, reason: int) -> None:
    """Checkpoint the step every rank agreed on (``StopWatch.poll``; called before the step's periodic checkpoint,
    so that this one is uploaded before it returns); then SIGTERM raises (Ray Train restarts the group from that
    checkpoint on the workers that remain), a user's stop ends the run as KILLED, and a preemption notice lets
    training go on until the node goes."""
    maybe_checkpoint(w, now=True)
    if reason == PREEMPTED:
        # Ray Train ends the group at the first failure it sees, and registers a checkpoint only with every
        # rank's report of it: no rank fails before all have reported (rank 0 reports once it has uploaded).
        w.stop.barrier()
        raise Preempted(f"rank {w.rank}: SIGTERM; checkpointed step {w.step}")
    if reason == STOPPED:
        raise StopTraining(f"stopped on request at step {w.step}", status="KILLED")
    progress_logger().warning("a node of the worker group is being preempted: checkpointed step %d", w.step)


def host_copy(state: dict[str, Any]) -> dict[str, Any]:
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
    return value  # ints, floats, strings: immutable


def report_checkpoint(state: dict[str, Any], w: Worker, sync: bool = False) -> None:
    """Every rank reports (Ray requires it); rank 0 attaches the checkpoint files."""
    cfg, step = w.cfg, state["step"]
    digests = all_gather(parameter_digest(w.m), w.world)
    if len(set(digests)) != 1:
        raise RuntimeError(f"DDP replicas diverged at step {step}: parameter digests {digests}")
    metrics = {
        "step": step,
        "rank_steps": all_gather(step, w.world),
        "param_digests": digests,
        "data_skipped": state["data_skipped"],
        "mlflow_run_id": state["mlflow_run_id"] or "",
        **w.tracker.latest,  # rank 0's latest value of every metric it logged: a sweep compares trials by one
    }
    if w.rank != 0:
        ray.train.report(metrics)
        return
    local = tempfile.mkdtemp(prefix="gan_dist_ckpt_")  # Ray deletes it once uploaded
    save_checkpoint(local, state)
    name = f"step-{step:09d}"
    if cfg.checkpoint.keep_every and step % cfg.checkpoint.keep_every == 0:
        _archive(local, cfg, name)
    upload = ray.train.CheckpointUploadMode
    mode = upload.ASYNC if cfg.checkpoint.async_upload and not sync else upload.SYNC
    ray.train.report(
        metrics,
        checkpoint=ray.train.Checkpoint.from_directory(local),
        checkpoint_dir_name=name,
        checkpoint_upload_mode=mode,
        delete_local_checkpoint_after_upload=True,
    )
    w.progress.publish("checkpoint", step)  # gan_dist console


def _archive(local_dir: str, cfg: GanConfig, name: str) -> None:
    """Copy a checkpoint to ``<storage>/<run>/archive/<name>``, outside Ray's ``num_to_keep`` retention."""
    fs, root = pyarrow_filesystem(cfg.checkpoint.storage, cfg.storage)
    dest = f"{root.rstrip('/')}/{cfg.run.name}/archive/{name}"
    fs = fs or pyarrow.fs.LocalFileSystem()
    fs.create_dir(dest, recursive=True)
    pyarrow.fs.copy_files(local_dir, dest, destination_filesystem=fs)


def log_final_generator(w: Worker) -> None:
    """The final EMA generator as an MLflow model (optionally registered); bounded wait inside the tracker."""
    ready_ema(w)
    with tempfile.TemporaryDirectory() as tmp:
        state = training_state(w.m, step=w.step, config=redact(w.cfg.model_dump(mode="json")), class_names=w.class_names)
        save_checkpoint(tmp, state)
        exported = export_generator(tmp, f"{tmp}/generator.pt")
        w.tracker.log_generator(exported, register_as=w.cfg.tracking.register_model)


def record_stop(w: Worker, stop: StopTraining) -> None:
    """Rank 0 leaves the reason where the driver looks for it after ``fit()``."""
    if w.rank == 0:  # every rank stops at the same step, for the same reason: one line says it
        progress_logger().log(logging.INFO if stop.status == "KILLED" else logging.ERROR, "stopping: %s", stop)
        marker = {"step": w.step, "reason": str(stop), "status": stop.status, "mlflow_run_id": w.tracker.run_id}
        storage.write_bytes(stop_marker_url(w.cfg), json.dumps(marker).encode(), w.cfg.storage)

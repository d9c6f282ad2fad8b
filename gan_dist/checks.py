"""The checks across keys of a job config, each naming the key to change: combinations that cannot train,
and world sizes (every size an elastic range allows) at which ranks would run different passes."""

from __future__ import annotations

from typing import TYPE_CHECKING

from gan_dist.models import ARCHITECTURES
from gan_dist.schema import combination_error

if TYPE_CHECKING:
    from gan_dist.config import GanConfig


def check_combinations(cfg: GanConfig) -> None:
    """Raise a ``combination_error`` for the first combination of keys that cannot train."""
    if cfg.train.batch_size < cfg.scaling.max_workers * cfg.train.accumulate:
        raise combination_error(
            "train.batch_size",
            f"global batch {cfg.train.batch_size} cannot give each of {cfg.scaling.max_workers} workers "
            f"(scaling.num_workers) {cfg.train.accumulate} micro-batch(es)",
        )
    batch_norm_d = getattr(cfg.model, "d_norm", "none") == "batch"
    if cfg.loss.name == "wgan-gp" and batch_norm_d:
        raise combination_error(
            "model.d_norm",
            "wgan-gp's per-sample gradient penalty is invalid with BatchNorm in D; set model.d_norm=none",
        )
    for penalty in ("r1_gamma", "r2_gamma"):
        if (getattr(cfg.loss, penalty) or getattr(cfg.schedules, penalty)) and batch_norm_d:
            raise combination_error(
                f"loss.{penalty}",
                f"{penalty[:2].upper()} needs each sample's own gradient, which BatchNorm in D mixes across the "
                f"batch (and SyncBatchNorm cannot double-backward); set model.d_norm=none or loss.{penalty}=0",
            )
    _check_schedules(cfg)
    if cfg.loss.pl_weight and not hasattr(cfg.model, "mapping_layers"):
        raise combination_error("loss.pl_weight", "the path-length penalty needs a style-based G (model.arch=stylegan2)")
    if cfg.loss.ac_weight and not cfg.model.conditional:
        raise combination_error("loss.ac_weight", "the auxiliary classifier needs a conditional model (model.conditional=true)")
    if cfg.loss.ac_weight and not ARCHITECTURES[cfg.model.arch].auxiliary_classifier:
        raise combination_error("loss.ac_weight", f"model.arch={cfg.model.arch} has no auxiliary classifier head")
    try:
        cfg.model.check_resolution(cfg.data.resolution)
    except ValueError as exc:
        raise combination_error("data.resolution", f"{cfg.model.arch} {exc}") from None
    if cfg.train.sync_batchnorm and not cfg.scaling.use_gpu:
        raise combination_error("train.sync_batchnorm", "SyncBatchNorm needs scaling.use_gpu=true")
    for world in range(cfg.scaling.min_workers, cfg.scaling.max_workers + 1):
        _check_world(cfg, world)


def _check_schedules(cfg: GanConfig) -> None:
    """A scheduled knob replaces its key's own mechanism; the two at once would fight over the value."""
    for net in ("g", "d"):
        lr_schedule = getattr(cfg.optim, f"{net}_schedule")
        if getattr(cfg.schedules, f"{net}_lr") is not None and (lr_schedule.kind != "constant" or lr_schedule.warmup_steps):
            raise combination_error(
                f"optim.{net}_schedule.kind",
                f"schedules.{net}_lr sets {net.upper()}'s learning rate at every step; leave optim.{net}_schedule "
                "at kind=constant without warm-up, or drop the ramp",
            )
    if cfg.schedules.augment_p is not None and cfg.augment.kind != "ada":
        raise combination_error("schedules.augment_p", "a scheduled augmentation probability needs augment.kind=ada")
    if cfg.schedules.augment_p is not None and cfg.augment.p is not None:
        raise combination_error("augment.p", "schedules.augment_p sets p at every step; leave augment.p unset")


def _check_world(cfg: GanConfig, world: int) -> None:
    """Every rank of a ``world``-rank group runs the same number of micro-batches (the same collectives),
    none of them empty, and each holds at least D's minibatch-stddev group."""
    batch, count = cfg.train.batch_size, cfg.micro_batches(world)
    smallest_share = batch // world
    sizes = f"train.batch_size={batch} on {world} workers (scaling.num_workers) gives ranks {smallest_share}"
    sizes += "" if batch % world == 0 else f" or {smallest_share + 1}"
    if smallest_share < count:
        raise combination_error(
            "train.micro_batch",
            f"{sizes} images, split into {count} micro-batches of at most train.micro_batch="
            f"{cfg.train.micro_batch} on every rank (ranks must run the same passes): some would be empty; "
            "raise train.micro_batch or make train.batch_size a multiple of every world size",
        )
    group = getattr(cfg.model, "mbstd_group_size", 1)
    smallest_forward = smallest_share // count
    if smallest_forward < group:
        raise combination_error(
            "model.mbstd_group_size",
            f"{sizes} images in {count} micro-batch(es), so a forward of D holds as few as {smallest_forward}, "
            f"fewer than the minibatch-stddev group of {group}: lower model.mbstd_group_size to "
            f"{max(1, smallest_forward)}, raise train.batch_size or train.micro_batch, or narrow scaling.num_workers",
        )

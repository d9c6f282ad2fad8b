"""The driver: checks the job against its data, starts (or joins) Ray and runs a TorchTrainer.

The driver needs no GPU and does no training itself; it can run on a laptop, the Ray head or a job
submitter.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import ray
import ray.train
from ray.train.torch import TorchTrainer

import gan_dist
from gan_dist.config import ConfigError, GanConfig
from gan_dist.data.shards import plan_data
from gan_dist import storage
from gan_dist.storage import pyarrow_filesystem
from gan_dist.train.loop import train_worker
from gan_dist.train.phases import NonFiniteLoss, stop_marker_url


@dataclass
class TrainingOutcome:
    run_name: str
    checkpoint_path: str | None
    mlflow_run_id: str | None
    tracking_uri: str
    final_step: int
    metrics: dict


def preflight(cfg: GanConfig) -> None:
    """Fail before Ray starts when the data cannot feed the configured worker group or does not fit the model;
    a conditional model takes its class count from the dataset's manifest unless the config sets it."""
    try:
        plan = plan_data(cfg, cfg.scaling.num_workers)
    except ValueError as exc:
        raise ConfigError("data.url", str(exc)) from None
    if cfg.model.conditional:
        check_classes(cfg, list(plan.class_names))


def check_classes(cfg: GanConfig, names: list[str] | None) -> None:
    """A conditional model needs a labelled dataset whose classes fit ``model.num_classes`` (set it if unset)."""
    if not names:
        raise ConfigError("model.conditional", f"{cfg.data.url} has no class labels (prepare a labelled source: "
                          "class subfolders, --labels-csv, MNIST, sklearn:digits) or set model.conditional=false")
    if cfg.model.num_classes is None:
        cfg.model.num_classes = len(names)
    elif len(names) > cfg.model.num_classes:
        raise ConfigError("model.num_classes", f"{cfg.data.url} has {len(names)} classes ({', '.join(names[:5])}"
                          f"{', ...' if len(names) > 5 else ''}), more than model.num_classes={cfg.model.num_classes}")


def connect(address: str | None) -> None:
    """Join the cluster at ``address`` (or the submitted job's cluster), else start a local Ray instance."""
    if ray.is_initialized():
        return
    if address is None and os.environ.get("RAY_ADDRESS"):
        ray.init()  # inside a submitted job: join the job's cluster (its runtime env ships this package)
    elif address is None:
        ray.init(address="local", include_dashboard=False, configure_logging=False)
    else:
        # A remote cluster's workers do not have this package: ship it with the job.
        ray.init(address=address, runtime_env={"py_modules": [str(Path(gan_dist.__file__).parent)]})


def build_trainer(cfg: GanConfig) -> TorchTrainer:
    scaling = ray.train.ScalingConfig(
        num_workers=cfg.scaling.num_workers,
        use_gpu=cfg.scaling.use_gpu,
        resources_per_worker={"CPU": cfg.scaling.cpus_per_worker, **({"GPU": 1} if cfg.scaling.use_gpu else {})},
    )
    filesystem, storage_path = pyarrow_filesystem(cfg.checkpoint.storage, cfg.storage)
    run = ray.train.RunConfig(
        name=cfg.run.name,
        storage_path=storage_path,
        storage_filesystem=filesystem,
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.checkpoint.num_to_keep),
        failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
    )
    return TorchTrainer(
        train_worker,
        train_loop_config=cfg.model_dump(mode="json"),
        scaling_config=scaling,
        run_config=run,
    )


def run_training(cfg: GanConfig, address: str | None = None) -> TrainingOutcome:
    """Train to ``cfg.train.steps`` (continuing the run if ``cfg.run.name`` already has checkpoints)."""
    preflight(cfg)
    if "://" not in cfg.checkpoint.storage:
        os.makedirs(cfg.checkpoint.storage, exist_ok=True)
    connect(address)
    marker = stop_marker_url(cfg)
    if storage.exists(marker, cfg.storage):  # left by an earlier attempt of this run
        storage.delete(marker, cfg.storage)
    result = build_trainer(cfg).fit()
    if storage.exists(marker, cfg.storage):
        stopped = json.loads(storage.read_bytes(marker, cfg.storage))
        raise NonFiniteLoss(f"run '{cfg.run.name}' stopped: {stopped['reason']}; the last good checkpoint is kept")
    metrics = dict(result.metrics or {})
    return TrainingOutcome(
        run_name=cfg.run.name,
        checkpoint_path=result.checkpoint.path if result.checkpoint else None,
        mlflow_run_id=metrics.get("mlflow_run_id") or None,
        tracking_uri=cfg.tracking.uri,
        final_step=int(metrics.get("step", 0)),
        metrics=metrics,
    )

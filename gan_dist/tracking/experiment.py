"""Where a run's MLflow run lives: its experiment (created, if missing, for the UI's "Machine learning" layout) and
the name of the MLflow run it logs to. Shared by the rank-0 tracker and a sweep's parent run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow

from gan_dist.config import GanConfig

EXPERIMENT_KIND_TAG = "mlflow.experimentKind"  # the UI lays a "model training" experiment out for runs, not GenAI
EXPERIMENT_KIND = "custom_model_development"  # the UI's "Machine learning" kind (its default is GenAI)


def sqlite_artifact_root(uri: str) -> str | None:
    """MLflow's default for sqlite (./mlruns of the current dir) is a Ray worker's temp dir."""
    prefix = "sqlite:///"
    return (Path(uri[len(prefix) :]).parent / "mlartifacts").as_uri() if uri.startswith(prefix) else None


def experiment_id(client: mlflow.MlflowClient, cfg: GanConfig) -> str:
    """The id of ``tracking.experiment``; racing another run to create it fails this attempt, the next finds it."""
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    if experiment is None:
        root = sqlite_artifact_root(cfg.tracking.uri)
        return client.create_experiment(cfg.tracking.experiment, root, {EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
    if EXPERIMENT_KIND_TAG not in experiment.tags:  # made elsewhere: the UI would open it as GenAI
        client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return experiment.experiment_id


def mlflow_run_name(config: dict[str, Any]) -> str:
    """The name of the MLflow run a run (its config, as a checkpoint saves it) logs to: ``tracking.run_name``,
    else ``run.name``."""
    return config["tracking"].get("run_name") or config["run"]["name"]

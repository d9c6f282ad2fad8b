"""What the MLflow run of a gan_dist run records about it: params (config, package versions, cluster shape)
and tags (run name, checkpoint and dataset locations, dataset size, source commit)."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

from mlflow.entities import Param
from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT

from gan_dist.config import GanConfig
from gan_dist.data.manifest import Manifest
from gan_dist.tracking.redact import redact_uri

RUN_NAME_TAG = "gan_dist.run_name"
CHECKPOINT_TAG = "gan_dist.checkpoint_uri"
DATASET_TAG = "gan_dist.dataset_uri"
DATASET_SAMPLES_TAG = "gan_dist.dataset_samples"
GIT_COMMIT_ENV = "GAN_DIST_GIT_COMMIT"
VERSIONED_PACKAGES = ("torch", "torchvision", "ray", "mlflow", "webdataset", "gan_dist")


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}"""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def git_commit() -> str | None:
    """$GAN_DIST_GIT_COMMIT, else HEAD of the checkout gan_dist runs from; None for an installed copy."""
    if commit := os.environ.get(GIT_COMMIT_ENV, "").strip():
        return commit
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():  # a wheel or Ray's shipped py_module: a parent repo is not ours
        return None
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = out.stdout.strip()
    return commit if out.returncode == 0 and commit else None


def run_params(config: dict[str, Any]) -> list[Param]:
    """The config (redact it first) as ``section.key`` params, plus ``versions.<package>``."""
    versions = {f"versions.{k}": v for k, v in package_versions().items()}
    return _params({**flatten(config), **versions})


def cluster_params(world_size: int, num_nodes: int, gpus: int) -> list[Param]:
    return _params({"cluster.world_size": world_size, "cluster.num_nodes": num_nodes, "cluster.gpus": gpus})


def run_tags(cfg: GanConfig, manifest: Manifest | None) -> dict[str, str]:
    tags = {
        RUN_NAME_TAG: cfg.run.name,
        CHECKPOINT_TAG: redact_uri(f"{cfg.checkpoint.storage.rstrip('/')}/{cfg.run.name}"),
        DATASET_TAG: redact_uri(cfg.data.url),
    }
    if commit := git_commit():
        tags[MLFLOW_GIT_COMMIT] = commit  # the tag MLflow's UI shows as the run's source version
    if manifest is not None:
        tags[DATASET_SAMPLES_TAG] = str(manifest.num_samples)
    return tags


def _params(values: dict[str, Any]) -> list[Param]:
    return [Param(key, str(value)) for key, value in values.items()]

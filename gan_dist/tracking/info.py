"""What the MLflow run of a gan_dist run records about it: params (config, package versions, cluster shape)
and tags (run name, description, checkpoint and dataset locations, dataset size, source commit); and the run
seen from the driver: reaching its store before training, links to its page and its latest sample grid."""

from __future__ import annotations

import importlib.metadata
import logging
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

from mlflow.entities import Param
from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT, MLFLOW_RUN_NOTE

from gan_dist.config import GanConfig
from gan_dist.data.manifest import Manifest
from gan_dist.tracking.redact import redact_uri

RUN_NAME_TAG = "gan_dist.run_name"
CHECKPOINT_TAG = "gan_dist.checkpoint_uri"
DATASET_TAG = "gan_dist.dataset_uri"
DATASET_SAMPLES_TAG = "gan_dist.dataset_samples"
GIT_COMMIT_ENV = "GAN_DIST_GIT_COMMIT"
VERSIONED_PACKAGES = ("torch", "torchvision", "ray", "mlflow", "webdataset", "gan_dist")

# MLflow's HTTP defaults (7 retries, backoff up to 2 min, 120 s timeout) let one call hang for minutes in an
# outage. Set only where the user has not: their environment wins.
HTTP_LIMITS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
    # set_terminated would print the tracking URI (userinfo included) to stdout; we log a redacted one.
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
}


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


# Keys that say where things go or how often progress is shown, not what is trained: never params.
NOT_PARAMS = ("checkpoint.", "tracking.", "storage.", "run.", "data.url", "data.loader_workers", "train.log_every",
              "train.sample_every", "train.sample_grid")  # fmt: skip
IDENTITY = ("model.arch", "loss.name")  # what a GAN run is, default or not: always params


def run_params(config: dict[str, Any]) -> list[Param]:
    """What the run is and sets: the IDENTITY keys and the config keys (redact it first) whose values differ from
    gan_dist's defaults, as ``section.key`` params, less the NOT_PARAMS. MLflow's UI lists every param of a run above each of its image
    cards, in a card of fixed height: the ~100 keys of a whole config buried the sample grid. The whole effective
    config is the run's ``config.yaml`` artifact; locations and versions are tags (``run_tags``)."""
    flat = flatten(config)
    defaults = _default_config(config)
    changed = {k: v for k, v in flat.items()
               if k in IDENTITY or not k.startswith(NOT_PARAMS) and (k not in defaults or defaults[k] != v)}  # fmt: skip
    return _params(changed)


def _default_config(config: dict[str, Any]) -> dict[str, Any]:
    """gan_dist's defaults for a job on the same data and architecture, flattened (empty if they do not validate:
    then every key is logged)."""
    try:
        tree = {"data": {"url": config["data"]["url"]}, "model": {"arch": config["model"]["arch"]}}
        return flatten(GanConfig.model_validate(tree).model_dump(mode="json"))
    except (KeyError, ValueError):
        return {}


def cluster_params(world_size: int, num_nodes: int, gpus: int) -> list[Param]:
    return _params({"cluster.world_size": world_size, "cluster.num_nodes": num_nodes, "cluster.gpus": gpus})


def run_tags(cfg: GanConfig, manifest: Manifest | None) -> dict[str, str]:
    tags = {
        MLFLOW_RUN_NOTE: describe(cfg, manifest),  # the run page's Description
        RUN_NAME_TAG: cfg.run.name,
        CHECKPOINT_TAG: redact_uri(f"{cfg.checkpoint.storage.rstrip('/')}/{cfg.run.name}"),
        DATASET_TAG: redact_uri(cfg.data.url),
    }
    tags.update({f"versions.{k}": v for k, v in package_versions().items()})
    if commit := git_commit():
        tags[MLFLOW_GIT_COMMIT] = commit  # the tag MLflow's UI shows as the run's source version
    if manifest is not None:
        tags[DATASET_SAMPLES_TAG] = str(manifest.num_samples)
    return tags


def describe(cfg: GanConfig, manifest: Manifest | None) -> str:
    """The job in two lines, for the run page's Description: the model and schedule, then the data."""
    model, scaling = cfg.model, cfg.scaling
    widths = ", ".join(f"{k.split('_')[0].upper()} {getattr(model, k)}" for k in ("g_width", "d_width") if hasattr(model, k))
    workers = f"{scaling.min_workers}–{scaling.max_workers}" if scaling.elastic else str(scaling.num_workers)
    device = "GPU" if scaling.use_gpu else "CPU"
    size = f"{manifest.num_samples} images, " if manifest is not None else ""
    colour = "RGB" if cfg.data.channels == 3 else "grayscale"
    return (
        f"**{model.arch}** ({widths}{', ' if widths else ''}z {model.z_dim}), {cfg.loss.name} loss: "
        f"{cfg.train.steps} steps × global batch {cfg.train.batch_size} on {workers} {device} worker(s)  \n"
        f"**data** {redact_uri(cfg.data.url)}: {size}{cfg.data.resolution}×{cfg.data.resolution} {colour}"
    )


def _params(values: dict[str, Any]) -> list[Param]:
    return [Param(key, str(value)) for key, value in values.items()]


SAMPLES_KEY = "samples"  # the fixed-noise grid's image key (MLflow stores it as images/samples+step+N+...)


def latest_sample_grid(client: Any, run_id: str) -> str | None:
    """The artifact path of the run's latest fixed-noise sample grid, or None."""
    prefix = f"{SAMPLES_KEY}+step+"
    grids = [a.path for a in client.list_artifacts(run_id, "images")
             if Path(a.path).name.startswith(prefix) and a.path.endswith(".png")]  # fmt: skip
    return max(grids, key=lambda p: int(Path(p).name.split("+")[2])) if grids else None


def run_page(experiment_id: str, run_id: str) -> str:
    """The run's page in MLflow's UI, relative to its root, in the "Machine learning" layout."""
    return f"#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"


def run_links(uri: str, run_id: str | None) -> dict[str, str]:
    """Where to look at a run: ``page`` (a server's URL) or ``ui`` (how to open a local store), and ``samples``
    (the latest sample grid: a local file or an artifact URI). Empty when the store does not answer."""
    if not run_id:
        return {}
    import mlflow

    try:
        client = mlflow.MlflowClient(uri)
        run = client.get_run(run_id)
        grid = latest_sample_grid(client, run_id)
    except Exception:  # the summary goes on without links
        return {}
    page = run_page(run.info.experiment_id, run_id)
    if uri.startswith(("http://", "https://")):
        links = {"page": f"{redact_uri(uri).rstrip('/')}/{page}"}
    else:
        links = {"ui": f"mlflow ui --backend-store-uri {redact_uri(uri)}", "ui_page": f"http://127.0.0.1:5000/{page}"}
    if grid:
        location = f"{run.info.artifact_uri.rstrip('/')}/{grid}"
        links["samples"] = location.removeprefix("file://")
    return links


def open_store(uri: str) -> None:
    """Reach the tracking store once, from the driver before any worker: a server that refuses raises here,
    and a new sqlite store gets its tables now (quietly) rather than on rank 0's way to its first step."""
    for name, value in HTTP_LIMITS.items():
        os.environ.setdefault(name, value)
    for name in ("mlflow.store.db.utils", "alembic.runtime.migration"):  # "Creating initial MLflow database tables"
        logging.getLogger(name).setLevel(logging.WARNING)
    import mlflow

    mlflow.MlflowClient(uri).search_experiments(max_results=1)


def end_if_running(uri: str, run_id: str | None, status: str) -> None:
    """The driver's last word on a run whose rank 0 could not end it (killed with its worker group): ``status``
    (FAILED, KILLED), unless the run already ended. Best effort: the store may be gone too."""
    if not run_id:
        return
    import mlflow

    try:
        client = mlflow.MlflowClient(uri)
        if client.get_run(run_id).info.status == "RUNNING":
            client.set_terminated(run_id, status)
    except Exception:
        pass

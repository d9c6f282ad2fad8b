"""Rank-0 MLflow logging: one MLflow run per gan_dist run name, continued on resume.

Only rank 0 builds an :class:`MlflowTracker`; other ranks get a :class:`NullTracker`, so the loop never
asks "am I rank 0?" around each log call. Metric logging is asynchronous so a slow tracking server does
not stall training.
"""

from __future__ import annotations

import re
from typing import Any, Protocol

import mlflow
from PIL import Image

from gan_dist.config import GanConfig

RUN_NAME_TAG = "gan_dist.run_name"
_SECRET_KEY = re.compile(r"(secret|password|passwd|token|credential|access_key)", re.IGNORECASE)
_URI_USERINFO = re.compile(r"(?<=://)[^/@\s]+@")
REDACTED = "***"


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


def redact(params: dict[str, Any]) -> dict[str, Any]:
    """Hide values of secret-looking keys and user:password@ parts of URIs."""
    clean = {}
    for key, value in params.items():
        if _SECRET_KEY.search(key.rsplit(".", 1)[-1]):
            clean[key] = REDACTED
        elif isinstance(value, str):
            clean[key] = _URI_USERINFO.sub(REDACTED + "@", value)
        else:
            clean[key] = value
    return clean


class Tracker(Protocol):
    run_id: str | None

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_image(self, image: Image.Image, key: str, step: int) -> None: ...
    def finish(self, status: str = "FINISHED") -> None: ...


class NullTracker:
    """What ranks other than 0 log to."""

    run_id: str | None = None

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_image(self, image: Image.Image, key: str, step: int) -> None:
        pass

    def finish(self, status: str = "FINISHED") -> None:
        pass


class MlflowTracker:
    """Opens (or continues) the MLflow run of a gan_dist run and logs to it."""

    def __init__(self, cfg: GanConfig, run_id: str | None = None):
        uri, run_name, config = cfg.tracking.uri, cfg.run.name, cfg.model_dump(mode="json")
        mlflow.set_tracking_uri(uri)
        mlflow.config.enable_async_logging(True)
        exp = mlflow.set_experiment(cfg.tracking.experiment)
        self.client = mlflow.MlflowClient(uri)
        if run_id is None:
            found = self.client.search_runs(
                [exp.experiment_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}'", max_results=1
            )
            run_id = found[0].info.run_id if found else None
        continuing = run_id is not None
        run = mlflow.start_run(run_id=run_id, run_name=None if continuing else run_name, tags={RUN_NAME_TAG: run_name})
        self.run_id: str | None = run.info.run_id
        if not continuing:
            mlflow.log_params(redact(flatten(config)), synchronous=False)
            mlflow.log_dict(config, "config.yaml")

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        mlflow.log_metrics(metrics, step=step, synchronous=False)

    def log_image(self, image: Image.Image, key: str, step: int) -> None:
        mlflow.log_image(image, key=key, step=step, synchronous=False)

    def finish(self, status: str = "FINISHED") -> None:
        mlflow.flush_async_logging()
        mlflow.end_run(status=status)

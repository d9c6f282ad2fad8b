"""Rank-0 MLflow logging: one MLflow run per gan_dist run name, continued on resume.

Only rank 0 builds an :class:`MlflowTracker`; other ranks get a :class:`NullTracker`. Every MLflow call runs
on one background thread the tracker owns. MLflow's async logging (3.17) is not used: it drops a failed
batch after an ERROR line per batch, gives no future for images, and its flush has no time limit. Here,
during an outage metric points wait in memory (bounded) and are sent once the server answers; images and
artifacts are dropped and counted (tag ``gan_dist.tracking_dropped``); one warning; a bounded finish.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import platform
import queue
import re
import subprocess
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import mlflow
import numpy as np
import torch
from mlflow.entities import Metric, Param, Run, RunTag
from mlflow.exceptions import MlflowException
from mlflow.models import Model, ModelSignature
from mlflow.types import Schema, TensorSpec
from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT
from mlflow.utils.time import get_current_time_millis
from PIL import Image

from gan_dist.config import GanConfig
from gan_dist.data.manifest import Manifest, read_manifest
from gan_dist.train.checkpoint import load_generator

log = logging.getLogger(__name__)

RUN_NAME_TAG = "gan_dist.run_name"
CHECKPOINT_TAG = "gan_dist.checkpoint_uri"
DATASET_TAG = "gan_dist.dataset_uri"
DATASET_SAMPLES_TAG = "gan_dist.dataset_samples"
DROPPED_TAG = "gan_dist.tracking_dropped"
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"  # the UI lays a "model training" experiment out for runs, not GenAI
GIT_COMMIT_ENV = "GAN_DIST_GIT_COMMIT"
GENERATOR_MODEL_NAME = "generator"
VERSIONED_PACKAGES = ("torch", "torchvision", "ray", "mlflow", "webdataset", "gan_dist")
REDACTED = "***"

# MLflow's HTTP defaults (7 retries, backoff up to 2 min, 120 s timeout) let one call hang for minutes in an
# outage. Set only where the user has not: their environment wins.
HTTP_LIMITS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
    # set_terminated would print the tracking URI (userinfo included) to stdout; we log a redacted one.
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
}
RETRY_INTERVAL_S = 5.0  # after a failure, at most one attempt per interval; other jobs are skipped meanwhile
MAX_PENDING_METRICS = 50_000  # metric points kept for catch-up (~10 MB); the oldest are dropped beyond it
MAX_QUEUED_IMAGES = 4  # sample grids can be megabytes each: never let a slow server pile them up
_THREAD_NAME = "gan_dist-mlflow"

_SECRET_NAME = r"secret|passw|token|credential|access_?key|api_?key|private_?key|signature"
_SECRET_KEY = re.compile(_SECRET_NAME, re.IGNORECASE)
_URI_USERINFO = re.compile(r"(?<=://)[^/\s]+@")  # greedy up to the host: a password may contain '@'
_QUERY_SECRET = re.compile(rf"([?&;][^=&#\s]*(?:{_SECRET_NAME})[^=&#\s]*=)[^&#\s]*", re.IGNORECASE)

# urllib3 warns on every retry; the tracker warns once for a whole outage instead.
logging.getLogger("urllib3.connectionpool").addFilter(lambda record: record.threadName != _THREAD_NAME)


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


def redact_uri(text: str) -> str:
    """Hide ``user:password@`` and secret-looking query parameters (``?token=...``) of URIs in ``text``."""
    return _QUERY_SECRET.sub(rf"\g<1>{REDACTED}", _URI_USERINFO.sub(REDACTED + "@", text))


def redact(params: dict[str, Any]) -> dict[str, Any]:
    """Hide values of secret-looking keys and credentials inside URIs, in flat or nested dicts."""
    return {key: _redact_value(str(key), value) for key, value in params.items()}


def _redact_value(key: str, value: Any) -> Any:
    if value not in (None, "") and _SECRET_KEY.search(key.rsplit(".", 1)[-1]):
        return REDACTED
    if isinstance(value, dict):
        return redact(value)
    if isinstance(value, (list, tuple)):
        return type(value)(_redact_value("", v) for v in value)
    return redact_uri(value) if isinstance(value, str) else value


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
    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():  # a wheel or Ray's shipped py_module: a parent repo is not ours
        return None
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = out.stdout.strip()
    return commit if out.returncode == 0 and commit else None


def _sqlite_artifact_root(uri: str) -> str | None:
    """MLflow's default for sqlite (./mlruns of the current dir) is a Ray worker's temp dir."""
    prefix = "sqlite:///"
    return (Path(uri[len(prefix) :]).parent / "mlartifacts").as_uri() if uri.startswith(prefix) else None


def _rejected(exc: BaseException) -> bool:
    """The server answered and refused (bad value, unknown run, no permission): resending will not help."""
    if not isinstance(exc, MlflowException):
        return False
    status = exc.get_http_status_code()
    return 400 <= status < 500 and status != 429


def _failure_kind(exc: BaseException) -> str:
    """Connection failures and 5xx are an outage (MLflow wraps them in MlflowException; artifact uploads
    raise requests' errors, which are OSErrors); anything else is told apart by its error code or type."""
    if isinstance(exc, OSError) or (isinstance(exc, MlflowException) and not _rejected(exc)):
        return "outage"
    return getattr(exc, "error_code", type(exc).__name__)


class _Skipped(Exception):
    """The server failed moments ago: this job is skipped rather than wait on it again."""


@dataclass
class _Job:
    fn: Callable[[], Any]
    lost: int  # items given up if the job fails (metric points are kept for catch-up instead)
    force: bool  # try even right after a failure (explicit calls whose caller waits for the result)
    future: Future = field(default_factory=Future)


class Tracker(Protocol):
    run_id: str | None

    def log_cluster(self, world_size: int, num_nodes: int, gpus: int) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_image(self, image: Image.Image, key: str, step: int) -> None: ...
    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> bool: ...
    def log_generator(self, generator_file: str | Path, register_as: str | None = None) -> str | None: ...
    def finish(self, status: str = "FINISHED") -> None: ...


class NullTracker:
    """What ranks other than 0 log to: nothing."""

    run_id: str | None = None

    def log_cluster(self, world_size: int, num_nodes: int, gpus: int) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_image(self, image: Image.Image, key: str, step: int) -> None: ...
    def finish(self, status: str = "FINISHED") -> None: ...

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> bool:
        return False

    def log_generator(self, generator_file: str | Path, register_as: str | None = None) -> str | None:
        return None


class MlflowTracker:
    """Opens (or continues) the MLflow run of a gan_dist run and logs to it; never raises, never stalls.

    ``run_id`` (from a checkpoint) is continued if it still exists, else the run tagged with the run name,
    else a new run is created. The constructor waits up to ``open_timeout`` s for that, so ``run_id`` is
    known when the server is up; if it is not, the run is opened as soon as it answers.
    """

    def __init__(self, cfg: GanConfig, run_id: str | None = None, open_timeout: float = 20.0) -> None:
        for name, value in HTTP_LIMITS.items():
            os.environ.setdefault(name, value)
        mlflow.set_tracking_uri(cfg.tracking.uri)  # Model.log reaches the server through the global URI
        self.run_id = run_id
        self.dropped = 0  # images, artifacts and metric points given up on by this tracker
        self._cfg, self._uri = cfg, redact_uri(cfg.tracking.uri)
        self._client: mlflow.MlflowClient | None = None
        self._experiment_id: str | None = None
        self._new_run = self._ready = False
        self._config = redact(cfg.model_dump(mode="json"))
        self._manifest = self._read_manifest()
        versions = {f"versions.{k}": v for k, v in package_versions().items()}
        self._params = {**flatten(self._config), **versions}
        self._tags = self._run_tags()
        self._system_metrics, self._monitor = cfg.tracking.system_metrics, None
        self._lock = threading.Lock()
        self._pending: list[Metric] = []
        self._images_queued = 0
        self._failing = self._closed = False
        self._retry_at = 0.0
        self._warned: set[str] = set()
        self._dropped_recorded = self._dropped_before = 0
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        threading.Thread(target=self._work, name=_THREAD_NAME, daemon=True).start()
        self._wait(self._submit(self._ensure_ready, force=True), open_timeout)

    # -- the training thread's side: queue and return -------------------------------------------------

    def log_cluster(self, world_size: int, num_nodes: int, gpus: int) -> None:
        """Cluster shape as params ``cluster.*`` (a new run only: MLflow params cannot change)."""
        shape = {"cluster.world_size": world_size, "cluster.num_nodes": num_nodes, "cluster.gpus": gpus}
        self._submit(lambda: self._new_run and self._client.log_batch(self.run_id, params=_params(shape)), lost=1)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self._closed:
            return
        now = get_current_time_millis()
        self._keep([Metric(key, float(value), now, step) for key, value in metrics.items()])
        self._submit(self._send_metrics)

    def log_image(self, image: Image.Image, key: str, step: int) -> None:
        """An image in the ``key`` history at ``step`` (the UI shows it with a step slider)."""
        if self._closed:
            return
        with self._lock:
            if self._images_queued >= MAX_QUEUED_IMAGES:
                self.dropped += 1
                return
            self._images_queued += 1
        now = get_current_time_millis()
        send = lambda: self._client.log_image(self.run_id, image, key=key, step=step, timestamp=now, synchronous=True)
        self._submit(send, lost=1).add_done_callback(self._image_done)  # skipped jobs are done too

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None, timeout: float = 60.0) -> bool:
        """Upload a file or directory, waiting up to ``timeout`` s; True once it is stored."""
        upload = lambda: self._client.log_artifact(self.run_id, str(local_path), artifact_path) or True
        return bool(self._wait(self._submit(upload, lost=1, force=True), timeout))

    def log_generator(
        self, generator_file: str | Path, register_as: str | None = None, timeout: float = 120.0
    ) -> str | None:
        """Log a file from ``export_generator`` as the run's MLflow model "generator" (pyfunc, loaded by
        gan_dist's weights-only ``load_generator``), registered as ``register_as`` if given. Waits up to
        ``timeout`` s; returns the model URI (``models:/m-...``), or None if it was not logged."""
        job = self._submit(lambda: self._log_generator(Path(generator_file), register_as), lost=1, force=True)
        return self._wait(job, timeout)

    def finish(self, status: str = "FINISHED", timeout: float = 30.0) -> None:
        """Send what is queued and end the run with ``status``, waiting at most ``timeout`` s."""
        if self._closed:
            return
        done = self._submit(lambda: self._end(status), force=True)
        self._closed = True
        self._jobs.put(None)
        ended = self._wait(done, timeout)
        if not ended or self.dropped:
            log.warning(
                "MLflow run %s: %d items dropped during tracking failures; %d metric points and the final "
                "status %s", self.run_id, self.dropped, len(self._pending), "sent" if ended else "not sent",
            )  # fmt: skip

    # -- the background thread's side ----------------------------------------------------------------

    def _submit(self, fn: Callable[[], Any], lost: int = 0, force: bool = False) -> Future:
        job = _Job(fn, lost, force)
        if self._closed:
            job.future.cancel()
        else:
            self._jobs.put(job)
        return job.future

    @staticmethod
    def _wait(future: Future, timeout: float) -> Any:
        """The job's result, or None if it failed or took longer (the worker has warned about failures)."""
        try:
            return future.result(timeout)
        except Exception:
            return None

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                if self._failing and not job.force and time.monotonic() < self._retry_at:
                    raise _Skipped
                self._ensure_ready()
                result = job.fn()
            except Exception as exc:
                self._failed(exc, job.lost)
                job.future.set_exception(exc)
            else:
                self._succeeded()
                job.future.set_result(result)

    def _failed(self, exc: Exception, lost: int) -> None:
        with self._lock:
            self.dropped += lost
        if isinstance(exc, _Skipped):
            return
        self._failing, self._retry_at = True, time.monotonic() + RETRY_INTERVAL_S
        text = redact_uri(f"{type(exc).__name__}: {exc}".splitlines()[0])[:300]
        kind = _failure_kind(exc)
        log.debug("MLflow call failed (%s): %s", kind, text)
        if kind in self._warned:  # once per kind of failure, not once per call
            return
        self._warned.add(kind)
        log.warning(
            "MLflow tracking at %s %s: %s. Training goes on; metrics are kept and sent once it works, images "
            "and artifacts meanwhile are dropped (counted in tag %s).",
            self._uri, "unreachable" if kind == "outage" else "failed", text, DROPPED_TAG,
        )  # fmt: skip

    def _succeeded(self) -> None:
        if self._failing:
            self._failing = False
            log.info("MLflow tracking at %s works again; pending metrics were sent", self._uri)
            self._restart_monitor()
        self._record_dropped()

    def _record_dropped(self) -> None:
        """The run's tag counts drops over all its attempts (restarts, resumes)."""
        if self.dropped == self._dropped_recorded:
            return
        try:
            self._client.set_tag(self.run_id, DROPPED_TAG, str(self._dropped_before + self.dropped))
            self._dropped_recorded = self.dropped
        except Exception:
            pass  # recorded after the next successful call

    def _keep(self, points: list[Metric], first: bool = False) -> None:
        with self._lock:
            self._pending = points + self._pending if first else self._pending + points
            overflow = len(self._pending) - MAX_PENDING_METRICS
            if overflow > 0:
                del self._pending[:overflow]
                self.dropped += overflow

    def _send_metrics(self) -> None:
        with self._lock:
            batch, self._pending = self._pending, []
        if not batch:
            return
        try:
            self._client.log_batch(self.run_id, metrics=batch)
        except Exception as exc:
            if _rejected(exc):
                with self._lock:
                    self.dropped += len(batch)
            else:
                self._keep(batch, first=True)
            raise

    def _image_done(self, _: Future) -> None:
        with self._lock:
            self._images_queued -= 1

    def _ensure_ready(self) -> None:
        """Find or create the run, then log its params (new runs only), tags and config; idempotent."""
        if self._ready:
            return
        if self._client is None:
            self._client = mlflow.MlflowClient(self._cfg.tracking.uri)
        if self._experiment_id is None:
            self._new_run = self._open_run()
        params = _params(self._params) if self._new_run else []
        self._client.log_batch(self.run_id, params=params, tags=[RunTag(k, v) for k, v in self._tags.items()])
        self._client.log_dict(self.run_id, self._config, "config.yaml")  # the latest effective config
        if self._manifest is not None:
            manifest = redact(self._manifest.model_dump(mode="json"))
            self._client.log_dict(self.run_id, manifest, "dataset/manifest.json")
        self._ready = True
        log.info("MLflow run %s (experiment %s) at %s", self.run_id, self._experiment_id, self._uri)
        self._restart_monitor()

    def _open_run(self) -> bool:
        """Sets run_id and experiment id; True if the run was created here."""
        client, name = self._client, self._cfg.run.name
        if self.run_id is not None:
            try:
                run = client.get_run(self.run_id)
            except MlflowException as exc:
                if exc.get_http_status_code() != 404:
                    raise
                log.warning("MLflow run %s from the checkpoint is gone; looking up '%s' by name", self.run_id, name)
            else:
                if run.info.lifecycle_stage == "active":
                    return self._continue(run)
        experiment = client.get_experiment_by_name(self._cfg.tracking.experiment)
        if experiment is None:  # racing another run to create it fails this attempt; the next finds it
            root = _sqlite_artifact_root(self._cfg.tracking.uri)
            exp_id = client.create_experiment(
                self._cfg.tracking.experiment, root, {EXPERIMENT_KIND_TAG: "custom_model_development"}
            )
        else:
            exp_id = experiment.experiment_id
        found = client.search_runs([exp_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{name}'", max_results=1)
        if found:
            return self._continue(found[0])
        self.run_id = client.create_run(exp_id, run_name=name, tags={RUN_NAME_TAG: name}).info.run_id
        self._experiment_id = exp_id
        return True

    def _continue(self, run: Run) -> bool:
        self.run_id, self._experiment_id = run.info.run_id, run.info.experiment_id
        self._dropped_before = int(run.data.tags.get(DROPPED_TAG, 0))
        self._client.update_run(self.run_id, status="RUNNING")
        return False

    def _run_tags(self) -> dict[str, str]:
        tags = {
            RUN_NAME_TAG: self._cfg.run.name,
            CHECKPOINT_TAG: redact_uri(f"{self._cfg.checkpoint.storage.rstrip('/')}/{self._cfg.run.name}"),
            DATASET_TAG: redact_uri(self._cfg.data.url),
        }
        if commit := git_commit():
            tags[MLFLOW_GIT_COMMIT] = commit  # the tag MLflow's UI shows as the run's source version
        if self._manifest is not None:
            tags[DATASET_SAMPLES_TAG] = str(self._manifest.num_samples)
        return tags

    def _read_manifest(self) -> Manifest | None:
        try:
            return read_manifest(self._cfg.data.url)  # None for remote URLs: no tags then
        except (OSError, ValueError) as exc:
            log.warning("dataset manifest of %s unreadable, not logged: %s", redact_uri(self._cfg.data.url), exc)
            return None

    def _restart_monitor(self) -> None:
        """MLflow's system-metrics monitor stops for good on its first failed call: start a fresh one."""
        if not self._system_metrics:
            return
        if self._monitor is not None:
            self._monitor.finish()
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor  # needs psutil

            self._monitor = SystemMetricsMonitor(self.run_id, resume_logging=True, tracking_uri=self._cfg.tracking.uri)
            self._monitor.start()
        except Exception as exc:
            self._system_metrics, self._monitor = False, None
            log.warning("system metrics not logged: %s", exc)

    def _log_generator(self, generator_file: Path, register_as: str | None) -> str:
        _, meta = load_generator(generator_file)  # refuses anything but a plain-data gan_dist export
        mlflow.set_experiment(experiment_id=self._experiment_id)  # Model.log files the model under it
        return Model.log(
            artifact_path=None,
            name=GENERATOR_MODEL_NAME,
            flavor=mlflow.pyfunc,
            run_id=self.run_id,
            step=meta["step"],
            registered_model_name=register_as,
            metadata={"gan_dist": meta},
            loader_module=__name__,  # _load_pyfunc below: no pickled code in the model
            data_path=str(generator_file),
            signature=generator_signature(meta),
            pip_requirements=[f"{p}=={v}" for p, v in package_versions().items() if p in ("torch", "gan_dist")],
        ).model_uri

    def _end(self, status: str) -> bool:
        self._send_metrics()
        if self._monitor is not None:
            self._monitor.finish()
        self._record_dropped()
        self._client.set_terminated(self.run_id, status)
        return True


def _params(values: dict[str, Any]) -> list[Param]:
    return [Param(key, str(value)) for key, value in values.items()]


def generator_signature(meta: dict[str, Any]) -> ModelSignature:
    """z [N, z_dim] float32 -> images [N, C, R, R] float32 in [-1, 1]."""
    z_dim, res, ch = meta["model"]["z_dim"], meta["resolution"], meta["channels"]
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, z_dim))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, ch, res, res))]),
    )


class GeneratorModel:
    """What ``mlflow.pyfunc.load_model`` returns the logged generator as."""

    def __init__(self, generator: torch.nn.Module) -> None:
        self.generator = generator

    def predict(self, model_input: Any, params: dict[str, Any] | None = None) -> np.ndarray:
        """z [N, z_dim] -> images [N, C, R, R] in [-1, 1]."""
        with torch.no_grad():
            return self.generator(torch.as_tensor(np.asarray(model_input, dtype=np.float32))).numpy()

    def get_raw_model(self) -> torch.nn.Module:
        return self.generator


def _load_pyfunc(data_path: str) -> GeneratorModel:
    """MLflow's pyfunc loader hook: weights load with torch.load(weights_only=True) via load_generator."""
    return GeneratorModel(load_generator(data_path)[0])

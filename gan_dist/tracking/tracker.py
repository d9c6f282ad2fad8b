"""Rank-0 MLflow logging: one MLflow run per gan_dist run name, continued on resume.

Only rank 0 builds an :class:`MlflowTracker`; other ranks get a :class:`NullTracker`. Every MLflow call runs
on one background thread the tracker owns. MLflow's async logging (3.17) is not used: it drops a failed
batch after an ERROR line per batch, gives no future for images, and its flush has no time limit. Here,
during an outage metric points wait in memory (bounded) and are sent once the server answers; images and
artifacts are dropped and counted (tag ``gan_dist.tracking_dropped``); one warning; a bounded finish.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
import warnings
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import mlflow
from mlflow.entities import Metric, Run, RunTag
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from mlflow.utils.time import get_current_time_millis
from PIL import Image

from gan_dist.config import GanConfig
from gan_dist.data.manifest import Manifest, read_manifest
from gan_dist.data.shards import dataset_base
from gan_dist.metrics.runner import extractor_identity
from gan_dist.tracking.experiment import experiment_id, mlflow_run_name
from gan_dist.tracking.redact import redact, redact_uri
from gan_dist.tracking.info import HTTP_LIMITS, RUN_NAME_TAG, cluster_params, run_params, run_tags
from gan_dist.tracking.model import log_generator_model

log = logging.getLogger(__name__)

DROPPED_TAG = "gan_dist.tracking_dropped"
EXTRACTOR_TAG = "gan_dist.extractor"  # the network + weights behind the quality/* metrics (FID of like with like)

RETRY_INTERVAL_S = 5.0  # after a failure, at most one attempt per interval; other jobs are skipped meanwhile
MAX_PENDING_METRICS = 50_000  # metric points kept for catch-up (~10 MB); the oldest are dropped beyond it
MAX_QUEUED_IMAGES = 4  # sample grids can be megabytes each: never let a slow server pile them up
_THREAD_NAME = "gan_dist-mlflow"

# urllib3 warns on every retry; the tracker warns once for a whole outage instead.
logging.getLogger("urllib3.connectionpool").addFilter(lambda record: record.threadName != _THREAD_NAME)
# The generator takes latent vectors, documented in its model signature; MLflow would warn on every logged model.
warnings.filterwarnings("ignore", message=".*An input example was not provided", category=UserWarning)


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
    described: bool = True  # needs the run's params, tags and config logged first (all but opening it)
    future: Future = field(default_factory=Future)


class Tracker(Protocol):
    run_id: str | None
    experiment_id: str | None
    latest: dict[str, float]  # the last value logged of each metric (rank 0), reported with every checkpoint

    def log_cluster(self, world_size: int, num_nodes: int, gpus: int) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_image(self, image: Image.Image, key: str, step: int) -> None: ...
    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> bool: ...
    def log_generator(self, generator_file: str | Path, register_as: str | None = None) -> str | None: ...
    def finish(self, status: str = "FINISHED") -> None: ...


class NullTracker:
    """What ranks other than 0 log to: nothing."""

    run_id: str | None = None
    experiment_id: str | None = None
    latest: dict[str, float] = {}  # never filled

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
        self.experiment_id: str | None = None
        self._new_run = self._ready = False
        self._config = redact(cfg.model_dump(mode="json"))
        self._manifest = self._read_manifest()
        self._params = run_params(self._config)
        self._name = mlflow_run_name(self._config)
        self._tags = {**run_tags(cfg, self._manifest), RUN_NAME_TAG: self._name}
        if cfg.tracking.parent_run_id:  # the UI nests the run under its parent (a sweep's)
            self._tags[MLFLOW_PARENT_RUN_ID] = cfg.tracking.parent_run_id
        self.latest: dict[str, float] = {}
        if cfg.eval.every:  # a tag, not a param: a resumed run may score with other weights from then on
            with contextlib.suppress(OSError, ValueError):  # no weights: building the extractor fails next, saying why
                self._tags[EXTRACTOR_TAG] = extractor_identity(cfg.eval)
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
        # Only the run's id is waited for (checkpoints carry it); its params, tags and config follow on the
        # logger's thread while the first steps run.
        self._wait(self._submit(self._ensure_open, force=True, described=False), open_timeout)

    # -- the training thread's side: queue and return -------------------------------------------------

    def log_cluster(self, world_size: int, num_nodes: int, gpus: int) -> None:
        """Cluster shape as params ``cluster.*`` (a new run only: MLflow params cannot change)."""
        shape = cluster_params(world_size, num_nodes, gpus)
        self._submit(lambda: self._new_run and self._client.log_batch(self.run_id, params=shape), lost=1)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self._closed:
            return
        now = get_current_time_millis()
        values = {key: float(value) for key, value in metrics.items()}
        self.latest.update(values)
        self._keep([Metric(key, value, now, step) for key, value in values.items()])
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
        log_model = lambda: log_generator_model(Path(generator_file), self.run_id, self.experiment_id, register_as)
        job = self._submit(log_model, lost=1, force=True)
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

    def _submit(self, fn: Callable[[], Any], lost: int = 0, force: bool = False, described: bool = True) -> Future:
        job = _Job(fn, lost, force, described)
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
                if job.described:
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

    def _ensure_open(self) -> None:
        """Find or create the run; idempotent."""
        if self._client is None:
            self._client = mlflow.MlflowClient(self._cfg.tracking.uri)
        if self.experiment_id is None:
            self._new_run = self._open_run()

    def _ensure_ready(self) -> None:
        """Open the run, then log its params (new runs only), tags and config; idempotent."""
        if self._ready:
            return
        self._ensure_open()
        params = self._params if self._new_run else []
        self._client.log_batch(self.run_id, params=params, tags=[RunTag(k, v) for k, v in self._tags.items()])
        self._client.log_dict(self.run_id, self._config, "config.yaml")  # the latest effective config
        if self._manifest is not None:
            manifest = redact(self._manifest.model_dump(mode="json"))
            self._client.log_dict(self.run_id, manifest, "dataset/manifest.json")
        self._ready = True
        log.debug("MLflow run %s (experiment %s) at %s", self.run_id, self.experiment_id, self._uri)
        self._restart_monitor()

    def _open_run(self) -> bool:
        """Sets run_id and experiment id; True if the run was created here."""
        client, name = self._client, self._name
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
        exp_id = experiment_id(client, self._cfg)
        found = client.search_runs([exp_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{name}'", max_results=1)
        if found:
            return self._continue(found[0])
        tags = {k: v for k, v in self._tags.items() if k in (RUN_NAME_TAG, MLFLOW_PARENT_RUN_ID)}
        self.run_id = client.create_run(exp_id, run_name=name, tags=tags).info.run_id
        self.experiment_id = exp_id
        return True

    def _continue(self, run: Run) -> bool:
        self.run_id, self.experiment_id = run.info.run_id, run.info.experiment_id
        self._dropped_before = int(run.data.tags.get(DROPPED_TAG, 0))
        self._client.update_run(self.run_id, status="RUNNING")
        return False

    def _read_manifest(self) -> Manifest | None:
        try:
            return read_manifest(dataset_base(self._cfg.data.url), self._cfg.storage)
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

    def _end(self, status: str) -> bool:
        self._send_metrics()
        if self._monitor is not None:
            self._monitor.finish()
        self._record_dropped()
        self._client.set_terminated(self.run_id, status)
        return True

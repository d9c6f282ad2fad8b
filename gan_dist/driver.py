"""The driver: checks the job against its data, storage and tracking, starts (or joins) Ray and runs a
TorchTrainer, with a console watching it (``gan_dist.console``) or without.

The driver needs no GPU and does no training itself; it can run on a laptop, the Ray head or a job
submitter. It never imports the training stack (``gan_dist.train.loop``: MLflow, the metrics): a worker does,
and the driver's start-up is the user's first wait.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, TimeoutError as FutureTimeout
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import ray
import ray.train
from ray.train.torch import TorchTrainer

import gan_dist
from gan_dist.config import ConfigError, GanConfig
from gan_dist.data.shards import plan_data
from gan_dist import storage
from gan_dist.storage import StorageError, pyarrow_filesystem
from gan_dist.tracking.redact import check_no_secrets
from gan_dist.train.progress import HUB_NAMESPACE, ProgressHub, hub_name

POLL_S = 0.5  # how often the driver collects rank 0's events
TRACKING_SCHEMES = ("", "file", "sqlite", "http", "https", "postgresql", "mysql", "mssql", "databricks", "databricks-uc", "uc")


def train_worker(config: dict[str, Any]) -> None:
    """What Ray Train runs on every rank. Imported there, so the driver never loads the training stack."""
    from gan_dist.train.loop import train_worker as run

    run(config)


# The driver checks from where it runs; a cluster's nodes reach storage and tracking with their own network
# and credentials.
DOCTOR_HINT = "; on a cluster, `gan-dist doctor CONFIG --address HOST:6379` checks it from every node"


class RunError(Exception):
    """A problem the user can fix: what failed, one message, and a hint (``gan-dist train`` prints them)."""

    def __init__(self, what: str, message: str, hint: str = "", log_path: str | None = None) -> None:
        super().__init__(f"{what}: {message}")
        self.what, self.message, self.hint, self.log_path = what, message, hint, log_path


class Watcher(Protocol):
    """What ``run_training`` tells a console while it runs (``gan_dist.console.RunConsole``)."""

    def phase(self, text: str) -> None: ...
    def event(self, event: dict[str, Any]) -> None: ...
    def stop_requested(self) -> None: ...


@dataclass
class TrainingOutcome:
    run_name: str
    checkpoint_path: str | None
    mlflow_run_id: str | None
    tracking_uri: str
    final_step: int
    metrics: dict
    stopped: str | None = None  # why the run ended before train.steps on purpose (a user's stop)


def preflight(cfg: GanConfig, address: str | None = None) -> Any:
    """Fail before Ray starts when the data cannot feed the configured worker group or does not fit the model;
    a conditional model takes its class count from the dataset's manifest unless the config sets it. For a
    cluster (``address``, or RAY_ADDRESS), refuse a config carrying a credential: it travels there as the trainer's
    argument, readable by any code on the cluster. Returns the data plan."""
    if address is not None or os.environ.get("RAY_ADDRESS"):
        check_no_secrets(cfg)
    try:
        plan = plan_data(cfg, cfg.scaling.max_workers)
    except ValueError as exc:
        raise ConfigError("data.url", str(exc)) from None
    if cfg.model.conditional:
        check_classes(cfg, list(plan.class_names))
    return plan


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


def check_reachable(cfg: GanConfig, address: str | None) -> None:
    """Before Ray starts: the checkpoint storage, the tracking server and the cluster answer (each a RunError
    with a hint when not), so that no worker group starts for a run that cannot keep what it does."""
    root = storage.join(cfg.checkpoint.storage, cfg.run.name)
    try:
        storage.exists(root, cfg.storage)
    except (StorageError, OSError) as exc:
        raise RunError("checkpoint storage unreachable", str(exc).splitlines()[0],
                       "check checkpoint.storage, storage.endpoint_url and the AWS_* credentials in this environment"
                       + DOCTOR_HINT)
    check_tracking_uri(cfg.tracking.uri)
    if address is not None and "://" not in address and address != "auto":
        _check_cluster(address)


def check_tracking_uri(uri: str) -> None:
    """A tracking URI with a scheme MLflow has no store for, or a server that does not answer at all."""
    from urllib.parse import urlparse

    scheme = urlparse(uri).scheme.split("+")[0]
    hint = "fix tracking.uri, or keep metrics locally: --set tracking.uri=sqlite:///gan_dist_mlflow.db"
    if scheme not in TRACKING_SCHEMES:
        raise RunError("tracking.uri", f"{_redact(uri)}: MLflow has no tracking store for '{scheme}://'", hint)
    if scheme == "sqlite" and not uri.startswith("sqlite:///"):
        raise RunError("tracking.uri", f"{_redact(uri)}: a sqlite store is sqlite:///relative/path.db or "
                       "sqlite:////absolute/path.db (three or four slashes)", hint)
    if scheme in ("http", "https"):
        import urllib3

        try:  # any HTTP answer will do here (even 401): the run itself checks what the server says
            urllib3.PoolManager().request("GET", uri.rstrip("/") + "/health", retries=False, timeout=5)
        except urllib3.exceptions.HTTPError as exc:
            raise RunError("MLflow tracking server unreachable", f"{_redact(uri)}: {_reason(exc)}",
                           "start it (mlflow server --host 0.0.0.0 --port 5000 ...) or " + hint + DOCTOR_HINT) from None


def _check_cluster(address: str) -> None:
    """ray.init waits minutes for a GCS that does not answer: a TCP connect tells at once."""
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except (OSError, ValueError) as exc:
        raise RunError("no Ray cluster at --address", f"{address}: {_reason(exc)}",
                       "give the head's GCS address (HOST:6379; `ray status` on the head shows it), start one with "
                       "`ray start --head` or cluster/local.sh, leave --address out to train on a local Ray instance, "
                       "or use `gan-dist submit --address http://HEAD:8265` for a cluster's dashboard address") from None


def _reason(exc: BaseException) -> str:
    return str(getattr(exc, "reason", None) or exc).splitlines()[0]


def _redact(uri: str) -> str:
    from gan_dist.tracking.redact import redact_uri

    return redact_uri(uri)


def connect(address: str | None) -> bool:
    """Join the cluster at ``address`` (or the submitted job's cluster), else start a local Ray instance.
    True if this call started (or joined) Ray, False if this process was already connected."""
    if ray.is_initialized():
        return False
    if address is None and os.environ.get("RAY_ADDRESS"):
        ray.init()  # inside a submitted job: join the job's cluster (its runtime env ships this package)
    elif address is None:
        private_default_token()
        ray.init(address="local", include_dashboard=False, configure_logging=False)
    else:
        # A remote cluster's workers do not have this package: ship it with the job.
        ray.init(address=address, runtime_env={"py_modules": [str(Path(gan_dist.__file__).parent)]})
    return True


def private_default_token() -> None:
    """Before a local instance starts with token auth: Ray would write a missing ~/.ray/auth_token with this
    process's umask, often readable by every user (ray/_private/authentication/authentication_token_setup.py
    generate_and_save_token), and `gan-dist submit` later sends that token to clusters. Make it here, mode 0600,
    or tighten the one an earlier Ray left readable. A token from RAY_AUTH_TOKEN(_PATH) is the user's to guard."""
    from ray._raylet import AuthenticationTokenLoader

    token_env = os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")
    if os.environ.get("RAY_AUTH_MODE", "token").lower() != "token" or token_env:  # unset: Ray's default is token
        return
    path = Path.home() / ".ray" / "auth_token"
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        if path.stat().st_mode & 0o077:
            path.chmod(0o600)
        return
    with os.fdopen(fd, "w") as file:
        file.write(secrets.token_hex(32))  # 256 bits, as Ray's own generator makes them
    AuthenticationTokenLoader.instance().reset_cache()  # it may have looked for the file already


def build_trainer(cfg: GanConfig, ray_log_level: str = "INFO", callbacks: list[Any] | None = None) -> TorchTrainer:
    """``ray_log_level``: the level of Ray Train's own console lines (worker-group banners are INFO; its log
    files in the Ray session keep every level). ``callbacks``: Ray Train callbacks (a sweep's trial reports)."""
    scaling = ray.train.ScalingConfig(
        num_workers=cfg.scaling.num_workers,  # (min, max): Ray's elastic policy sizes the group to what fits
        use_gpu=cfg.scaling.use_gpu,
        resources_per_worker={"CPU": cfg.scaling.cpus_per_worker, **({"GPU": 1} if cfg.scaling.use_gpu else {})},
        elastic_resize_monitor_interval_s=cfg.scaling.resize_check_s,
    )
    filesystem, storage_path = pyarrow_filesystem(cfg.checkpoint.storage, cfg.storage)
    run = ray.train.RunConfig(
        name=cfg.run.name,
        storage_path=storage_path,
        storage_filesystem=filesystem,
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.checkpoint.num_to_keep),
        failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
        logging_config=ray.train.LoggingConfig(log_level=ray_log_level),
        callbacks=callbacks,
    )
    return TorchTrainer(
        train_worker,
        train_loop_config=cfg.model_dump(mode="json"),
        scaling_config=scaling,
        run_config=run,
    )


def run_training(
    cfg: GanConfig, address: str | None = None, watcher: Watcher | None = None, verbose: bool = False
) -> TrainingOutcome:
    """Train to ``cfg.train.steps`` (continuing the run if ``cfg.run.name`` already has checkpoints).

    With a ``watcher`` (the CLI's console): rank 0's progress reaches it through a hub actor, Ray Train's own
    INFO lines stay in its log files unless ``verbose``, and Ctrl-C stops in two stages (``_two_stage_ctrl_c``).
    Raises RunError for problems the user can fix before anything trains."""
    preflight(cfg, address)
    if "://" not in cfg.checkpoint.storage:
        os.makedirs(cfg.checkpoint.storage, exist_ok=True)
    check_reachable(cfg, address)
    phase = watcher.phase if watcher else (lambda text: None)
    # The tracking store is opened (a new sqlite store created) while Ray and the worker group start: off the
    # way to the first step; a store that fails ends the run before rank 0 needs it.
    # Niceness 19: Ray starts its workers at 15; on a machine with few cores this thread must not delay them.
    prepared = in_background(lambda: prepare_run(cfg), nice=19)
    phase("starting a local Ray instance" if address is None and not os.environ.get("RAY_ADDRESS") else "joining the cluster")
    owns_ray = connect(address)
    try:
        trainer = build_trainer(cfg, "INFO" if verbose or watcher is None else "WARNING")
        phase(f"starting {cfg.scaling.num_workers} workers" if not cfg.scaling.elastic else "starting workers")
        try:
            result = _fit_watched(trainer, cfg, watcher, prepared) if watcher else _fit_prepared(trainer, prepared)
        except ray.train.TrainingFailedError as exc:
            exc.gan_dist_log = _failure_log(cfg, exc)  # type: ignore[attr-defined]
            raise
        return training_outcome(cfg, result, prepared.result())
    finally:
        if owns_ray and watcher is not None:
            ray.shutdown()  # now: Ray's controller would otherwise go on logging its own shutdown under our summary


def prepare_run(cfg: GanConfig) -> str:
    """Off the main thread: reach the tracking store once (RunError if it fails) and clear an earlier attempt's
    stop marker; returns the marker's URL."""
    from gan_dist.tracking.info import open_store

    try:
        open_store(cfg.tracking.uri)
    except Exception as exc:
        raise RunError("MLflow tracking failed", f"{_redact(cfg.tracking.uri)}: {_redact(str(exc).splitlines()[0])}",
                       "check tracking.uri and the MLFLOW_TRACKING_* credentials in this environment") from None
    from gan_dist.train.phases import stop_marker_url  # the marker's home (the training stack: imported here)

    marker = stop_marker_url(cfg)
    if storage.exists(marker, cfg.storage):  # left by an earlier attempt of this run
        storage.delete(marker, cfg.storage)
    return marker


def _fit_prepared(trainer: TorchTrainer, prepared: Future) -> Any:
    prepared.result()
    return trainer.fit()


def training_outcome(cfg: GanConfig, result: Any, marker: str) -> TrainingOutcome:
    """What a finished ``fit()`` of this run did (its stop marker says whether a user or a sweep stopped it)."""
    from gan_dist.train.phases import NonFiniteLoss

    stopped = json.loads(storage.read_bytes(marker, cfg.storage)) if storage.exists(marker, cfg.storage) else {}
    if stopped and stopped.get("status", "FAILED") == "FAILED":
        raise NonFiniteLoss(f"run '{cfg.run.name}' stopped: {stopped['reason']}; the last good checkpoint is kept")
    metrics = dict(result.metrics or {})
    return TrainingOutcome(
        run_name=cfg.run.name,
        checkpoint_path=result.checkpoint.path if result.checkpoint else None,
        mlflow_run_id=metrics.get("mlflow_run_id") or stopped.get("mlflow_run_id") or None,
        tracking_uri=cfg.tracking.uri,
        final_step=int(metrics.get("step", 0)),
        metrics=metrics,
        stopped=stopped.get("reason") if stopped else None,
    )


def in_background(fn: Callable[[], Any], nice: int = 0) -> Future:
    """``fn()`` on a thread; ``nice``: its Linux scheduling niceness (higher: it only takes idle CPU)."""
    done: Future = Future()

    def run() -> None:
        try:
            if nice:
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
            done.set_result(fn())
        except BaseException as exc:  # handed to whoever waits for the result
            done.set_exception(exc)

    threading.Thread(target=run, name="gan_dist-driver", daemon=True).start()
    return done


def _fit_watched(trainer: TorchTrainer, cfg: GanConfig, watcher: Watcher, prepared: Future) -> Any:
    """``trainer.fit()`` on a thread (so that Ray's own SIGINT handler stays out) while this one passes rank 0's
    events to the watcher, handles Ctrl-C, and ends the run if ``prepared`` failed."""
    try:
        hub = ray.remote(num_cpus=0)(ProgressHub).options(name=hub_name(cfg.run.name), namespace=HUB_NAMESPACE).remote()
    except ValueError:
        raise RunError("run already training", f"'{cfg.run.name}' has a driver on this cluster already",
                       "wait for it, stop it, or give this run another run.name") from None
    fitted = in_background(trainer.fit)
    with _two_stage_ctrl_c() as stop:
        while True:
            try:
                result = fitted.result(timeout=POLL_S)
                break
            except FutureTimeout:
                _deliver(hub, watcher)
            if stop.is_set() and not stop.sent:
                stop.sent = True
                hub.request_stop.remote("stopped with Ctrl-C")  # rank 0 polls it (gan_dist.train.progress)
                watcher.stop_requested()
            if prepared.done() and prepared.exception() is not None:
                raise prepared.exception()  # run_training shuts Ray down, and the worker group with it
    _deliver(hub, watcher)
    return result


def _deliver(hub: Any, watcher: Watcher) -> None:
    try:
        events = ray.get(hub.drain.remote(), timeout=10)
    except (ray.exceptions.RayError, TimeoutError):
        return  # the next poll tries again; progress is a view, never a reason to fail the run
    for event in events:
        watcher.event(event)


class _StopRequest(threading.Event):
    sent = False  # passed on to the hub


@contextmanager
def _two_stage_ctrl_c() -> Iterator[_StopRequest]:
    """First Ctrl-C: set the event (the poll loop asks rank 0, through the hub, to checkpoint the current step and
    end the run; the ranks agree on the step in ``gan_dist.train.stop``). Second Ctrl-C: KeyboardInterrupt, at
    once. The handler itself calls nothing of Ray's: it may interrupt this thread inside a Ray call."""
    stop = _StopRequest()

    def on_sigint(signum: int, frame: Any) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)


def _failure_log(cfg: GanConfig, exc: BaseException) -> str | None:
    """The whole failure (every rank's traceback) in a file next to Ray's own logs of this session."""
    import tempfile
    import traceback

    node = ray._private.worker._global_node  # None when this driver joined through Ray Client
    folder = Path(node.get_session_dir_path()) / "logs" if node is not None else Path(tempfile.gettempdir())
    path = folder / f"gan_dist-{cfg.run.name}-failure.log"
    try:
        path.write_text("".join(traceback.format_exception(exc)))
    except OSError:
        return None
    return str(path)

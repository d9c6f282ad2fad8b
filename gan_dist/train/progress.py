"""The progress channel: rank 0 -> the driver's console, and the driver's stop request -> rank 0.

The driver (``gan_dist.driver``) starts one :class:`ProgressHub` actor per run, named after the run, and polls
it for events; rank 0 finds it by that name. Nothing here waits on the hub:

- ``publish`` is a fire-and-forget actor call (its result is never fetched), made where the loop already has
  host values: at a log step (the window's means, one host sync per log interval), a checkpoint, an
  evaluation;
- ``stop_requested`` asks the hub at most once per ``STOP_POLL_S`` and looks for the answer with
  ``ray.wait(timeout=0)``: no step ever waits for the driver.

Without a hub (``run_training`` called without a console, e.g. by the tests or the bench) rank 0 writes the
same progress lines to stderr instead, as before the channel existed. Other ranks publish nothing.

How the loop uses it (``gan_dist.train.loop`` / ``phases``)::

    progress = ProgressChannel.connect(cfg, rank)          # start_worker, once per worker start
    progress.started(step, world, tracker)                  # the MLflow run is known now
    w.progress.publish("log", w.step, metrics)              # maybe_log: the window's means (host floats)
    w.progress.publish("checkpoint", step)                  # report_checkpoint, rank 0, after ray.train.report
    w.progress.publish("eval", w.step, scores)              # maybe_evaluate, rank 0
    StopWatch(..., user_stop=progress.stop_requested)       # gan_dist.train.stop agrees on it across ranks
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Mapping
from typing import Any, Protocol

HUB_NAMESPACE = "gan_dist"
STOP_POLL_S = 0.5  # how often rank 0 asks the hub whether the user asked to stop


def progress_logger() -> logging.Logger:
    """Progress lines on stderr: Ray Train V2 echoes a worker's stdout twice, its stderr once."""
    log = logging.getLogger("gan_dist.progress")
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[gan_dist] %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    return log


class _Config(Protocol):  # the parts of GanConfig used here (this module must not import torch)
    run: Any
    train: Any


class _Tracker(Protocol):
    run_id: str | None
    experiment_id: str | None


def hub_name(run_name: str) -> str:
    return f"progress:{run_name}"


class ProgressHub:
    """A Ray actor owned by the driver (``num_cpus=0``): a mailbox of rank 0's events and the user's stop
    request. It never calls anyone; the driver drains it, rank 0 posts to it."""

    def __init__(self) -> None:
        self._events: list[dict[str, Any]] = []
        self._stop: str | None = None

    def publish(self, event: dict[str, Any]) -> None:
        self._events.append(event)

    def drain(self) -> list[dict[str, Any]]:
        events, self._events = self._events, []
        return events

    def request_stop(self, reason: str) -> None:
        self._stop = reason

    def stop_request(self) -> str | None:
        return self._stop


def format_eta(seconds: float | None) -> str:
    if seconds is None:
        return "--"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def format_step(step: int, total: int, metrics: Mapping[str, Any], eta_s: float | None) -> str:
    """The one-line form of a log event: the worker's stderr line without a console, the console's plain line."""
    def get(key: str) -> float:
        return float(metrics.get(key, float("nan")))

    return (
        f"step {step}/{total} | d_loss {get('losses/d'):.4f} g_loss {get('losses/g'):.4f} "
        f"| D(x) {get('discriminator/real'):.3f} D(G(z)) {get('discriminator/fake'):.3f} "
        f"| {get('throughput/images_per_sec'):.0f} img/s | ETA {format_eta(eta_s)}"
    )


def format_scores(step: int, scores: Mapping[str, Any]) -> str:
    return f"step {step} | " + " ".join(f"{k} {float(v):.4g}" for k, v in scores.items())


class ProgressChannel:
    """Rank 0's end of the channel (see the module doc). Build it with :meth:`connect`."""

    def __init__(self, hub: Any | None, total_steps: int, echo: bool) -> None:
        self._hub, self._total, self._echo = hub, total_steps, echo
        self._last: tuple[int, float] | None = None  # (step, time) of the previous log event, for the ETA
        self._pending: Any | None = None  # an unanswered stop_request call
        self._asked_at = 0.0
        self._stop: str | None = None

    @classmethod
    def connect(cls, cfg: _Config, rank: int) -> ProgressChannel:
        """Rank 0 finds the run's hub if the driver started one; every other rank gets a silent channel."""
        if rank != 0:
            return cls(None, cfg.train.steps, echo=False)
        import ray

        try:
            hub = ray.get_actor(hub_name(cfg.run.name), namespace=HUB_NAMESPACE)
        except ValueError:  # no console is watching: plain lines on stderr
            hub = None
        return cls(hub, cfg.train.steps, echo=True)

    @classmethod
    def null(cls) -> ProgressChannel:
        return cls(None, 0, echo=False)

    @property
    def connected(self) -> bool:
        return self._hub is not None

    def started(self, step: int, world: int, tracker: _Tracker) -> None:
        """Once per worker start, when the MLflow run is known (a restarted group says so again)."""
        self._last = (step, time.time())
        self.publish("start", step, {"world": world, "mlflow_run_id": tracker.run_id,
                                     "mlflow_experiment_id": getattr(tracker, "experiment_id", None)})  # fmt: skip

    def publish(self, kind: str, step: int, metrics: Mapping[str, Any] | None = None) -> None:
        """Post an event ("start", "log", "checkpoint", "eval"); never waits. ``metrics`` must be host values."""
        if not self._echo:
            return
        event = {"kind": kind, "step": step, "time": time.time(), "metrics": dict(metrics or {})}
        if kind == "log":
            event["eta_s"] = self._eta(step, event["time"])
        if self._hub is not None:
            self._hub.publish.remote(event)  # fire and forget: the reference is dropped, nothing waits
        elif kind in ("log", "eval"):
            line = format_step(step, self._total, event["metrics"], event.get("eta_s")) if kind == "log" else \
                format_scores(step, event["metrics"])  # fmt: skip
            progress_logger().info(line)

    def _eta(self, step: int, now: float) -> float | None:
        last, self._last = self._last, (step, now)
        if last is None or step <= last[0]:
            return None
        return (self._total - step) * (now - last[1]) / (step - last[0])

    def stop_requested(self) -> bool:
        """True once the user asked the driver to stop (Ctrl-C). Non-blocking; cheap enough for every step."""
        if self._stop is not None or self._hub is None:
            return self._stop is not None
        import ray

        if self._pending is not None:
            ready, _ = ray.wait([self._pending], timeout=0)
            if ready:
                try:
                    self._stop = ray.get(self._pending)
                except ray.exceptions.RayError:  # the driver (and its hub) went away: nobody to ask any more
                    self._hub = None
                self._pending = None
        elif time.monotonic() - self._asked_at >= STOP_POLL_S:
            self._asked_at = time.monotonic()
            self._pending = self._hub.stop_request.remote()
        return self._stop is not None

    @property
    def stop_reason(self) -> str | None:
        return self._stop

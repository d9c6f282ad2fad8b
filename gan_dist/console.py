"""The driver's console: a header, one live progress display fed by rank 0, a summary; Ray's own noise kept out.

On a terminal the progress is a rich bar redrawn in place (Ray's forwarded worker lines scroll above it); when
stdout is not a terminal (CI, ``ray job logs``, ``gan-dist submit --follow``) the same facts come as plain lines,
one per event. Rank 0 feeds it through ``gan_dist.train.progress``; ``driver.run_training`` drives it.
"""

from __future__ import annotations

import os
import shlex
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console, RenderableType
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.text import Text

from gan_dist.train.progress import format_eta, format_scores, format_step

# Lines of Ray's internal machinery that never concern the user's run, dropped on the driver through Ray's log
# deduplicator (RAY_DEDUP_LOGS_SKIP_REGEX: ray/_private/ray_constants.py, applied line by line in
# ray/_private/ray_logging/__init__.py LogDeduplicator.deduplicate). A worker's traceback never matches them.
AUTH_MODE = "RAY_AUTH_MODE"  # ray/_private/authentication/authentication_token_setup.py AUTH_MODE_ENV_VAR
RAY_NOISE = (
    # PlacementGroupCleaner polls the State API, which needs a dashboard; a local gan_dist instance starts none
    # (ray/train/v2/_internal/execution/controller/placement_group_cleaner.py).
    r"Failed to query Ray Train Controller actor state",
    # core_worker.cc about Ray Train's own PreemptionWatcher actor (https://github.com/ray-project/ray/issues/53727).
    r"PreemptionWatcher.* has constructor arguments in the object store",
    # Ray Train's per-report INFO line: its logger is named after its file path (ray/train/v2/_internal/execution/
    # context.py: getLogger(__file__)), so Ray Train's LoggingConfig level does not reach it.
    r"^Reporting training result \d+: TrainingReport\(",
)


def quiet_ray(verbose: bool, local: bool) -> None:
    """Set Ray's switches for what reaches this console; before ``import ray`` (Ray reads them at import).
    The user's environment wins over every one of them; ``verbose`` leaves Ray's output as it is."""
    if not verbose:
        os.environ.setdefault("RAY_DEDUP_LOGS_SKIP_REGEX", "|".join(RAY_NOISE))
        # No "(RayTrainWorker pid=...)" tags on forwarded lines: only gan_dist's own, already tagged [gan_dist]
        # (ray/_private/ray_constants.py, used by ray/_private/worker.py print_worker_logs).
        os.environ.setdefault("RAY_DISABLE_WORKER_LOG_PREFIX", "1")
    if local:
        # Nobody drains a node of a local instance: no preemption-watcher actor to start (and nothing for it to
        # log). ray/train/v2/_internal/constants.py, propagated by Ray Train to its controller and workers.
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        # Ray starts one idle worker process per CPU when the driver connects; Ray Train's actors run in
        # processes of their own runtime env and never use them, so on a small machine they only take the CPU
        # the start needs (RayConfig prestart_worker_first_driver, set through Ray's RAY_<config> variables).
        os.environ.setdefault("RAY_prestart_worker_first_driver", "0")
    # An explicit RAY_AUTH_MODE keeps Ray's token-auth notice out (ray/_private/authentication/
    # authentication_token_setup.py prints it only when unset), with Ray's own choice: token auth for a local
    # instance, and for a cluster whatever a token present here allows (the cluster decides if it needs one).
    if AUTH_MODE not in os.environ:
        os.environ[AUTH_MODE] = "token" if local or _has_ray_token() else "disabled"
        if "ray" in sys.modules:  # Ray caches its config at import: refresh it, as Ray's _enable_token_auth does
            from ray._raylet import Config

            Config.initialize("")


def _has_ray_token() -> bool:
    from ray._raylet import AuthenticationTokenLoader

    return AuthenticationTokenLoader.instance().has_token(ignore_auth_mode=True)


@dataclass
class RunState:
    """What the console knows about the run, from rank 0's events."""

    total: int
    step: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    scores: dict[str, float] = field(default_factory=dict)
    eta_s: float | None = None
    checkpoint_step: int | None = None
    mlflow_run_id: str | None = None
    mlflow_experiment_id: str | None = None
    world: int | None = None
    starts: int = 0  # worker-group starts seen (> 1: restarted after a failure)
    stop_requested: bool = False

    def apply(self, event: dict[str, Any]) -> None:
        kind, metrics = event["kind"], event.get("metrics", {})
        self.step = max(self.step, event["step"]) if kind != "start" else event["step"]
        if kind == "start":
            self.starts += 1
            self.world = metrics.get("world")
            self.mlflow_run_id = metrics.get("mlflow_run_id") or self.mlflow_run_id
            self.mlflow_experiment_id = metrics.get("mlflow_experiment_id") or self.mlflow_experiment_id
        elif kind == "log":
            self.metrics, self.eta_s = metrics, event.get("eta_s")
        elif kind == "eval":
            self.scores = metrics
        elif kind == "checkpoint":
            self.checkpoint_step = event["step"]

    def stats(self) -> str:
        """The line under the bar: latest losses, D outputs, last checkpoint, latest FID/KID."""
        m, parts = self.metrics, []
        if m:
            parts.append(f"d_loss {m.get('losses/d', float('nan')):.3f}  g_loss {m.get('losses/g', float('nan')):.3f}")
            parts.append(f"D(x) {m.get('discriminator/real', float('nan')):.3f}  "
                         f"D(G(z)) {m.get('discriminator/fake', float('nan')):.3f}")  # fmt: skip
        if self.scores:
            parts.append("  ".join(f"{k} {v:.4g}" for k, v in self.scores.items() if k in ("fid", "kid", "is")))
        parts.append(f"checkpoint {'step ' + str(self.checkpoint_step) if self.checkpoint_step is not None else '—'}")
        if self.starts > 1:
            parts.append(f"restarted {self.starts - 1}x")
        return " · ".join(parts)


class _Bar(Progress):
    """rich's progress bar with the run's latest numbers on a line below it."""

    def __init__(self, state: RunState, console: Console) -> None:
        self._state = state  # before rich's __init__, which may render already
        super().__init__(
            SpinnerColumn(), TextColumn("{task.description}"), BarColumn(bar_width=None), MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"), TextColumn("ETA {task.fields[eta]} •"), TimeElapsedColumn(),
            console=console, redirect_stdout=True, redirect_stderr=True, refresh_per_second=4, expand=True,
        )  # fmt: skip
        self.task = self.add_task("starting", total=state.total, rate="", eta="--")

    def get_renderables(self) -> Iterator[RenderableType]:
        yield self.make_tasks_table(self.tasks)
        yield Text("  " + self._state.stats(), style="dim")


class RunConsole:
    """The console of one ``gan-dist train``: ``header``, then ``with console.live():`` around the run (the
    driver calls ``phase``, ``event`` and ``stop_requested``), then ``summary`` or ``failure``."""

    def __init__(self, cfg: Any, out: Console, verbose: bool = False, command: Sequence[str] = ()) -> None:
        self.cfg, self.out, self.verbose = cfg, out, verbose
        self.state = RunState(total=cfg.train.steps)
        self.command = list(command)  # how the user started this run, to tell how to continue it
        self._bar: _Bar | None = None
        self._started = time.monotonic()

    # -- before -----------------------------------------------------------------------------------------

    def header(self, address: str | None, data: str = "") -> None:
        cfg = self.cfg
        model = cfg.model
        sizes = [f"{k[0].upper()} {getattr(model, k)}" for k in ("g_width", "d_width") if hasattr(model, k)]
        widths = " / ".join(sizes) + (", " if sizes else "") + f"z {model.z_dim}"
        scaling = cfg.scaling
        workers = f"{scaling.min_workers}–{scaling.max_workers}" if scaling.elastic else str(scaling.num_workers)
        device = "GPU" if scaling.use_gpu else f"{scaling.cpus_per_worker:g} CPU"
        rows = [
            ("model", f"{model.arch} ({widths}) · {cfg.loss.name} loss · {cfg.train.steps} steps · batch {cfg.train.batch_size}"),
            ("data", f"{cfg.data.url}{' · ' + data if data else ''} · {cfg.data.resolution}px × {cfg.data.channels}"),
            ("workers", f"{workers} × {device} on {'a local Ray instance' if address is None else address}"),
            ("checkpoints", f"{_join(cfg.checkpoint.storage, cfg.run.name)} (every {cfg.checkpoint.every} steps)"),
            ("metrics", f"MLflow {_redacted(cfg.tracking.uri)} · experiment {cfg.tracking.experiment}"),
        ]  # fmt: skip
        self.out.print(f"[bold]gan_dist[/] · run [bold cyan]{escape(cfg.run.name)}[/]", highlight=False)
        self.out.print(_grid(rows), highlight=False)

    # -- during: called by driver.run_training ------------------------------------------------------------

    @contextmanager
    def live(self) -> Iterator[RunConsole]:
        if self.out.is_terminal:
            with _Bar(self.state, self.out) as bar:
                self._bar = bar
                try:
                    yield self
                finally:
                    self._bar = None
        else:
            yield self

    def phase(self, text: str) -> None:
        """What the run is doing before its first step (starting Ray, the workers, ...)."""
        if self._bar is not None:
            self._bar.update(self._bar.task, description=text)
        else:
            self._plain(text)

    def event(self, event: dict[str, Any]) -> None:
        state, kind = self.state, event["kind"]
        state.apply(event)
        if self._bar is not None:
            self._redraw()
        elif kind == "log":
            self._plain(format_step(state.step, state.total, state.metrics, state.eta_s))
        elif kind == "eval":
            self._plain(format_scores(event["step"], state.scores))
        elif kind == "checkpoint":
            self._plain(f"checkpoint at step {event['step']}")
        elif kind == "start":
            self._plain(self._start_text(event))

    def _start_text(self, event: dict[str, Any]) -> str:
        world = event["metrics"].get("world")
        where = f"from step {event['step']}" if event["step"] else "from scratch"
        again = "restarted, " if self.state.starts > 1 else ""
        return f"training on {world} worker(s), {again}{where}"

    def _redraw(self) -> None:
        state, bar = self.state, self._bar
        rate = state.metrics.get("throughput/images_per_sec")
        label = "stopping: checkpoint, then end" if state.stop_requested else (
            "training" if state.metrics else "first steps")  # fmt: skip
        bar.update(bar.task, completed=state.step, description=label,
                   rate=f"{rate:.0f} img/s" if rate else "", eta=format_eta(state.eta_s))  # fmt: skip

    def stop_requested(self) -> None:
        """The first Ctrl-C: the run checkpoints the step it is at and ends; a second one stops at once."""
        self.state.stop_requested = True
        self._notice("Ctrl-C: stopping after this step with a checkpoint (Ctrl-C again to stop at once)")
        if self._bar is not None:
            self._redraw()

    def _notice(self, text: str) -> None:
        self.out.print(f"[yellow]{escape(text)}[/]", highlight=False)

    def _plain(self, text: str) -> None:
        self.out.print(text, markup=False, highlight=False)

    # -- after --------------------------------------------------------------------------------------------

    def summary(self, outcome: Any, links: dict[str, str] | None = None) -> None:
        """Final metrics, checkpoint, MLflow run (``links``: its page URL, the latest sample grid), next command."""
        state, links = self.state, links or {}
        elapsed = format_eta(time.monotonic() - self._started)
        if outcome.stopped:
            self.out.print(f"[yellow]■ stopped[/] run [bold]{escape(outcome.run_name)}[/] at step {outcome.final_step}"
                           f"/{state.total} after {elapsed} ({escape(outcome.stopped)})", highlight=False)  # fmt: skip
        else:
            self.out.print(f"[green]✓ done[/] run [bold]{escape(outcome.run_name)}[/] at step {outcome.final_step}"
                           f"/{state.total} in {elapsed}", highlight=False)  # fmt: skip
        rows = []
        if state.metrics:
            rows.append(("final", format_step(state.step, state.total, state.metrics, None).split(" | ", 1)[1]
                         .rsplit(" | ETA", 1)[0]))  # fmt: skip
        if state.scores:
            rows.append(("quality", format_scores(state.step, state.scores).split(" | ", 1)[1]))
        rows.append(("checkpoint", outcome.checkpoint_path or "none"))
        rows += self._mlflow_rows(outcome, links)
        rows.append(("continue", self.continue_command(outcome.run_name, more_steps=not outcome.stopped)))
        self.out.print(_grid(rows), highlight=False)

    def _mlflow_rows(self, outcome: Any, links: dict[str, str]) -> list[tuple[str, str]]:
        if not outcome.mlflow_run_id:
            return [("MLflow run", f"none: tracking at {_redacted(outcome.tracking_uri)} failed (see the warning above)")]
        rows = [("MLflow run", f"{outcome.mlflow_run_id} in experiment {self.cfg.tracking.experiment}")]
        if "page" in links:
            rows.append(("", f"[link={links['page']}]{escape(links['page'])}[/link]"))
        if "ui" in links:
            rows.append(("MLflow UI", links["ui"]))
            rows.append(("", f"then open {links['ui_page']}"))
        if "samples" in links:
            rows.append(("samples", links["samples"]))
        return rows

    def continue_command(self, run_name: str, more_steps: bool) -> str:
        """The command that continues this run: the user's own, with its run name pinned (and more steps)."""
        args = [a for a in self.command if not _sets(a, "run.name") and not (more_steps and _sets(a, "train.steps"))]
        args = _drop_dangling_set(args)
        extra = ["--set", f"run.name={run_name}"]
        if more_steps:
            extra += ["--set", f"train.steps={2 * self.state.total}"]
        return " ".join(shlex.quote(a) for a in ["gan-dist", *args, *extra])

    def failure(self, kind: str, message: str, hint: str = "", log_path: str | None = None) -> None:
        """One clear message, a hint, and where the full story is."""
        self.out.print(f"[bold red]✗ {escape(kind)}:[/] {escape(message)}", highlight=False)
        if hint:
            self.out.print(f"  [bold]hint:[/] {escape(hint)}", highlight=False)
        if log_path:
            self.out.print(f"  full error and tracebacks: {escape(log_path)}", highlight=False)


def _grid(rows: Sequence[tuple[str, str]]) -> Text:
    """Key/value lines, never wrapped mid-value (paths and commands stay copyable)."""
    width = max(len(key) for key, _ in rows)
    text = Text()
    for key, value in rows:
        text.append(f"  {key:<{width}}  ", style="dim")
        text.append_text(Text.from_markup(value) if "[link=" in value else Text(value))
        text.append("\n")
    text.rstrip()
    return text


def _sets(arg: str, key: str) -> bool:
    return arg.strip().startswith(f"{key}=")


def _drop_dangling_set(args: list[str]) -> list[str]:
    """``--set`` options whose value was removed."""
    out: list[str] = []
    for i, arg in enumerate(args):
        if arg == "--set" and (i + 1 == len(args) or args[i + 1].startswith("--")):
            continue
        out.append(arg)
    return out


def _join(base: str, name: str) -> str:
    return f"{base.rstrip('/')}/{name}"


def _redacted(uri: str) -> str:
    from gan_dist.tracking.redact import redact_uri

    return redact_uri(uri)


OOM_MARKERS = ("OutOfMemoryError", "out of memory", "can't allocate memory", "running low on memory")


def explain_failure(exc: BaseException) -> tuple[str, str, str]:
    """(what, message, hint) for a failed run, from Ray Train's error: the first failing rank's last line, and
    what to do about the kinds of failure a user can fix."""
    failures = dict(getattr(exc, "worker_failures", None) or {})
    if failures:
        rank = min(failures)
        error, where = failures[rank], f"rank {rank}" + (f" (and {len(failures) - 1} more)" if len(failures) > 1 else "")
    else:
        error, where = getattr(exc, "controller_failure", exc), "Ray Train"
    base = getattr(error, "_base_exc", error)  # Ray Train wraps a worker's exception with its traceback text
    text = f"{error}\n{type(base).__name__}: {base}"
    message = f"{where}: {type(base).__name__}: {str(base).strip().splitlines()[-1] if str(base).strip() else ''}"
    if any(marker in text for marker in OOM_MARKERS):
        return ("a worker ran out of memory", message,
                "lower train.batch_size or the model widths, set train.micro_batch to split each rank's batch, or give "
                "each worker more memory (a bigger GPU, fewer workers per node)")  # fmt: skip
    if "ActorDiedError" in text or "died unexpectedly" in text:
        return ("a worker process died", message, "a process killed from outside (the OOM killer, an eviction) "
                "leaves no traceback: see the end of its log among Ray's logs (path below)")  # fmt: skip
    return ("training failed", message, "the worker's traceback is above; run the same command again to continue "
            "from the latest checkpoint once the cause is fixed")  # fmt: skip

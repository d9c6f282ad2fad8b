"""Shared helpers of the bench scripts: machine description, load, the digits data, one trainer run under
Ray with per-step timing, medians, and results as JSON + a markdown table.

Start anything that starts Ray under the shared lock (other engineers' test suites use the same machine):

    flock /tmp/gan_dist_ray.lock python bench/bench_overhead.py
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from worker_timing import TIMING_FILE, descendants_cpu, timed_train_worker

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
RESULTS = BENCH_DIR / "results"
QUICKSTART = REPO / "jobs" / "quickstart.yaml"
QUICKSTART_MODEL = "dcgan 32px g/d width 32 z 64"  # what QUICKSTART trains, for the results' settings line

# Ray 2.60 turns token auth on for local clusters by default; the bench wants none (as the tests).
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")


# -- machine, load, statistics ------------------------------------------------------------------------


def load() -> list[float]:
    """1, 5 and 15 minute load averages: with 2 cores, anything above ~2 means we share them."""
    return [round(x, 2) for x in os.getloadavg()]


def runnable() -> int:
    """Tasks runnable right now, machine-wide (/proc/stat procs_running, the reader included)."""
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("procs_running"):
            return int(line.split()[1])
    return 0


class RunnableSampler:
    """Samples ``runnable()`` every 0.2 s in a thread: the contention during a run, not a lagging average.
    With ``tree``, also the CPU seconds used so far by that process's descendants (Ray's processes), each 1 s."""

    def __init__(self, tree: int | None = None) -> None:
        self.samples: list[tuple[float, int]] = []  # (time.time(), runnable tasks)
        self.tree_cpu: list[tuple[float, float]] = []  # (time.time(), CPU s of the live descendants of tree)
        self._tree = tree
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        n = 0
        while not self._stop.wait(0.2):
            self.samples.append((time.time(), runnable() - 1))  # minus this sampler
            n += 1
            if self._tree is not None and n % 5 == 0:
                self.tree_cpu.append((time.time(), sum(descendants_cpu(self._tree).values())))

    def tree_cores(self, start: float | None, end: float | None) -> float | None:
        """Cores the descendants used on average (CPU s per s) between the samples nearest ``start``/``end``."""
        if not self.tree_cpu or start is None or end is None:
            return None
        a = min(self.tree_cpu, key=lambda s: abs(s[0] - start))
        b = min(self.tree_cpu, key=lambda s: abs(s[0] - end))
        return (b[1] - a[1]) / (b[0] - a[0]) if b[0] > a[0] else None

    def __enter__(self) -> RunnableSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def mean(self, start: float | None = None, end: float | None = None) -> float | None:
        """Mean runnable tasks between wall-clock ``start`` and ``end`` (default: all samples)."""
        inside = [n for t, n in self.samples if (start is None or t >= start) and (end is None or t <= end)]
        return round(statistics.fmean(inside), 2) if inside else None


def wait_for_quiet(max_tasks: float = 1.0, timeout_s: float = 20.0) -> float:
    """Wait (at most ``timeout_s``) until other jobs leave the cores mostly idle: mean runnable tasks over
    2 s at most ``max_tasks``. Returns the seconds waited. Only lowers the odds of a burst mid-run."""
    start = time.perf_counter()
    while True:
        samples = []
        for _ in range(10):
            samples.append(runnable() - 1)
            time.sleep(0.2)
        waited = time.perf_counter() - start
        if statistics.fmean(samples) <= max_tasks or waited >= timeout_s:
            return waited


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _ram_gib() -> float | None:
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    return None


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _git_state() -> str:
    """HEAD plus '+dirty' when the working tree differs: the numbers belong to that code."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "gan_dist"], cwd=REPO, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def machine() -> dict[str, Any]:
    """What a reader needs to judge the numbers: hardware, versions, date and the load right now."""
    import torch

    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cpu": _cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)),
        "ram_gib": _ram_gib(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
        "python": platform.python_version(),
        "versions": {n: _version(n) for n in ("torch", "ray", "mlflow", "gan_dist")},
        "gan_dist_commit": _git_state(),
        "load_at_start": load(),
    }


def spread(values: Sequence[float]) -> dict[str, Any]:
    """Median with min/max and n: with this much foreign load, the spread matters as much as the median."""
    vals = [float(v) for v in values]
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals), "values": vals}


# -- data ---------------------------------------------------------------------------------------------


def prepare_digits(root: Path) -> Path:
    """scikit-learn's 1,797 digits at 32x32 in 4 shards, exactly as the quickstart prepares them."""
    from gan_dist.data.prepare import prepare

    out = root / "digits"
    prepare("sklearn:digits", str(out), resolution=32, channels=1, samples_per_shard=450, progress=False)
    return out


def load_images(shards_dir: Path) -> Any:
    """All images of a prepared dataset as one uint8 tensor [N, 1, 32, 32], decoded by gan_dist's own code."""
    import torch

    from gan_dist.storage import StorageConfig
    from gan_dist.data.loader import decode_image
    from gan_dist.data.shards import list_shards, read_shard

    images = [
        decode_image(sample, "L", 32)
        for shard in list_shards(str(shards_dir), StorageConfig())
        for sample in read_shard(shard, StorageConfig())
    ]
    return torch.stack([im for im in images if im is not None])


# -- Ray and trainer runs -----------------------------------------------------------------------------


# Ray starts its worker processes at niceness 15 (RAY_worker_niceness), so on a shared machine any
# neighbour at niceness 0 takes the cores from the trainer first, while the bare loop runs at 0. The bench
# gives workers niceness 0 so that both compete with neighbours on equal terms; on a machine that is not
# shared the setting changes nothing.
WORKER_NICENESS = "0"


@contextlib.contextmanager
def ray_session(num_cpus: int = 2) -> Iterator[None]:
    """A local Ray instance for this script only (never `ray stop`: others may run theirs after us)."""
    import ray

    if ray.is_initialized():
        raise RuntimeError("Ray is already initialized in this process")
    # The raylet inherits this environment: workers find `worker_timing` and start at WORKER_NICENESS.
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(BENCH_DIR), os.environ.get("PYTHONPATH")) if p)
    os.environ["RAY_worker_niceness"] = WORKER_NICENESS
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, configure_logging=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


def bench_config(work: Path, shards: Path, overrides: Sequence[str]) -> Any:
    """The quickstart job (model, loss, optimizer, batch 64) on ``shards``, everything stored under ``work``."""
    from gan_dist.config import load_config

    base = [
        f"data.url={shards}",
        f"checkpoint.storage={work / 'runs'}",
        f"tracking.uri=sqlite:///{work / 'mlflow.db'}",
        "tracking.experiment=bench",
        "train.max_failures=0",  # a crash must show, not be retried into the timing
    ]
    return load_config(QUICKSTART, [*base, *overrides])


def timed_config(work: Path, shards: Path, workers: int, cpus: int, steps: int, overrides: Sequence[str]) -> Any:
    """``bench_config`` for a timed run: sample grids and checkpoints only after the last step (each is the
    stall benchmark's subject, not the others'), unless ``overrides`` (applied last) say otherwise."""
    base = [f"scaling.num_workers={workers}", f"scaling.cpus_per_worker={cpus}", f"train.steps={steps}",
            f"train.sample_every={steps}", f"checkpoint.every={steps}"]  # fmt: skip
    return bench_config(work, shards, [*base, *overrides])


def run_context(r: dict[str, Any]) -> dict[str, Any]:
    """The columns every trainer run reports besides its timing: machine load around it and where its wall
    time went."""
    return {
        **load_span(r["load_before"], r["load_after"]),
        "runnable": r["runnable"],
        "wall_s": r["wall_s"],
        "phases_s": r["phases_s"],
        "history": r["images_per_sec_history"],
    }


def load_span(before: Sequence[float], after: Sequence[float]) -> dict[str, Any]:
    return {"load_before": before[0], "load_after": after[0], "load": f"{before[0]:.1f} → {after[0]:.1f}"}


# Columns of run tables that describe the machine while a run was timed.
LOAD_COLUMNS = [("runnable", "runnable tasks (mean, machine)"), ("load", "load 1-min before → after")]


def rotated_runs(
    key: str, names: Sequence[str], reps: int, run_one: Callable[[str, Path, Path], dict[str, Any]],
    describe: Callable[[dict[str, Any]], str],
) -> list[dict[str, Any]]:
    """Each configuration in ``names`` once per repetition, on digits shards in a local 2-CPU Ray instance.
    The order rotates per repetition so slow drifts in the machine's load hit every configuration alike.
    ``run_one(name, work_dir, shards)`` returns one run's row; ``key`` names the configuration column."""
    runs: list[dict[str, Any]] = []
    with scratch() as tmp, ray_session(num_cpus=2):
        shards = prepare_digits(Path(tmp))
        for rep in range(reps):
            waited = wait_for_quiet()
            for name in [*names[rep % len(names) :], *names[: rep % len(names)]]:
                print_progress(f"rep {rep + 1}/{reps}: {name}")
                r = run_one(name, Path(tmp), shards)
                runs.append({key: name, "rep": rep + 1, "waited_for_quiet_s": round(waited), **r})
                print_progress("  " + describe(r))
    return runs


def bench_arguments(
    doc: str, reps: int, interval: str, interval_help: str, extra: dict[str, tuple[int, str]] | None = None
) -> argparse.Namespace:
    """--reps, --steps, the logging interval (``--window`` or ``--every``) and ``extra`` integer options
    (name: (default, help)), each defaulting to what the committed results used."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=reps)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument(f"--{interval}", type=int, default=10, help=interval_help)
    for name, (default, help_) in (extra or {}).items():
        parser.add_argument(f"--{name}", type=int, default=default, help=help_)
    return parser.parse_args()


def command_line(script: str, args: argparse.Namespace) -> str:
    """The command that regenerates a result, as printed under its table."""
    flags = " ".join(f"--{k} {v}" for k, v in vars(args).items())
    return f"flock /tmp/gan_dist_ray.lock python bench/{script} {flags}"


def run_trainer(cfg: Any) -> dict[str, Any]:
    """One gan_dist training run through run_training (Ray must be up); its timing from MLflow and stamps."""
    import mlflow

    import gan_dist.driver as driver

    before = load()
    t0, start = time.perf_counter(), time.time()
    original, driver.train_worker = driver.train_worker, timed_train_worker  # build_trainer reads the global
    try:
        with RunnableSampler(tree=os.getpid()) as sampler:
            outcome = driver.run_training(cfg)
    finally:
        driver.train_worker = original
    wall = time.perf_counter() - t0
    history = mlflow.MlflowClient(cfg.tracking.uri).get_metric_history(outcome.mlflow_run_id, "throughput/images_per_sec")
    ranks = sorted((Path(cfg.checkpoint.storage) / cfg.run.name).glob(f"rank*-{TIMING_FILE}"))
    timing = [json.loads(p.read_text()) for p in ranks]
    clock = timing[0]["clock"] if timing else {}
    phases = {  # seconds: driver start -> worker function entered -> first step done -> last step -> return
        "start_to_worker": clock.get("entry", start) - start,
        "worker_to_first_step": (clock.get("first_step") or start) - clock.get("entry", start),
        "steps": (clock.get("last_step") or start) - (clock.get("first_step") or start),
        "last_step_to_worker_exit": clock.get("exit", start) - (clock.get("last_step") or start),
        "worker_exit_to_return": start + wall - clock.get("exit", start),
    }
    return {
        "run_name": cfg.run.name,
        "wall_s": wall,
        "phases_s": phases,
        "images_per_sec_history": [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)],
        "ranks": timing,  # per rank: stamps, cpu, loader_cpu_s, torch_threads, omp_num_threads
        "load_before": before,
        "load_after": load(),
        "runnable": sampler.mean(clock.get("first_step"), clock.get("last_step")),  # during the steps
        # Cores used by everything Ray runs (workers, their loaders, raylet, GCS, the Train controller and
        # its helper actors) during the steps.
        "ray_tree_cores": sampler.tree_cores(clock.get("first_step"), clock.get("last_step")),
    }


def steady_images_per_sec(history: Sequence[tuple[int, float]], batch: int, skip_windows: int = 1) -> float:
    """Images/s over the logged windows after the first ``skip_windows`` (warm-up: process start, first
    batches): total images / total time, i.e. the step-weighted harmonic mean of the windows' rates."""
    steps = [s for s, _ in history]
    images = seconds = 0.0
    for i in range(skip_windows, len(history)):
        n = (steps[i] - steps[i - 1]) * batch
        images, seconds = images + n, seconds + n / history[i][1]
    if seconds == 0:
        raise ValueError(f"need more than {skip_windows} logged window(s), got {len(history)}")
    return images / seconds


def steady_stats(timing: dict[str, Any], skip: int) -> dict[str, Any]:
    """One process's steps after ``skip`` warm-up steps: median wall ms, mean CPU s of the process and of
    its DataLoader worker processes (if recorded), and its thread count."""
    stamps, cpu = timing["stamps"], timing["cpu"]
    n = len(stamps) - 1 - skip
    loader = timing.get("loader_cpu_s")
    return {
        "step_ms_median": 1000 * statistics.median(step_intervals(stamps, skip)),
        "cpu_s_per_step": (cpu[-1] - cpu[skip]) / n,
        "loader_cpu_s_per_step": loader / (len(stamps) - 1) if loader is not None else None,
        "torch_threads": timing.get("torch_threads"),
    }


def step_intervals(stamps: Sequence[float], skip: int) -> list[float]:
    """Seconds per loop iteration from generator-step timestamps, after ``skip`` warm-up steps."""
    return [b - a for a, b in zip(stamps[skip:], stamps[skip + 1 :])]


def scratch() -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix="gan_dist_bench_")


# -- results ------------------------------------------------------------------------------------------


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
    if isinstance(value, (list, tuple)):
        return " / ".join(_cell(v) for v in value)
    return str(value)


def markdown_table(columns: Sequence[tuple[str, str]], rows: Sequence[dict[str, Any]]) -> str:
    """``columns``: (key in row, header) pairs."""
    lines = ["| " + " | ".join(h for _, h in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(r.get(k, "")) for k, _ in columns) + " |" for r in rows]
    return "\n".join(lines)


Table = tuple[str, Sequence[tuple[str, str]], Sequence[dict[str, Any]]]  # caption, columns, rows

# A summary table: one quantity a row, its median over repetitions and their range.
SUMMARY_COLUMNS = [("what", ""), ("median", "median"), ("range", "min–max")]


def summary_row(what: str, values: dict[str, Any] | float, digits: int = 1) -> dict[str, Any]:
    """A SUMMARY_COLUMNS row from a ``spread`` (median and range) or a single value (no range)."""
    if isinstance(values, dict):
        return {"what": what, "median": values["median"], "range": f"{values['min']:.{digits}f}–{values['max']:.{digits}f}"}
    return {"what": what, "median": values, "range": ""}


def write_results(
    name: str,
    title: str,
    info: dict[str, Any],
    settings: dict[str, Any],
    tables: Sequence[Table],
    summary: Sequence[str],
    command: str,
    raw: dict[str, Any] | None = None,
) -> str:
    """Write ``results/<name>.json`` (everything, raw samples included) and ``results/<name>.md``."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    info = {**info, "load_at_end": load()}
    doc = {
        "benchmark": name, "machine": info, "settings": settings,
        "tables": {caption: list(rows) for caption, _, rows in tables},
        "summary": list(summary), "command": command, "raw": raw or {},
    }  # fmt: skip
    (RESULTS / f"{name}.json").write_text(json.dumps(doc, indent=2, default=str) + "\n")
    v = info["versions"]
    md = [
        f"### {title}",
        "",
        f"- date: {info['date']} · gan_dist {v['gan_dist']} ({info['gan_dist_commit']}) · torch {v['torch']} · "
        f"ray {v['ray']} · mlflow {v['mlflow']} · python {info['python']}",
        f"- machine: {info['cpu']}, {info['logical_cores']} logical cores ({info['usable_cores']} usable), "
        f"{info['ram_gib']} GiB RAM, GPU: {info['gpu']}",
        f"- load average (1/5/15 min) at start {info['load_at_start']}, at end {info['load_at_end']} "
        "(other engineers' jobs share these cores)",
        "- settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()),
        "",
    ]
    for caption, columns, rows in tables:
        md += [caption, "", markdown_table(columns, rows), ""]
    md += [*[f"- {line}" for line in summary], "", f"Regenerate: `{command}`", ""]
    text = "\n".join(md)
    (RESULTS / f"{name}.md").write_text(text)
    return text


def publish(
    name: str, title: str, info: dict[str, Any], settings: dict[str, Any], tables: Sequence[Table],
    summary: Sequence[str], script: str, args: argparse.Namespace, raw: dict[str, Any] | None = None,
) -> None:
    """``write_results`` for a trainer benchmark: its arguments join the settings, the command that
    regenerates it is built from them, and the markdown is printed."""
    settings = {**settings, **vars(args)}
    print(write_results(name, title, info, settings, tables, summary, command_line(script, args), raw))


def print_progress(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')} load {load()[0]}] {message}", file=sys.stderr, flush=True)

"""What the bench runs inside a Ray Train worker: gan_dist's ``train_worker`` with timestamps around it.

Kept apart from ``common`` so that a worker imports only this small module (found through PYTHONPATH, which
``common.ray_session`` sets before Ray starts) and nothing of the bench's driver side.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

TIMING_FILE = "bench_step_times.json"  # written next to the run's checkpoints, one per rank


def _proc_stat(pid: int) -> tuple[int, float] | None:
    """(parent pid, user+system CPU seconds) of a process from /proc, None if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def descendants_cpu(parent: int) -> dict[int, float]:
    """CPU seconds used so far by each live descendant of ``parent`` (DataLoader workers, Ray's processes)."""
    stats = {int(p.name): st for p in Path("/proc").iterdir() if p.name.isdigit() and (st := _proc_stat(int(p.name)))}
    found: dict[int, float] = {}
    frontier = {parent}
    while frontier:
        frontier = {pid for pid, (ppid, _) in stats.items() if ppid in frontier}
        found.update({pid: stats[pid][1] for pid in frontier})
    return found


def cpu_used_since(before: dict[int, float], parent: int) -> float:
    """CPU seconds the processes of ``before`` still alive used since then (exited ones are not counted)."""
    now = descendants_cpu(parent)
    return sum(now[pid] - cpu for pid, cpu in before.items() if pid in now)


# Functions of gan_dist.train.phases whose calls are timed (looked up in the phases module at call time), the
# log window's cross-rank mean, and ray.train.report: together they say where a logging/checkpoint step's
# extra time goes.
SPANS = ("report_checkpoint", "save_checkpoint", "training_state", "host_copy", "sample_grid")


def _patch(owner: Any, name: str, wrap: Any) -> Any:
    """Replace ``owner.name`` by ``wrap(original)``; returns the original (kept across worker reuse)."""
    key = f"_bench_original_{name}"
    original = getattr(owner, key, getattr(owner, name))
    setattr(owner, key, original)  # a reused worker process must not wrap twice
    setattr(owner, name, wrap(original))
    return original


def timed_train_worker(config: dict[str, Any]) -> None:
    """gan_dist's train_worker, unchanged, plus a timestamp after every generator step and timed SPANS.

    The loop calls generator_step once per step; on CPU every op is synchronous, so the gap between two
    consecutive returns is exactly one full loop iteration (data, D step, G step, and any logging or
    checkpointing done at the end of the previous iteration). Cost: a few perf_counter() calls per step.
    """
    import ray.train
    import torch

    import gan_dist.train.loop as loop
    import gan_dist.train.phases as phases

    stamps: list[float] = []
    cpu: list[float] = []  # this process's CPU seconds (all its threads) at each stamp
    loader: dict[str, Any] = {}  # CPU seconds of its child processes (DataLoader workers), step 1 to the last
    spans: dict[str, list[tuple[int, float]]] = {}  # name -> (steps done at the call, seconds)
    steps = int(config["train"]["steps"])

    def stamping(original: Any) -> Any:
        def generator_step(*args: Any, **kwargs: Any) -> Any:
            out = original(*args, **kwargs)
            stamps.append(time.perf_counter())
            cpu.append(time.process_time())
            if len(stamps) == 1:  # a /proc walk costs ~ms: only twice, outside the windows we compare
                loader["start"] = descendants_cpu(os.getpid())
            elif len(stamps) == steps and "start" in loader:
                loader["cpu_s"] = cpu_used_since(loader["start"], os.getpid())
            return out

        return generator_step

    def timing(name: str) -> Any:
        def wrap(original: Any) -> Any:
            def timed(*args: Any, **kwargs: Any) -> Any:
                t0 = time.perf_counter()
                try:
                    return original(*args, **kwargs)
                finally:
                    spans.setdefault(name, []).append((len(stamps), time.perf_counter() - t0))

            return timed

        return wrap

    patched = [(loop, "generator_step", _patch(loop, "generator_step", stamping))]
    patched += [(phases, n, _patch(phases, n, timing(n))) for n in SPANS]
    patched.append((phases.Window, "means", _patch(phases.Window, "means", timing("window.means"))))
    patched.append((ray.train, "report", _patch(ray.train, "report", timing("ray.train.report"))))
    import torch.distributed as dist

    threads, omp = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    group = dist.get_backend() if dist.is_initialized() else None  # Ray Train sets it up even for 1 worker?
    entered = time.time()  # wall clock, comparable with the driver's: where a run's fixed cost goes
    try:
        loop.train_worker(config)
    finally:
        for owner, name, original in patched:
            setattr(owner, name, original)
        rank = ray.train.get_context().get_world_rank()
        out = Path(config["checkpoint"]["storage"]) / config["run"]["name"] / f"rank{rank}-{TIMING_FILE}"
        out.parent.mkdir(parents=True, exist_ok=True)
        offset = time.time() - time.perf_counter()
        clock = {"entry": entered, "first_step": stamps[0] + offset if stamps else None,
                 "last_step": stamps[-1] + offset if stamps else None, "exit": time.time()}  # fmt: skip
        result = {"stamps": stamps, "cpu": cpu, "loader_cpu_s": loader.get("cpu_s"), "spans": spans,
                  "torch_threads": threads, "omp_num_threads": omp, "clock": clock, "niceness": os.nice(0),
                  "process_group": group}  # fmt: skip
        out.write_text(json.dumps(result))

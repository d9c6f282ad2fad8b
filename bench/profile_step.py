"""Where the trainer's step time goes, without Ray: one process, variants interleaved block by block.

Each variant adds one piece of what a gan_dist worker does to B, gan_dist's own step:

- A tutorial: the bare loop's step (bench/bare_loop.py: PyTorch DCGAN tutorial loop), in-memory data
- B gan_dist step: ``discriminator_step`` + ``generator_step`` (fakes from a no-grad G in the D step, a
  fresh G(z) for the G step through a frozen D, grad norms, EMA) and the loop's per-step metric sums; plain
  modules, in-memory data
- C = B + DDP: G and D wrapped in DDP over a 1-process gloo group, as Ray Train gives 1 worker. The trainer
  no longer does this at world size 1; the row shows what that saves
- D = B + loader: batches from gan_dist's ``build_loader`` (1 DataLoader worker process decoding the PNG
  shards) instead of memory
- D' = B + loader in-process: the same loader run inside the training process (``data.loader_workers=0``)
- E = D + decode cache: the loader process keeps decoded images (``data.decode_cache_mb``, which the
  quickstart sets), so after the first epoch (run through every loader before timing) it reads shards but
  decodes nothing

Variants run in blocks of ``--block`` steps, round-robin, for ``--rounds`` rounds (the first is warm-up), so
bursts of other jobs' load hit all of them alike. torch threads = 2, as the overhead benchmark's worker. The
remainder between D and the measured 1-worker trainer is what Ray's worker process and MLflow add.

    python bench/profile_step.py [--rounds 21] [--block 2]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from bare_loop import MemoryBatches, TutorialStep
from common import QUICKSTART, RunnableSampler, load_images, machine, prepare_digits, scratch, spread, write_results
from worker_timing import descendants_cpu

THREADS = 2


def gan_dist_step(
    cfg: Any, data: Any, device: torch.device = torch.device("cpu"), prepare: Callable[[Any], None] | None = None
) -> tuple[Callable[[], None], Any]:
    """The body of gan_dist.train.loop.train_worker's step loop (n_critic=1), on modules built by gan_dist;
    ``prepare(modules)`` may change them (memory format, compilation) before the first step."""
    from gan_dist.data.loader import to_float
    from gan_dist.train.modules import build_modules
    from gan_dist.train.phases import Window
    from gan_dist.train.step import DiscriminatorBatch, GeneratorBatch, discriminator_step, generator_step

    m = build_modules(cfg, device)  # DDP-wrapped iff more than one rank, exactly as in a worker
    if prepare is not None:
        prepare(m)
    noise = torch.Generator(device=device).manual_seed(cfg.train.seed * 100_003)
    batch, state = cfg.train.batch_size, {"step": 0, "window": Window()}  # one rank: the whole batch

    def step() -> None:
        real = to_float(next(data).images, device) if data.__class__.__name__ == "BatchIterator" else next(data)
        z = torch.randn(batch, cfg.model.z_dim, device=device, generator=noise)
        state["window"].add(discriminator_step(m, cfg, DiscriminatorBatch(real, z), state["step"]))
        z = torch.randn(batch, cfg.model.z_dim, device=device, generator=noise)
        state["window"].add(generator_step(m, cfg, GeneratorBatch(z), state["step"]))  # summed as the loop does
        state["step"] += 1

    return step, m


def wrap_in_ddp(m: Any) -> None:
    m.g = m.g_fast = DistributedDataParallel(m.g)
    m.d = m.d_fast = DistributedDataParallel(m.d)


def components(cfg: Any, m: Any) -> dict[str, Callable[[], None]]:
    """Pieces of gan_dist's step timed alone (on variant B's modules), to explain B against A."""
    from gan_dist.train.modules import bare
    from gan_dist.train.step import ema_decay_at, update_ema

    def grad_norms() -> None:
        for net in (m.d, m.g):
            torch.nn.utils.get_total_norm([p.grad for p in net.parameters() if p.grad is not None])

    z = torch.randn(cfg.train.batch_size, cfg.model.z_dim)

    def g_forward() -> None:
        with torch.no_grad():
            bare(m.g)(z)

    return {
        "component: G forward under no_grad (D step's fakes)": g_forward,
        "component: EMA update": lambda: update_ema(m.g_ema, bare(m.g), ema_decay_at(100, cfg.train.ema_decay)),
        "component: grad norms of D and G": grad_norms,
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--block", type=int, default=2, help="steps per variant per round")
    args = parser.parse_args()
    info = machine()
    torch.set_num_threads(THREADS)
    from gan_dist.config import load_config
    from gan_dist.data.loader import build_loader
    from gan_dist.data.shards import plan_data

    with scratch() as tmp:
        shards = prepare_digits(Path(tmp))
        cfg = load_config(QUICKSTART, [f"data.url={shards}", "scaling.num_workers=1"])
        images = load_images(shards)
        tutorial = TutorialStep()
        memory = MemoryBatches(images, cfg.train.batch_size)
        b_step, m = gan_dist_step(cfg, MemoryBatches(images, cfg.train.batch_size))
        variants: dict[str, Callable[[], None]] = {
            "A tutorial loop (in-memory data)": lambda: tutorial(next(memory)),
            "B gan_dist step functions": b_step,
        }
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
        try:
            variants["C = B + DDP (gloo, world size 1)"] = gan_dist_step(
                cfg, MemoryBatches(images, cfg.train.batch_size), prepare=wrap_in_ddp
            )[0]

            def data_settings(**update: Any) -> Any:
                return cfg.model_copy(update={"data": cfg.data.model_copy(update=update)})

            loaders = {  # variant: its loader's settings
                "D = B + gan_dist loader (1 process)": data_settings(decode_cache_mb=0),
                "D' = B + gan_dist loader in-process (loader_workers=0)": data_settings(decode_cache_mb=0, loader_workers=0),
                "E = D + decode cache (data.decode_cache_mb, as the quickstart)": data_settings(decode_cache_mb=16),
            }  # fmt: skip
            loader_pids = {}  # variant: pid of its DataLoader worker process
            for name, settings in loaders.items():
                batches = build_loader(settings, 0, 1)
                for _ in range(plan_data(settings, 1).batches_per_epoch):  # a first epoch fills E's decode cache
                    next(batches)
                variants[name] = gan_dist_step(settings, batches)[0]
                if settings.data.loader_workers:
                    loader_pids[name] = batches._batches._workers[0].pid
            variants.update(components(cfg, m))  # timed in the same rotation, reported apart
            times: dict[str, list[float]] = {name: [] for name in variants}
            cpu: dict[str, float] = {name: 0.0 for name in variants}  # this process's CPU s, all threads
            with RunnableSampler() as sampler:
                for rnd in range(args.rounds):
                    if rnd == 1:  # a loader process works for its variant only (2 batches ahead, then waits)
                        loader_start = descendants_cpu(os.getpid())
                    for name, step in variants.items():
                        for _ in range(args.block):
                            t0, c0 = time.perf_counter(), time.process_time()
                            step()
                            if rnd:  # round 0 warms up every variant (allocator, loader start, first batches)
                                times[name].append(time.perf_counter() - t0)
                                cpu[name] += time.process_time() - c0
                loader_end = descendants_cpu(os.getpid())
                loader_cpu = {name: loader_end[pid] - loader_start[pid] for name, pid in loader_pids.items()}
        finally:
            dist.destroy_process_group()

    base = statistics.median(times[next(iter(times))])
    rows, parts, medians = [], [], {}
    for name, values in times.items():
        if name.startswith("component: "):
            ms = statistics.median(values) * 1000
            parts.append({"component": name.removeprefix("component: "), "median_ms": ms, "vs_tutorial": ms / (1000 * base)})
            continue
        s = spread([1000 * v for v in values])
        rows.append({
            "variant": name, "steps": s["n"], "median_ms": s["median"], "mean_ms": statistics.fmean(s["values"]),
            "cpu_ms": 1000 * (cpu[name] + (loader_cpu[name] if name in loader_cpu else 0)) / s["n"],
            "vs_tutorial": s["median"] / (1000 * base),
            "vs_b": s["median"] / medians[list(medians)[1]] if len(medians) > 1 else None,
            "p10_p90": f"{sorted(s['values'])[s['n'] // 10]:.1f}–{sorted(s['values'])[9 * s['n'] // 10]:.1f}",
        })  # fmt: skip
        medians[name] = s["median"]
    columns = [
        ("variant", "variant"), ("steps", "steps timed"), ("median_ms", "median step ms"), ("mean_ms", "mean ms"),
        ("p10_p90", "p10–p90 ms"), ("vs_b", "× B"), ("vs_tutorial", "× tutorial"),
        ("cpu_ms", "CPU ms/step (D, E: + loader process)"),
    ]  # fmt: skip
    summary = [
        f"Mean runnable tasks on the machine while timing: {sampler.mean()} (this process's 2 threads included).",
        "C, D, D' and E each add one piece to B: '× B' is what that piece costs per step. D, D' and E run "
        "the same shards; E's loader decodes each image once, then serves it from memory.",
    ]
    command = "python bench/profile_step.py " + " ".join(f"--{k} {v}" for k, v in vars(args).items())
    print(write_results(
        "profile_step", "Where a trainer step's time goes (no Ray, one process, interleaved)", info,
        {"model": "quickstart dcgan 32px", "batch": cfg.train.batch_size, "torch_threads": THREADS, **vars(args)},
        [("Per-step time by variant:", columns, rows),
         ("Components of B, timed alone in the same rotation:",
          [("component", "component"), ("median_ms", "median ms per step"), ("vs_tutorial", "share of a tutorial step")],
          parts)],
        summary, command, raw={"times_s": times},
    ))  # fmt: skip


if __name__ == "__main__":
    main()

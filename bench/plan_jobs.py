"""`gan-dist plan` on the 256-px jobs: per-GPU memory at each job's configured batch and the largest batch per
forward on 24, 40, 80 and 141 GB GPUs, FLOPs per image and the bytes all-reduced per step. No Ray, no GPU:
the plan measures on CPU (gan_dist/plan.py says how).

    python bench/plan_jobs.py
"""

from __future__ import annotations

import time
from typing import Any

import torch

from common import REPO, machine, print_progress, write_results
from gan_dist.config import load_config
from gan_dist.plan import BACKWARD_HEADROOM, GIB, GPU_SIZES_GB, MEASURE_BATCHES, USABLE, make_plan

JOBS = ("ffhq_256", "celeba_hq_256", "ffhq_256_resnet")


def plan_row(job: str) -> dict[str, Any]:
    cfg = load_config(REPO / "jobs" / f"{job}.yaml")
    start = time.perf_counter()
    plan = make_plan(cfg)
    seconds = time.perf_counter() - start
    peak, phase = plan.activations(plan.forward_batch)
    row = {
        "job": f"jobs/{job}.yaml", "arch": cfg.model.arch, "precision": cfg.train.precision,
        "per_gpu": f"{plan.workers} × {plan.per_gpu_batch} ({plan.forward_batch} per forward)",
        "fixed_gib": sum(plan.fixed.values()) / GIB, "activations_gib": peak / GIB, "peak_phase": phase,
        "total_gib": plan.total(plan.forward_batch) / GIB,
        **{f"largest_{size}": plan.largest_batch(size * GIB) for size in GPU_SIZES_GB},
        "gflops_g": plan.flops_per_image["G"] / 1e9, "gflops_d": plan.flops_per_image["D"] / 1e9,
        "allreduce_mib": plan.allreduce_bytes / 2**20, "plan_s": seconds,
    }  # fmt: skip
    raw = {"fixed": plan.fixed, "phases": [vars(p) for p in plan.phases], "flops": plan.flops_per_image}
    return {**row, "raw": raw}


def main() -> None:
    torch.set_num_threads(2)
    info = machine()
    rows = []
    for job in JOBS:
        print_progress(f"planning {job}")
        rows.append(plan_row(job))
    columns = [("job", "job"), ("arch", "arch"), ("precision", "precision"), ("per_gpu", "workers × images per GPU"),
               ("fixed_gib", "weights, grads, Adam, EMA, DDP (GiB)"), ("activations_gib", "activations (GiB)"),
               ("peak_phase", "peak in"), ("total_gib", "total (GiB)")]  # fmt: skip
    largest = [("job", "job"), *((f"largest_{s}", f"{s} GB") for s in GPU_SIZES_GB)]
    compute = [("job", "job"), ("gflops_g", "G forward GFLOP/image"), ("gflops_d", "D forward GFLOP/image"),
               ("allreduce_mib", "all-reduced per step per rank (MiB)"), ("plan_s", "plan took (s)")]  # fmt: skip
    tables = [
        ("Per GPU at each job's configured batch:", columns, rows),
        (f"Largest batch per forward ({USABLE:.0%} of the GPU's memory usable):", largest, rows),
        ("Compute and communication:", compute, rows),
    ]
    summary = [
        f"activations: the bytes the product's D step (R1 due) and G step (path length due) save for backward, "
        f"counted on CPU under FakeTensorMode at {MEASURE_BATCHES} images per forward, extrapolated linearly, "
        f"× {BACKWARD_HEADROOM} for backward's transients (tests/test_plan.py checks the estimate against a real "
        "CPU step's allocator peak within ±25 %)",
        "GB read as GiB; FLOPs are torch's counter (convolutions and matmuls, forward only)",
        "not yet checked against a GPU's torch.cuda.max_memory_allocated: no GPU was lent to this task",
    ]
    raw = {r["job"]: r.pop("raw") for r in rows}
    print(write_results("plan", "`gan-dist plan` on the 256-px jobs", info, {"torch_threads": 2}, tables, summary,
                        "python bench/plan_jobs.py", raw))  # fmt: skip


if __name__ == "__main__":
    main()

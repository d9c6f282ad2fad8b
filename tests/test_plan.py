"""`gan-dist plan`: its activation estimate against what a real CPU step allocates, its exact byte counts, the
largest-batch arithmetic, and the command's table. No Ray."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from gan_dist import plan as planner
from gan_dist.config import GanConfig, build_config
from gan_dist.train.modules import build_modules
from gan_dist.train.step import discriminator_step, generator_step
from tests.test_cli import run_cli

TOLERANCE = 0.25  # the measured peak within ±25 % of the estimate (saved bytes × BACKWARD_HEADROOM)
TINY = {
    "stylegan2": ["model.arch=stylegan2", "model.z_dim=32", "model.w_dim=32", "model.mapping_layers=2",
                  "model.channel_base=512", "model.channel_max=32", "augment.kind=ada", "augment.p=0.5"],
    "dcgan-bf16": ["model.arch=dcgan", "model.g_width=16", "model.d_width=16", "model.z_dim=16", "loss.r1_gamma=1",
                   "model.d_norm=none", "train.precision=bf16"],
    "r3gan": ["model.arch=r3gan", "model.z_dim=16", "model.channel_base=128", "model.channel_max=16",
              "model.group_width=8", "model.blocks_per_stage=1", "loss.r1_gamma=1"],
}  # fmt: skip


def tiny_config(arch: str, batch: int, workers: int = 1) -> GanConfig:
    tree = {"data": {"url": "/unused", "resolution": 32, "channels": 3},
            "train": {"batch_size": batch}, "scaling": {"num_workers": workers}}  # fmt: skip
    return build_config(tree, TINY[arch])


def allocator_peak(run) -> int:
    """The CPU allocator's peak above what was allocated when ``run`` started, from the profiler's memory
    events (every allocation and free, in order): an independent count from the plan's saved-tensor hook."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())  # fmt: skip
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    return peak


@pytest.mark.parametrize("arch", sorted(TINY))
def test_activation_estimate_matches_a_real_cpu_step(arch):
    """The plan extrapolates from shapes-only passes at 2 and 4 images; a real step at 16 images (R1 and path
    length due) must (a) save exactly what the fake passes predicted and (b) peak, in the allocator, within the
    tolerance of the plan's activation estimate."""
    batch = 16
    cfg = tiny_config(arch, batch)
    plan = planner.make_plan(cfg)
    m = build_modules(planner.measured_config(cfg), torch.device("cpu"))
    saved = planner.step_activations(planner.measured_config(cfg), m, batch, mode=None)  # real arithmetic
    for phase in plan.phases:
        assert phase.at(batch) == pytest.approx(saved[phase.name], rel=0.01), phase.name  # mbstd groups vary
    d_batch, g_batch = planner.step_batches(cfg, batch)
    for phase, run, inputs in zip(plan.phases, (discriminator_step, generator_step), (d_batch, g_batch)):
        measured = allocator_peak(lambda: run(m, cfg, inputs, 0))  # the previous step's buffers already exist
        estimate = planner.BACKWARD_HEADROOM * phase.at(batch)
        assert abs(measured / estimate - 1) <= TOLERANCE, f"{phase.name}: measured {measured}, estimated {estimate}"


def test_fixed_memory_counts_every_byte_of_a_known_model():
    """An MLP with 3·4+4 = 16 weights in G and 4·1+1 = 5 in D: fp32 weights, gradients, two Adam moments, the
    EMA copy of G, and DDP's bucket copy of the gradients above one worker."""
    g, d = nn.Linear(3, 4), nn.Linear(4, 1)
    m = type("Modules", (), {"g": g, "d": d, "g_ema": nn.Linear(3, 4).requires_grad_(False)})()
    fixed = planner.fixed_memory(m, workers=2)
    assert fixed == {
        "G + D parameters and buffers": 21 * 4,
        "gradients": 21 * 4,
        "Adam moments (2 per parameter)": 2 * 21 * 4,
        "EMA generator": 16 * 4,
        "DDP gradient buckets": 21 * 4,
    }
    assert "DDP gradient buckets" not in planner.fixed_memory(m, workers=1)


def test_largest_batch_is_the_last_one_that_fits():
    plan = planner.Plan(workers=1, per_gpu_batch=8, forward_batch=8, fixed={"weights": 10 * planner.GIB},
                        phases=(planner.Phase("D", planner.GIB, 0.5 * planner.GIB),
                                planner.Phase("G", 0.0, 0.6 * planner.GIB)),
                        flops_per_image={}, allreduce_bytes=0)  # fmt: skip
    gpu = 40 * planner.GIB
    # room for activations: (0.9·40 − 10) / 1.2 = 21.67 GiB; D: (21.67 − 1) / 0.5 = 41.3, G: 21.67 / 0.6 = 36.1
    assert plan.largest_batch(gpu) == 36
    assert plan.total(36) <= planner.USABLE * gpu < plan.total(37)
    assert plan.activations(36)[1] == "G"


@pytest.mark.parametrize("text, gib", [("80GB", 80), ("141 GiB", 141), ("24g", 24), ("40", 40)])
def test_gpu_memory_sizes(text, gib):
    assert planner.parse_gpu_memory(text) == gib * planner.GIB


def test_plan_command_prints_memory_and_the_largest_batch_per_gpu_size():
    proc = run_cli("plan", "jobs/quickstart.yaml", "--set", "train.batch_size=512", timeout=300)
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    for row in ("G + D parameters and buffers", "Adam moments", "EMA generator", "DDP gradient buckets",
                "activations at 256 per forward", "FLOPs per image", "all-reduced per step"):  # fmt: skip
        assert row in text, row
    for size in ("24 GB", "40 GB", "80 GB", "141 GB"):
        assert size in text
    small = run_cli("plan", "jobs/quickstart.yaml", "--gpu-memory", "0.015GB", timeout=300)
    advice = re.search(r"32 images per forward do not fit a 0.015 GB GPU: set (train.micro_batch=\d+)", small.stdout)
    assert advice and "24 GB" not in small.stdout, small.stdout
    taken = run_cli("plan", "jobs/quickstart.yaml", "--gpu-memory", "0.015GB", "--set", advice[1], timeout=300)
    assert taken.returncode == 0 and "warning" not in taken.stdout  # the advice fits
    bad = run_cli("plan", "jobs/quickstart.yaml", "--gpu-memory", "lots")
    assert bad.returncode == 2 and "--gpu-memory" in bad.stderr and "Traceback" not in bad.stderr

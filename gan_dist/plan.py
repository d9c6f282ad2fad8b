"""``gan-dist plan``: per-GPU memory and throughput of a job, before a GPU is rented for it.

Fixed memory (parameters, gradients, Adam's two moments, the EMA generator, DDP's gradient buckets) is exact,
from the built modules. Activations are measured: the product's own D step and G step run on CPU at two small
batches under ``FakeTensorMode`` (every op, shape, dtype and autocast cast as in a real step, no arithmetic, so
a 256-px StyleGAN2 takes seconds), and a saved-tensor hook sums the bytes of what the step keeps for backward.
Two batches separate the per-image slope from the constant (e.g. autocast's bf16 weight copies). The lazy
steps (R1 in the D step, path length in the G step) are measured, as they are the peaks.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
from rich.console import Group
from rich.table import Table
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode

from gan_dist.config import GanConfig
from gan_dist.data.plan import rank_batch
from gan_dist.train.modules import GanModules, build_modules
from gan_dist.train.step import DiscriminatorBatch, GeneratorBatch, discriminator_step, generator_step

GPU_SIZES_GB = (24, 40, 80, 141)
USABLE = 0.9  # of a GPU's memory: the CUDA context, the caching allocator's slack and fragmentation take the rest
MEASURE_BATCHES = (2, 4)
# A backward holds, beside what is still saved, the gradients of the layer it is in and the penalties' double
# backward: the CPU allocator's peak came to 1.05-1.33x the saved bytes (tests/test_plan.py measures it).
BACKWARD_HEADROOM = 1.2
GIB = 2**30


@dataclass(frozen=True)
class Phase:
    """The bytes one forward of a step keeps for its backward: ``constant + per_image × images``."""

    name: str
    constant: float
    per_image: float

    def at(self, images: int) -> float:
        return self.constant + self.per_image * images


@dataclass(frozen=True)
class Plan:
    workers: int
    per_gpu_batch: int  # the largest rank share of train.batch_size
    forward_batch: int  # images in one forward: the share split into the step's micro-batches
    fixed: dict[str, int]  # per GPU, whatever the batch
    phases: tuple[Phase, ...]
    flops_per_image: dict[str, int]  # forward only, convolutions and matmuls
    allreduce_bytes: int  # handed to all-reduce per step, per rank
    notes: list[str] = field(default_factory=list)

    def activations(self, images: int) -> tuple[float, str]:
        """The activation peak over the step's phases at ``images`` per forward (saved bytes with backward's
        headroom), and the phase it is in."""
        peak = max(self.phases, key=lambda p: p.at(images))
        return BACKWARD_HEADROOM * peak.at(images), peak.name

    def total(self, images: int) -> float:
        return sum(self.fixed.values()) + self.activations(images)[0]

    def largest_batch(self, gpu_bytes: float, usable: float = USABLE) -> int:
        """The most images per forward whose fixed memory plus every phase's activations fit."""
        room = (gpu_bytes * usable - sum(self.fixed.values())) / BACKWARD_HEADROOM
        return max(0, min(math.floor((room - p.constant) / p.per_image) for p in self.phases))


def parse_gpu_memory(text: str) -> float:
    """'80GB', '80GiB', '80G' or '80' -> bytes. GB is read as GiB, as nvidia-smi reports an 80GB card."""
    found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(G|GB|GiB)?\s*", text, re.IGNORECASE)
    if not found:
        raise ValueError(f"--gpu-memory: expected a size such as 80GB, got {text!r}")
    return float(found[1]) * GIB


def _bytes(tensors: Iterator[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _trained(net: nn.Module) -> Iterator[torch.Tensor]:
    return (p for p in net.parameters() if p.requires_grad)


def fixed_memory(m: GanModules, workers: int) -> dict[str, int]:
    """Per GPU: weights and buffers of G and D, a gradient and Adam's two moments per trained parameter (in its
    dtype), the EMA generator, and above one worker DDP's gradient buckets (a second copy of the gradients)."""
    g_grads, d_grads = _bytes(_trained(m.g)), _bytes(_trained(m.d))
    fixed = {
        "G + D parameters and buffers": sum(_bytes(n.parameters()) + _bytes(n.buffers()) for n in (m.g, m.d)),
        "gradients": g_grads + d_grads,
        "Adam moments (2 per parameter)": 2 * (g_grads + d_grads),
        "EMA generator": _bytes(m.g_ema.parameters()) + _bytes(m.g_ema.buffers()),
    }
    if workers > 1:
        fixed["DDP gradient buckets"] = g_grads + d_grads
    return fixed


def allreduce_bytes(cfg: GanConfig, m: GanModules, workers: int) -> int:
    """What a rank hands to all-reduce per G step: D's gradients per D step, G's, and (a style-based G) its
    mean style, path lengths and their counts in one fp32 tensor. ADA's p and the stop check are a few bytes."""
    if workers == 1:
        return 0  # one worker has no DDP and no collectives
    extras = (getattr(cfg.model, "w_dim", 0) + 3) * 4 if hasattr(m.g, "mapping") else 0
    return cfg.train.n_critic * _bytes(_trained(m.d)) + _bytes(_trained(m.g)) + extras


def measured_config(cfg: GanConfig) -> GanConfig:
    """``cfg`` as one worker runs it eagerly, one forward per step (what is measured: no micro-batches, no
    compile, no SyncBatchNorm). Minibatch-stddev takes its group from the batch, so small batches run too."""
    train = cfg.train.model_copy(update={"accumulate": 1, "micro_batch": None, "compile": False,
                                         "sync_batchnorm": False})  # fmt: skip
    return cfg.model_copy(update={"train": train, "scaling": cfg.scaling.model_copy(update={"num_workers": 1})})


@contextmanager
def _saved_storages(exclude: set[int]) -> Iterator[dict[int, torch.UntypedStorage]]:
    """The storages autograd saves inside the block, by identity (views of one storage count once), other
    than ``exclude`` (the weights). Holding them keeps an address from being reused and counted twice."""
    saved: dict[int, torch.UntypedStorage] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage._cdata not in exclude:
            saved[storage._cdata] = storage
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield saved


def step_batches(cfg: GanConfig, images: int) -> tuple[DiscriminatorBatch, GeneratorBatch]:
    res, z_dim, classes = cfg.data.resolution, cfg.model.z_dim, cfg.model.classes()
    labels = torch.randint(classes, (images,)) if classes else None
    gp_eps = torch.rand(images) if cfg.loss.name == "wgan-gp" else None
    real = torch.rand(images, cfg.data.channels, res, res) * 2 - 1
    d_batch = DiscriminatorBatch(real, torch.randn(images, z_dim), gp_eps, labels)
    return d_batch, d_batch.then_generator(torch.randn(images, z_dim))


def phase_names(cfg: GanConfig, m: GanModules) -> tuple[str, str]:
    on = {name: getattr(cfg.loss, key) or getattr(cfg.schedules, key) for name, key in (("R1", "r1_gamma"), ("R2", "r2_gamma"))}
    penalties = "".join(f" + {name}" for name, gamma in on.items() if gamma)
    return (f"D step{penalties}",
            f"G step{' + path length' if m.pl_mean is not None else ''}")  # fmt: skip


def step_activations(cfg: GanConfig, m: GanModules, images: int, mode: FakeTensorMode | None) -> dict[str, int]:
    """Bytes the D step and the G step of ``cfg`` on ``m`` keep for backward at ``images`` per forward, each
    with its lazy penalty when the config has one. Under a fake ``mode``: shapes only (see the module doc)."""
    nets = (m.g, m.d, m.g_ema)
    weights = [t for n in nets for t in (*n.parameters(), *n.buffers())]
    # Autograd saves a weight as the real tensor; ops under the fake mode see its fake twin: neither counts.
    # The twins are held for the whole step, so that no activation takes a freed twin's address.
    twins = [mode.from_tensor(t) for t in weights] if mode else []
    exclude = {t.untyped_storage()._cdata for t in (*weights, *twins)}
    out = {}
    with mode or nullcontext():
        d_batch, g_batch = step_batches(cfg, images)
        for name, run, batch in zip(phase_names(cfg, m), (discriminator_step, generator_step), (d_batch, g_batch)):
            with _saved_storages(exclude) as saved:
                run(m, cfg, batch, 0)  # index 0: every lazy penalty is due
            out[name] = sum(s.nbytes() for s in saved.values())
    return out


def forward_flops(cfg: GanConfig, m: GanModules, mode: FakeTensorMode) -> dict[str, int]:
    """FLOPs per image of one G and one D forward (torch's counter: convolutions and matmuls, no elementwise
    ops), counted on fake tensors at batch 1, without autograd (the EMA generator stands in for G)."""
    d = copy.deepcopy(m.d).requires_grad_(False)
    counts = {}
    with mode:
        d_batch, g_batch = step_batches(cfg, 1)
        labels = () if g_batch.labels is None else (g_batch.labels,)
        for name, net, x in (("G", m.g_ema, g_batch.z), ("D", d, d_batch.real)):
            with FlopCounterMode(display=False) as counter:
                net(x, *labels)
            counts[name] = counter.get_total_flops()
    return counts


def make_plan(cfg: GanConfig) -> Plan:
    """The plan for ``cfg`` on ``scaling``'s largest worker group."""
    workers = cfg.scaling.max_workers
    share = rank_batch(cfg.train.batch_size, workers, workers - 1)  # the last rank's share is the largest
    forward = -(-share // cfg.micro_batches(workers))
    measured = measured_config(cfg)
    m = build_modules(measured, torch.device("cpu"))
    mode = FakeTensorMode(allow_non_fake_inputs=True)  # one mode for every pass: its op cache carries over
    low, high = (step_activations(measured, m, n, mode) for n in MEASURE_BATCHES)
    span = MEASURE_BATCHES[1] - MEASURE_BATCHES[0]
    phases = []
    for name in low:
        slope = (high[name] - low[name]) / span
        phases.append(Phase(name, low[name] - slope * MEASURE_BATCHES[0], slope))
    notes = [f"activations measured in eager mode at {' and '.join(map(str, MEASURE_BATCHES))} images per forward "
             f"and extrapolated linearly; precision {cfg.train.precision}, autocast as CPU autocast casts"]  # fmt: skip
    if cfg.train.compile:
        notes.append("train.compile usually needs less activation memory than eager: this errs high")
    return Plan(workers, share, forward, fixed_memory(m, workers), tuple(phases), forward_flops(cfg, m, mode),
                allreduce_bytes(cfg, m, workers), notes)  # fmt: skip


def _size(value: float) -> str:
    for unit, scale in (("GiB", GIB), ("MiB", 2**20)):
        if abs(value) >= scale:
            return f"{value / scale:.2f} {unit}"
    return f"{value / 2**10:.1f} KiB"


def render(plan: Plan, gpu_sizes_gb: tuple[float, ...] = GPU_SIZES_GB) -> Group:
    """The plan as the console prints it: memory per GPU, then what fits on each GPU size."""
    memory = Table(title=f"per GPU: {plan.workers} worker(s), {plan.per_gpu_batch} images per step, "
                   f"{plan.forward_batch} per forward", title_justify="left")  # fmt: skip
    memory.add_column("memory")
    memory.add_column("bytes", justify="right")
    for name, value in plan.fixed.items():
        memory.add_row(name, _size(value))
    peak, phase = plan.activations(plan.forward_batch)
    memory.add_row(f"activations at {plan.forward_batch} per forward ({phase}, × {BACKWARD_HEADROOM})", _size(peak))
    memory.add_row("[bold]total", f"[bold]{_size(plan.total(plan.forward_batch))}")
    for p in plan.phases:
        memory.add_row(f"  {p.name}, saved: per image / constant", f"{_size(p.per_image)} / {_size(p.constant)}")
    fits = Table(title=f"largest batch per forward at {USABLE:.0%} of the GPU's memory", title_justify="left")
    for column in ("GPU", "largest batch", f"fits {plan.forward_batch}?"):
        fits.add_column(column, justify="right")
    for size in gpu_sizes_gb:
        largest = plan.largest_batch(size * GIB)
        fits.add_row(f"{size:g} GB", str(largest), "yes" if largest >= plan.forward_batch else "[red]no")
    flops = ", ".join(f"{k} {v / 1e9:.2f}" for k, v in plan.flops_per_image.items())
    lines = [f"FLOPs per image, forward only (convolutions and matmuls): {flops} GFLOP",
             "all-reduced per step per rank: "
             + (_size(plan.allreduce_bytes) if plan.workers > 1 else "nothing (one worker runs without DDP)"),
             *plan.notes]  # fmt: skip
    too_small = [s for s in gpu_sizes_gb if plan.largest_batch(s * GIB) < plan.forward_batch]
    for size in too_small:
        largest = plan.largest_batch(size * GIB)
        advice = f"set train.micro_batch={largest}" if largest else "no batch fits"
        lines.append(f"[yellow]warning:[/] {plan.forward_batch} images per forward do not fit a {size:g} GB GPU: "
                     f"{advice}")
    return Group(memory, fits, *lines)

"""GPU throughput of gan_dist's step: DCGAN-64, ResNet-256 and StyleGAN2-256 in fp32, bf16, + channels_last and
+ ``torch.compile`` (the config switches ``train.precision``, ``model.bf16_resolutions``, ``train.channels_last``,
``train.compile``), with seconds per 1,000 images (StyleGAN2-ADA's s/kimg), peak GPU memory, and achieved FLOP/s
as a fraction of the GPU's dense bf16 peak.

One process, no Ray: the trainer's ``discriminator_step`` + ``generator_step`` (n_critic 1, the job's loss,
R1 and EMA) on modules from ``build_modules``, random batches already on the GPU, so the model's speed is
measured apart from the loader (bench_loader.py) and Ray (bench_overhead.py). FLOPs per image are counted
once per model with ``torch.utils.flop_counter`` over one D step + one G step in fp32 (matmul/conv FLOPs,
forward and backward); achieved = FLOPs per image x images/s.

    python bench/bench_gpu.py                       # on a GPU machine; writes results/gpu.{json,md}
    python bench/bench_gpu.py --device cpu --tiny   # a smoke run of the script itself (no result files)
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from common import REPO, machine, write_results
from profile_step import gan_dist_step

MODELS = {  # name: (job whose model trains, resolution, batch per step, overrides)
    "dcgan-64": ("mnist.yaml", 64, 128, ["model.g_width=64", "model.d_width=64", "model.z_dim=100"]),  # DCGAN paper
    "resnet-256": ("ffhq_256_resnet.yaml", 256, 32, []),
    "stylegan2-256": ("ffhq_256.yaml", 256, 32, []),  # StyleGAN2-ADA quotes 21.6-24.2 s/kimg on one V100
}
# Variants: config overrides. "bf16" is autocast over the whole step, except for StyleGAN2, where it is its
# own equivalent of StyleGAN2-ADA's fp16 layers: the 4 highest resolutions in bf16, activations clamped.
BF16 = {"default": ["train.precision=bf16"], "stylegan2-256": ["model.bf16_resolutions=4", "model.conv_clamp=256"]}
VARIANTS = ("fp32", "bf16", "bf16 + channels_last", "bf16 + channels_last + compile")
# Dense bf16 tensor-core peak, FLOP/s, by device name (vendor datasheets; sparsity excluded).
BF16_PEAK = {"H100 80GB HBM3": 989e12, "H100 PCIe": 756e12, "H200": 989e12, "A100": 312e12, "L4": 121e12}


def bf16_peak(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in BF16_PEAK.items() if key in name), None)


def variant_overrides(model: str, variant: str) -> list[str]:
    overrides = [] if variant == "fp32" else list(BF16.get(model, BF16["default"]))
    if "channels_last" in variant:
        overrides.append("train.channels_last=true")
    if "compile" in variant:  # the adversarial passes; penalties (double backward) stay eager
        overrides.append("train.compile=true")
    return overrides


def job_config(model: str, variant: str, tiny: bool) -> Any:
    from gan_dist.config import load_config

    job, resolution, batch, model_overrides = MODELS[model]
    overrides = ["data.url=/unused", f"data.resolution={resolution}", "data.channels=3", f"train.batch_size={batch}",
                 "scaling.num_workers=1", "scaling.use_gpu=true", *model_overrides, *variant_overrides(model, variant)]  # fmt: skip
    if tiny:  # the smallest models the configs allow: checks the script, measures nothing
        overrides += ["data.resolution=32", "train.batch_size=4"]
        overrides += (["model.channel_base=256", "model.channel_max=16", "model.mapping_layers=2", "model.w_dim=16",
                       "model.z_dim=16", "model.mbstd_group_size=4"] if model.startswith("stylegan2") else ["model.g_width=8", "model.d_width=8"])
    return load_config(REPO / "jobs" / job, overrides)


def flops_per_image(model: str, device: torch.device, tiny: bool) -> float | None:
    """FLOPs of one D+G step per image, or None where torch's counter cannot follow the graph (its module
    tracker rejects StyleGAN2's synthesis input, a view of a learned constant)."""
    cfg = job_config(model, "fp32", tiny)
    real = torch.rand(cfg.train.batch_size, 3, cfg.data.resolution, cfg.data.resolution, device=device) * 2 - 1
    step, _ = gan_dist_step(cfg, iter(lambda: real, None), device)
    step()  # not counted: lazy penalties and first-call set-up
    try:
        with FlopCounterMode(display=False) as counter:
            step()
    except AssertionError:
        return None
    return counter.get_total_flops() / cfg.train.batch_size


def images_per_sec(model: str, variant: str, device: torch.device, steps: int, tiny: bool) -> dict[str, Any]:
    if variant != "fp32" and device.type == "cpu" and not tiny:
        raise SystemExit("bf16 timings on CPU say nothing about a GPU; use --device cuda (or --tiny for a smoke run)")
    cfg = job_config(model, variant, tiny)
    shape = (cfg.train.batch_size, 3, cfg.data.resolution, cfg.data.resolution)
    real = torch.rand(shape, device=device) * 2 - 1
    if cfg.train.channels_last:
        real = real.contiguous(memory_format=torch.channels_last)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    step, _ = gan_dist_step(cfg, iter(lambda: real, None), device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    for _ in range(max(3, cfg.loss.r1_every)):  # warm-up: compilation, cuDNN autotuning, a lazy-R1 step
        step()
    sync()
    warmup_s = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    # Lazy R1 makes every r1_every-th step slower: the mean over whole intervals is the rate a run sees.
    mean = statistics.fmean(times)
    memory = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"model": model, "variant": variant, "batch": cfg.train.batch_size, "warmup_s": warmup_s,
            "step_ms_mean": 1000 * mean, "images_per_s": cfg.train.batch_size / mean,
            "s_per_kimg": 1000 * mean / cfg.train.batch_size, "gpu_memory_gib": memory}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=48, help="timed steps per variant (a multiple of r1_every)")
    parser.add_argument("--tiny", action="store_true", help="tiny models, no result files: a smoke run")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick the fastest kernels
    info, peak = machine(), bf16_peak(device)
    rows = []
    for model in MODELS:
        flops = flops_per_image(model, device, args.tiny)
        for variant in VARIANTS:
            row = images_per_sec(model, variant, device, args.steps, args.tiny)
            row["gflop_per_image"] = flops / 1e9 if flops else None
            row["tflop_s"] = flops * row["images_per_s"] / 1e12 if flops else None
            row["of_bf16_peak"] = row["tflop_s"] * 1e12 / peak if peak and flops else None
            fp32 = next(r for r in rows + [row] if r["model"] == model and r["variant"] == "fp32")
            row["vs_fp32"] = row["images_per_s"] / fp32["images_per_s"]
            print(f"{model} {variant}: {row['images_per_s']:.1f} img/s, {row['s_per_kimg']:.1f} s/kimg", flush=True)
            rows.append(row)
    if args.tiny:
        return
    columns = [
        ("model", "model"), ("variant", "variant"), ("batch", "batch"), ("images_per_s", "images/s"),
        ("s_per_kimg", "s/kimg"), ("gpu_memory_gib", "GPU memory GiB"), ("vs_fp32", "× fp32"), ("gflop_per_image", "GFLOP/image (D+G step)"), ("tflop_s", "TFLOP/s"),
        ("of_bf16_peak", "of bf16 peak"), ("warmup_s", "warm-up s"),
    ]  # fmt: skip
    best = max((r for r in rows if r["model"] == "resnet-256"), key=lambda r: r["images_per_s"])
    summary = [
        f"Peak used: {peak / 1e12:.0f} TFLOP/s dense bf16." if peak else "Peak unknown for this device.",
        f"Best ResNet-256 variant: {best['variant']} ("
        + (f"{best['of_bf16_peak']:.0%} of peak; goal ≥ 40%)." if peak else "no peak to compare).")
    ]
    command = "python bench/bench_gpu.py " + " ".join(f"--{k} {v}" for k, v in vars(args).items() if k != "tiny")
    print(write_results("gpu", "GPU: images/s and FLOP/s by precision and switches", info,
                        {"device": str(device), **vars(args)}, [("Runs:", columns, rows)], summary, command))


if __name__ == "__main__":
    main()

"""The GPU check: everything a lent GPU machine should show, in one run of under 8 minutes.

1. ``gan-dist doctor`` on a local Ray instance (versions, driver, GPUs, a real collective, storage, tracking);
2. each architecture trained for a short while in bf16 on the digits through the real trainer (Ray Train, one
   GPU worker): losses finite, a checkpoint written, then the same run resumed for more steps;
3. ``bench/bench_gpu.py`` (throughput of each arch and precision, FLOP/s against the GPU's peak);
4. ``gan-dist plan``'s memory estimate for a StyleGAN2 step against ``torch.cuda.max_memory_allocated`` of
   that step run for real.

    python bench/gpu_check.py                        # on a GPU machine: writes results/gpu_check.{json,md}
    python bench/gpu_check.py --device cpu --tiny    # a smoke run of the script itself (no result files)
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import REPO, machine, prepare_digits, print_progress, ray_session, scratch, write_results

ARCHS = {  # small versions of each arch, fast enough to train for a minute and resume
    "mlp": ["model.arch=mlp"],
    "dcgan": ["model.arch=dcgan"],
    "resnet": ["model.arch=resnet", "model.d_spectral_norm=true"],
    "stylegan2": ["model.arch=stylegan2", "model.channel_base=2048", "model.channel_max=128", "model.w_dim=128",
                  "model.mapping_layers=2", "model.bf16_resolutions=2", "model.conv_clamp=256", "augment.kind=ada"],
    "r3gan": ["model.arch=r3gan", "loss.name=rpgan", "loss.r1_gamma=0.05", "loss.r2_gamma=0.05", "loss.r1_every=1",
              "train.channels_last=true"],
}  # fmt: skip
PLAN_JOB = ["model.arch=stylegan2", "model.channel_base=4096", "model.channel_max=256", "data.resolution=64",
            "loss.r1_every=1", "loss.pl_every=1", "train.batch_size=32", "scaling.num_workers=1"]  # fmt: skip


def _config(work: Path, shards: Path, arch: str, steps: int, device: str, tiny: bool) -> Any:
    from gan_dist.config import build_config

    tree = {
        "data": {"url": str(shards), "resolution": 32, "channels": 1, "loader_workers": 1},
        "train": {"batch_size": 16 if tiny else 64, "steps": steps, "log_every": max(1, steps // 4),
                  "sample_every": steps, "precision": "fp32" if device == "cpu" else "bf16", "max_failures": 0},
        "scaling": {"num_workers": 1, "use_gpu": device != "cpu"},
        "checkpoint": {"storage": str(work / "runs"), "every": steps},
        "tracking": {"uri": f"sqlite:///{work / 'mlflow.db'}", "experiment": "gpu-check"},
        "run": {"name": f"gpu-check-{arch}"},
    }  # fmt: skip
    tiny_widths = ["model.g_width=8", "model.d_width=8"] if tiny and arch not in ("stylegan2", "r3gan") else []
    return build_config(tree, ARCHS[arch] + tiny_widths)


def train_and_resume(work: Path, shards: Path, arch: str, steps: int, device: str, tiny: bool) -> dict[str, Any]:
    """Train ``steps``, then resume the same run to ``2 x steps``: finite losses, checkpoints, the resume."""
    import mlflow

    from gan_dist.driver import run_training

    start = time.perf_counter()
    first = run_training(_config(work, shards, arch, steps, device, tiny))
    second = run_training(_config(work, shards, arch, 2 * steps, device, tiny))
    client = mlflow.MlflowClient(first.tracking_uri)
    losses = [m.value for key in ("losses/d", "losses/g") for m in client.get_metric_history(first.mlflow_run_id, key)]
    return {
        "arch": arch, "steps": f"{first.final_step} + {second.final_step - first.final_step}",
        "losses finite": bool(losses) and all(math.isfinite(v) for v in losses),
        "checkpoint": bool(first.checkpoint_path) and Path(first.checkpoint_path).exists(),
        "resumed into the same run": second.mlflow_run_id == first.mlflow_run_id and second.final_step == 2 * steps,
        "wall_s": round(time.perf_counter() - start, 1),
    }  # fmt: skip


def plan_against_measured(device: str) -> dict[str, Any]:
    """``plan``'s per-GPU estimate for one StyleGAN2 step (R1 and path length due) and, on a GPU, the peak
    memory the same step allocates there."""
    import torch

    from gan_dist.config import build_config
    from gan_dist.plan import make_plan
    from gan_dist.train.modules import build_modules
    from gan_dist.train.step import DiscriminatorBatch, GeneratorBatch, discriminator_step, generator_step

    cfg = build_config({"data": {"url": "/unused", "resolution": 64}}, PLAN_JOB + ["train.precision=bf16"])
    plan = make_plan(cfg)
    row = {"job": "stylegan2-64, batch 32, bf16", "plan_gib": round(plan.total(plan.forward_batch) / 2**30, 3)}
    if device == "cpu":
        return {**row, "measured_gib": "no GPU"}
    torch.cuda.reset_peak_memory_stats()
    m = build_modules(cfg, torch.device(device))
    real = torch.rand(32, 1, 64, 64, device=device) * 2 - 1
    discriminator_step(m, cfg, DiscriminatorBatch(real, torch.randn(32, cfg.model.z_dim, device=device)), 0)
    generator_step(m, cfg, GeneratorBatch(torch.randn(32, cfg.model.z_dim, device=device)), 0)
    measured = torch.cuda.max_memory_allocated() / 2**30
    return {**row, "measured_gib": round(measured, 3), "plan / measured": round(row["plan_gib"] / measured, 2)}


def command(what: str, args: list[str], timeout: int) -> dict[str, Any]:
    start = time.perf_counter()
    try:
        proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=timeout)
        status, tail = ("passed" if proc.returncode == 0 else f"exit {proc.returncode}"), (proc.stdout + proc.stderr)[-3000:]
    except subprocess.TimeoutExpired:
        status, tail = f"timed out after {timeout} s", ""
    return {"what": what, "status": status, "wall_s": round(time.perf_counter() - start, 1), "output_tail": tail}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=300, help="steps of each arch's first run (the resume adds as many)")
    parser.add_argument("--tiny", action="store_true", help="tiny models and steps, no result files: a smoke run")
    args = parser.parse_args()
    steps = 2 if args.tiny else args.steps
    info = machine()
    with scratch() as tmp:
        work = Path(tmp)
        shards = prepare_digits(work)
        config = work / "doctor.yaml"
        config.write_text(_config(work, shards, "dcgan", steps, args.device, args.tiny).to_yaml())
        commands = [command("gan-dist doctor", [str(Path(sys.executable).parent / "gan-dist"), "doctor", str(config)], 180)]
        with ray_session(num_cpus=2):
            runs = []
            for arch in ARCHS:
                print_progress(f"training {arch}")
                runs.append(train_and_resume(work, shards, arch, steps, args.device, args.tiny))
    bench = [sys.executable, "bench/bench_gpu.py"] + (["--device", "cpu", "--tiny"] if args.tiny else [])
    commands.append(command("bench/bench_gpu.py", bench, 300))
    print_progress("plan against the measured peak")
    plan_row = plan_against_measured(args.device)
    for row in commands:
        print(f"{row['what']}: {row['status']} ({row['wall_s']} s)\n{row['output_tail'][-1500:]}")
    print(*runs, plan_row, sep="\n")
    ok = all(r["losses finite"] and r["checkpoint"] and r["resumed into the same run"] for r in runs)
    if args.tiny:
        sys.exit(0 if ok else 1)
    tables = [
        ("Commands", [("what", "what"), ("status", "status"), ("wall_s", "s")], commands),
        ("Each arch in bf16: train, checkpoint, resume", [(k, k) for k in runs[0]], runs),
        ("plan's estimate against the GPU's peak", [(k, k) for k in plan_row], [plan_row]),
    ]
    write_results("gpu_check", "GPU check", info, vars(args), tables, [f"all arch runs passed: {ok}"],
                  "python bench/gpu_check.py", raw={"commands": commands})  # fmt: skip
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()

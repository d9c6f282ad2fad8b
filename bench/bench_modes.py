"""Mode coverage and quality at equal CPU time: dcgan, resnet, stylegan2 and r3gan (with its RpGAN + R1 + R2
recipe, and with the classic non-saturating loss + R1 + R2 to show what the loss buys) on StackedMNIST (1,000
modes) and MNIST (10 modes).

Each configuration trains with gan_dist's trainer, 2 Ray workers on this machine's 2 cores, for the same wall
time (the cores busy throughout: equal CPU time), its step count from a calibration run of its own step rate.
Along the way the trainer scores its EMA generator every ``--evals``-th of the run: ``quality/modes`` and
``quality/mode_kl`` (the dataset's classifier names each fake's mode: a per-channel digit classifier for
StackedMNIST, docs/evaluation.md) and the classifier-feature FID (comparable between these runs only).
R3GAN's schedules (gamma, lr, beta2, EMA half-life) run over each run's own length, as its presets do over
theirs.

    flock /tmp/gan_dist_ray.lock python bench/bench_modes.py --data stacked-mnist --minutes 3
    flock /tmp/gan_dist_ray.lock python bench/bench_modes.py --data mnist --minutes 2
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from bench_quality import DCGAN, MNIST, SMALL_STYLEGAN2, _history, calibrate
from common import machine, print_progress, publish, ray_session, scratch

RESNET = ["model.arch=resnet", "model.z_dim=64", "model.g_width=32", "model.d_width=32", "train.batch_size=64",
          "train.ema_decay=0.995"]  # fmt: skip
# The CPU preset of jobs/r3gan_mnist.yaml; "{kimg}" becomes the run's length, so the ramps span the run.
R3GAN = [
    "model.arch=r3gan", "model.z_dim=64", "model.channel_base=512", "model.channel_max=64", "train.batch_size=32",
    "loss.name=rpgan", "loss.r1_every=1", "optim.betas=[0.0,0.9]",
    "schedules.r1_gamma={{start: 0.05, end: 0.005, kimg: {kimg}}}", "schedules.r2_gamma={{start: 0.05, end: 0.005, kimg: {kimg}}}",
    "schedules.g_lr={{start: 2.0e-4, end: 5.0e-5, kimg: {kimg}}}", "schedules.d_lr={{start: 2.0e-4, end: 5.0e-5, kimg: {kimg}}}",
    "schedules.beta2={{start: 0.9, end: 0.99, kimg: {kimg}}}", "schedules.ema_kimg={{start: 0, end: 5, kimg: {kimg}}}",
]  # fmt: skip
CONFIGS = {
    "dcgan": DCGAN,
    "resnet": RESNET,
    "stylegan2": SMALL_STYLEGAN2,
    "r3gan": R3GAN,
    "r3gan-classic-loss": R3GAN + ["loss.name=nonsaturating"],
}
DATA = {  # name -> (prepare source, channels, samples per shard)
    "stacked-mnist": (f"stacked-mnist:{MNIST}?samples=30000", 3, 2500),
    "mnist": (str(MNIST), 1, 2500),
}


def prepare_data(data: str, work: Path) -> tuple[Path, Path, int]:
    """Shards and the dataset's classifier (per channel for StackedMNIST); the classifier's hold-out accuracy."""
    import torch

    from gan_dist.data.prepare import prepare
    from gan_dist.metrics.classifier import train_classifier
    from gan_dist.storage import StorageConfig

    source, channels, per_shard = DATA[data]
    shards = work / "shards"
    prepare(source, str(shards), resolution=32, channels=channels, samples_per_shard=per_shard, progress=False)
    per_channel = 10 if data == "stacked-mnist" else 0
    classifier = train_classifier(str(shards), StorageConfig(), 32, channels, work / "classifier.pt", steps=600,
                                  per_channel=per_channel)  # fmt: skip
    accuracy = torch.load(classifier, weights_only=True).get("holdout_accuracy")
    return shards, classifier, accuracy


def run_config(name: str, data: str, work: Path, shards: Path, classifier: Path, minutes: float, evals: int,
               eval_images: int) -> dict[str, Any]:
    from gan_dist.config import build_config
    from gan_dist.driver import run_training

    channels = DATA[data][1]
    base = [
        f"data.url={shards}", "data.resolution=32", f"data.channels={channels}", "data.decode_cache_mb=128",
        "scaling.num_workers=2", f"checkpoint.storage={work / 'runs'}", f"tracking.uri=sqlite:///{work / 'mlflow.db'}",
        "tracking.experiment=modes", "train.max_failures=0", "eval.extractor=classifier",
        f"eval.extractor_path={classifier}", f"eval.num_images={eval_images}", "eval.batch_size=500",
    ]  # fmt: skip
    options = CONFIGS[name]
    seconds_per_step = calibrate(base + [o.format(kimg=1) for o in options] + [f"run.name={data}-{name}-calibration"])
    steps = max(evals, int(minutes * 60 / seconds_per_step))
    every = max(1, steps // evals)
    steps = every * evals
    batch = build_config({}, base + [o.format(kimg=1) for o in options]).train.batch_size
    kimg = steps * batch / 1000
    print_progress(f"  {name}: {seconds_per_step:.2f} s/step -> {steps} steps ({kimg:.0f} kimg), eval every {every}")
    cfg = build_config({}, base + [o.format(kimg=kimg) for o in options] + [
        f"run.name={data}-{name}", f"train.steps={steps}", f"eval.every={every}", f"train.log_every={max(1, every // 4)}",
        f"train.sample_every={steps}", f"checkpoint.every={steps}"])  # fmt: skip
    start = time.perf_counter()
    outcome = run_training(cfg)
    wall = time.perf_counter() - start
    fid, modes, kl = (_history(cfg, outcome, f"quality/{k}") for k in ("fid", "modes", "mode_kl"))
    row = {
        "config": name, "steps": steps, "images_seen": steps * batch, "wall_min": wall / 60, "s_per_step": seconds_per_step,
        "modes_final": modes[-1][1], "modes_best": max(v for _, v in modes), "kl_final": kl[-1][1],
        "kl_best": min(v for _, v in kl), "fid_final": fid[-1][1], "fid_best": min(v for _, v in fid),
        "curve": " ".join(f"{s}:{m:.0f}/{k:.2f}/{f:.1f}" for (s, m), (_, k), (_, f) in zip(modes, kl, fid)),
    }  # fmt: skip
    print_progress(f"  {name}: modes {row['modes_final']:.0f}, KL {row['kl_final']:.3f}, FID {row['fid_final']:.2f}, "
                   f"{row['wall_min']:.1f} min")  # fmt: skip
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", choices=tuple(DATA), default="stacked-mnist")
    parser.add_argument("--minutes", type=float, default=3.0, help="wall minutes of training per configuration")
    parser.add_argument("--evals", type=int, default=3, help="evaluations along each run")
    parser.add_argument("--eval-images", type=int, default=5000, help="fakes per evaluation (and real images)")
    parser.add_argument("--configs", default=",".join(CONFIGS))
    args = parser.parse_args()
    info = machine()
    rows = []
    with scratch() as tmp, ray_session(num_cpus=2):
        work = Path(tmp)
        shards, classifier, accuracy = prepare_data(args.data, work)
        print_progress(f"{args.data}: classifier hold-out accuracy {accuracy}")
        for name in args.configs.split(","):
            print_progress(f"{args.data}: {name}")
            rows.append(run_config(name, args.data, work, shards, classifier, args.minutes, args.evals, args.eval_images))
    total = 1000 if args.data == "stacked-mnist" else 10
    columns = [("config", "configuration"), ("steps", "steps"), ("images_seen", "images seen"), ("wall_min", "wall min"),
               ("modes_final", f"modes of {total} (final)"), ("kl_final", "KL (final)"), ("fid_final", "FID (final)"),
               ("modes_best", "modes (best)"), ("kl_best", "KL (best)"), ("fid_best", "FID (best)")]  # fmt: skip
    best = max(rows, key=lambda r: (r["modes_final"], -r["kl_final"]))
    publish(
        f"modes_{args.data.replace('-', '_')}", f"Mode coverage at equal CPU time: {args.data}", info,
        {"data": args.data, "modes": total, "classifier hold-out accuracy": accuracy, "fakes per evaluation": args.eval_images},
        [("Final scores (modes: more is better; KL and classifier FID: lower is better)", columns, rows),
         ("Along training (step:modes/KL/FID)", [("config", "configuration"), ("curve", "curve")], rows)],
        [f"most modes at the end: {best['config']} ({best['modes_final']:.0f}, KL {best['kl_final']:.3f}); equal wall "
         f"time per configuration ({args.minutes} min of training, 2 Ray workers on 2 cores), steps from each "
         "configuration's own step rate"],
        "bench_modes.py", args, raw={"rows": rows},
    )  # fmt: skip


if __name__ == "__main__":
    main()

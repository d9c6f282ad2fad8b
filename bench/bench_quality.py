"""Sample quality at equal time on limited data: dcgan, stylegan2, stylegan2 + ADA, stylegan2 + DiffAugment.

Each configuration trains with gan_dist's trainer (2 Ray workers on this machine's 2 cores) for the same wall
time, measured by a calibration run of its own step rate. Every ``--evals`` points along the way the trainer
scores its EMA generator with the project's classifier-feature FID (a small CNN trained on the dataset's own
labels: comparable between these runs, not with published FIDs). ADA's p and r_t come from the run's MLflow
history. After training, D's mean raw output on the training images, on held-out images of the same source and
on fakes tells whether D overfits: a D that has memorised its training set scores them clearly above unseen
real images (Karras et al. 2020, Fig. 1).

    flock /tmp/gan_dist_ray.lock python bench/bench_quality.py --data digits --minutes 6
    flock /tmp/gan_dist_ray.lock python bench/bench_quality.py --data mnist --minutes 15 --configs dcgan,dcgan-hinge-sn,...
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common import REPO, machine, print_progress, publish, ray_session, scratch

MNIST = REPO.parent / "shared" / "data" / "mnist"
SMALL_STYLEGAN2 = [  # the CPU preset of the README's StyleGAN2 section (32 px)
    "model.arch=stylegan2", "model.z_dim=64", "model.w_dim=64", "model.mapping_layers=2", "model.channel_base=1024",
    "model.channel_max=64", "model.mbstd_group_size=4", "optim.g_lr=0.0025", "optim.d_lr=0.0025",
    "optim.betas=[0.0,0.99]", "train.ema_kimg=10", "train.ema_rampup=0.05", "train.batch_size=32",
]  # fmt: skip
DCGAN = ["model.arch=dcgan", "model.z_dim=64", "model.g_width=32", "model.d_width=32", "train.batch_size=64",
         "train.ema_decay=0.995"]  # fmt: skip
CONFIGS = {
    "dcgan": DCGAN,
    "dcgan-hinge-sn": DCGAN + ["loss.name=hinge", "model.d_norm=none", "model.d_spectral_norm=true"],
    "stylegan2": SMALL_STYLEGAN2,
    # ADA's default speed (p from 0 to 1 over 500k images) is for day-long runs; these see ~30k images.
    "stylegan2+ada": SMALL_STYLEGAN2 + ["augment.kind=ada", "augment.speed_kimg=10"],
    "stylegan2+diffaug": SMALL_STYLEGAN2 + ["augment.kind=diffaug"],
    "dcgan+ada": DCGAN + ["augment.kind=ada", "augment.speed_kimg=10"],
}
CALIBRATION_STEPS = 30


def split_dataset(source: str, root: Path, holdout: int) -> tuple[Path, torch.Tensor]:
    """Prepare ``source`` minus ``holdout`` images as the training shards; the held-out images as a tensor."""
    from gan_dist.data.prepare import prepare
    from gan_dist.data.sources import open_source

    src = open_source(source)
    keep = np.ones(src.total, dtype=bool)
    keep[np.random.default_rng(0).choice(src.total, holdout, replace=False)] = False
    images, held = [], []
    for i in range(src.total):
        image, label, _ = src.load(i)
        (images if keep[i] else held).append((np.asarray(image.convert("L").resize((32, 32))), label))
    folder = root / "train-images"
    for i, (pixels, label) in enumerate(images):
        (folder / str(label)).mkdir(parents=True, exist_ok=True)
        from PIL import Image

        Image.fromarray(pixels).save(folder / str(label) / f"{i:06d}.png")
    shards = root / "train"
    prepare(str(folder), str(shards), resolution=32, channels=1, samples_per_shard=500, progress=False)
    held_out = torch.from_numpy(np.stack([p for p, _ in held]))[:, None]
    return shards, held_out


def base_overrides(work: Path, shards: Path, classifier: Path, name: str) -> list[str]:
    return [
        f"data.url={shards}", "data.resolution=32", "data.channels=1", "data.decode_cache_mb=64",
        "scaling.num_workers=2", f"checkpoint.storage={work / 'runs'}", f"tracking.uri=sqlite:///{work / 'mlflow.db'}",
        "tracking.experiment=quality", f"run.name={name}", "train.max_failures=0", "eval.extractor=classifier",
        f"eval.extractor_path={classifier}", "eval.num_images=1000", "eval.batch_size=250",
    ]  # fmt: skip


def calibrate(overrides: list[str]) -> float:
    """Seconds per step of this configuration, from a short run's steady throughput."""
    from gan_dist.config import build_config
    from gan_dist.driver import run_training

    cfg = build_config({}, overrides + [f"train.steps={CALIBRATION_STEPS}", "train.log_every=10", "eval.every=0",
                                        f"checkpoint.every={CALIBRATION_STEPS}", f"train.sample_every={CALIBRATION_STEPS}"])
    start = time.perf_counter()
    outcome = run_training(cfg)
    rates = _history(cfg, outcome, "throughput/images_per_sec")
    print_progress(f"  calibration: {time.perf_counter() - start:.0f} s wall for {CALIBRATION_STEPS} steps")
    return cfg.train.batch_size / float(np.median([v for _, v in rates[1:]]))


def _history(cfg: Any, outcome: Any, key: str) -> list[tuple[int, float]]:
    import mlflow

    points = mlflow.MlflowClient(cfg.tracking.uri).get_metric_history(outcome.mlflow_run_id, key)
    return [(m.step, m.value) for m in sorted(points, key=lambda m: m.step)]


@torch.no_grad()
def d_outputs(checkpoint: str, train_images: torch.Tensor, held_out: torch.Tensor) -> dict[str, float]:
    """Final D's mean raw output on training images, held-out images and the EMA generator's fakes."""
    from gan_dist.models import build_discriminator, model_config
    from gan_dist.models.io import load_generator, read_state

    state = read_state(checkpoint)
    cfg = state["config"]
    d = build_discriminator(model_config(cfg["model"]), 32, 1)
    d.load_state_dict(state["d"])
    d.eval()
    g, meta = load_generator(checkpoint)
    n = min(len(train_images), len(held_out), 512)
    as_float = lambda x: x[:n].float() / 127.5 - 1  # noqa: E731
    fakes = g(torch.randn(n, meta["model"]["z_dim"], generator=torch.Generator().manual_seed(0)))
    scores = {name: float(d(images).mean()) for name, images in
              (("train", as_float(train_images)), ("held_out", as_float(held_out)), ("fake", fakes))}  # fmt: skip
    scores["train_minus_held_out"] = scores["train"] - scores["held_out"]
    return scores


def run_config(name: str, work: Path, shards: Path, classifier: Path, minutes: float, evals: int,
               train_images: torch.Tensor, held_out: torch.Tensor) -> dict[str, Any]:
    from gan_dist.config import build_config
    from gan_dist.driver import run_training

    overrides = base_overrides(work, shards, classifier, name) + CONFIGS[name]
    seconds_per_step = calibrate(overrides + [f"run.name={name}-calibration"])
    steps = max(evals, int(minutes * 60 / seconds_per_step))
    every = max(1, steps // evals)
    steps = every * evals
    print_progress(f"  {name}: {seconds_per_step:.2f} s/step -> {steps} steps, FID every {every}")
    cfg = build_config({}, overrides + [f"train.steps={steps}", f"eval.every={every}", f"train.log_every={max(1, every // 4)}",
                                        f"train.sample_every={steps}", f"checkpoint.every={steps}"])  # fmt: skip
    start = time.perf_counter()
    outcome = run_training(cfg)
    wall = time.perf_counter() - start
    fid = _history(cfg, outcome, "quality/fid")
    row = {
        "config": name, "steps": steps, "wall_min": wall / 60, "s_per_step": seconds_per_step,
        "images_seen": steps * cfg.train.batch_size, "fid_final": fid[-1][1], "fid_best": min(v for _, v in fid),
        "fid_curve": fid, "p_curve": _history(cfg, outcome, "augment/p"), "rt_curve": _history(cfg, outcome, "augment/rt"),
        **{f"d_{k}": v for k, v in d_outputs(outcome.checkpoint_path, train_images, held_out).items()},
    }  # fmt: skip
    print_progress(f"  {name}: FID {row['fid_final']:.2f} (best {row['fid_best']:.2f}), D train-held_out "
                   f"{row['d_train_minus_held_out']:.3f}, {row['wall_min']:.1f} min")
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", choices=("digits", "mnist"), default="digits")
    parser.add_argument("--minutes", type=float, default=6.0, help="wall minutes of training per configuration")
    parser.add_argument("--evals", type=int, default=6, help="FID evaluations along each run")
    parser.add_argument("--configs", default="dcgan,stylegan2,stylegan2+ada,stylegan2+diffaug")
    parser.add_argument("--holdout", type=int, default=297, help="images kept out of training, to test D on")
    parser.add_argument("--tag", default="", help="suffix of the result files (quality_<data>[_<tag>])")
    args = parser.parse_args()
    info = machine()
    names = args.configs.split(",")
    from gan_dist.metrics.classifier import train_classifier
    from gan_dist.storage import StorageConfig
    from common import load_images

    source = "sklearn:digits" if args.data == "digits" else str(MNIST)
    rows = []
    with scratch() as tmp, ray_session(num_cpus=2):
        work = Path(tmp)
        shards, held_out = split_dataset(source, work, args.holdout)
        classifier = train_classifier(str(shards), StorageConfig(), 32, 1, work / "classifier.pt", steps=400)
        train_images = load_images(shards)
        for name in names:
            print_progress(f"{args.data}: {name}")
            rows.append(run_config(name, work, shards, classifier, args.minutes, args.evals, train_images, held_out))
    columns = [("config", "configuration"), ("steps", "steps"), ("images_seen", "images seen"),
               ("wall_min", "wall min"), ("fid_final", "FID (final)"), ("fid_best", "FID (best)"),
               ("d_train", "D(train)"), ("d_held_out", "D(held-out)"), ("d_fake", "D(fake)"),
               ("d_train_minus_held_out", "D(train) - D(held-out)")]  # fmt: skip
    curves = [{"config": r["config"], "fid": " ".join(f"{s}:{v:.1f}" for s, v in r["fid_curve"]),
               "p": " ".join(f"{s}:{v:.2f}" for s, v in r["p_curve"][:: max(1, len(r["p_curve"]) // 8)]),
               "rt": " ".join(f"{s}:{v:.2f}" for s, v in r["rt_curve"][:: max(1, len(r["rt_curve"]) // 8)])}
              for r in rows]  # fmt: skip
    best = min(rows, key=lambda r: r["fid_final"])
    publish(
        f"quality_{args.data}{'_' + args.tag if args.tag else ''}", f"Sample quality at equal time: {args.data}", info,
        {"data": args.data, "training images": len(train_images), "held out": len(held_out)},
        [("Final scores (classifier-feature FID: lower is better; comparable only within this table)", columns, rows),
         ("Curves along training (step:value)", [("config", "configuration"), ("fid", "FID"), ("p", "ADA p"),
                                                  ("rt", "ADA r_t")], curves)],
        [f"best final FID: {best['config']} ({best['fid_final']:.2f}); equal wall time per configuration "
         f"({args.minutes} min of training, 2 Ray workers on 2 cores), steps from each configuration's own step rate"],
        "bench_quality.py", args, raw={"rows": rows},
    )  # fmt: skip


if __name__ == "__main__":
    main()

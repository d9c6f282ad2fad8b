"""A conditional DCGAN on the MNIST test split (10,000 real digits, 32 px), 2 Ray workers on CPU: how often its
samples show the class asked for, over training; then ``gan-dist sample --class 3`` on the final generator.

The judge is the project's classifier extractor, trained here on the same images' labels (its held-out accuracy
is reported): during training the trainer logs ``quality/class_accuracy`` (the share of samples the classifier
puts in the class they were drawn for) and intra-FID every ``--evals`` points; at the end the command-line
sampler writes PNGs of class 3, which the classifier reads back from disk.

    flock /tmp/gan_dist_ray.lock python bench/bench_conditional.py --minutes 15
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import torch
from PIL import Image

from common import REPO, machine, print_progress, publish, ray_session, scratch

MNIST = REPO.parent / "shared" / "data" / "mnist"
JOB = REPO / "jobs" / "mnist_conditional.yaml"
SAMPLED_CLASS, SAMPLES = 3, 256


def _history(cfg, run_id: str, key: str) -> list[tuple[int, float]]:
    import mlflow

    points = mlflow.MlflowClient(cfg.tracking.uri).get_metric_history(run_id, key)
    return [(m.step, m.value) for m in sorted(points, key=lambda m: m.step)]


def _classify_pngs(folder: Path, classifier: Path) -> torch.Tensor:
    """The classifier's predicted class of every sample-*.png the CLI wrote."""
    from gan_dist.metrics.classifier import ClassifierExtractor

    extractor = ClassifierExtractor(classifier)
    images = [torch.from_numpy(__import__("numpy").asarray(Image.open(p)))[None] for p in sorted(folder.glob("sample-*.png"))]
    batch = torch.stack(images).float() / 127.5 - 1
    return extractor(batch)[1].argmax(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=15.0, help="wall minutes of training")
    parser.add_argument("--evals", type=int, default=8, help="evaluations along the run")
    parser.add_argument("--seconds-per-step", type=float, default=0.0, help="skip calibration: use this step time")
    args = parser.parse_args()
    info = machine()
    from gan_dist.config import load_config
    from gan_dist.data.prepare import prepare
    from gan_dist.driver import run_training
    from gan_dist.metrics.classifier import train_classifier
    from gan_dist.storage import StorageConfig

    with scratch() as tmp, ray_session(num_cpus=2):
        work = Path(tmp)
        shards = work / "mnist"
        prepare(str(MNIST), str(shards), resolution=32, channels=1, samples_per_shard=2500, progress=False)
        classifier = train_classifier(str(shards), StorageConfig(), 32, 1, work / "classifier.pt", steps=600)
        holdout = torch.load(classifier, weights_only=True)["holdout_accuracy"]
        base = [f"data.url={shards}", f"checkpoint.storage={work / 'runs'}", f"tracking.uri=sqlite:///{work / 'mlflow.db'}",
                "eval.extractor=classifier", f"eval.extractor_path={classifier}", "eval.num_images=1000",
                "eval.per_class=10", "train.max_failures=0"]  # fmt: skip
        seconds = args.seconds_per_step
        if not seconds:
            calibration = load_config(JOB, base + ["run.name=calibration", "train.steps=30", "train.log_every=10",
                                                   "checkpoint.every=30", "train.sample_every=30", "eval.every=0"])  # fmt: skip
            outcome = run_training(calibration)
            rates = [v for _, v in _history(calibration, outcome.mlflow_run_id, "throughput/images_per_sec")][1:]
            seconds = calibration.train.batch_size / (sum(rates) / len(rates))
        every = max(1, int(args.minutes * 60 / seconds) // args.evals)
        cfg = load_config(JOB, base + ["run.name=conditional", f"train.steps={every * args.evals}", f"eval.every={every}",
                                       f"checkpoint.every={every * args.evals}"])  # fmt: skip
        print_progress(f"{seconds:.2f} s/step -> {cfg.train.steps} steps, evaluation every {every}")
        start = time.perf_counter()
        outcome = run_training(cfg)
        wall = time.perf_counter() - start
        accuracy = _history(cfg, outcome.mlflow_run_id, "quality/class_accuracy")
        fid = dict(_history(cfg, outcome.mlflow_run_id, "quality/fid"))
        intra = dict(_history(cfg, outcome.mlflow_run_id, "quality/intra_fid_mean"))
        out = work / "threes"
        command = [str(Path(sys.executable).parent / "gan-dist"), "sample", outcome.checkpoint_path, "--num",
                   str(SAMPLES), "--out", str(out), "--class", str(SAMPLED_CLASS)]  # fmt: skip
        subprocess.run(command, check=True, capture_output=True)
        predicted = _classify_pngs(out, classifier)
        share = float((predicted == SAMPLED_CLASS).float().mean())
        (REPO / "docs").mkdir(exist_ok=True)
        Image.open(out / "classes.png").save(REPO / "docs" / "conditional_mnist_classes.png")
    rows = [{"step": s, "class_accuracy": a, "fid": fid.get(s), "intra_fid_mean": intra.get(s)} for s, a in accuracy]
    publish(
        "conditional_mnist", "Conditional DCGAN on MNIST (test split, 32 px, 2 CPU workers)", info,
        {"job": "jobs/mnist_conditional.yaml", "steps": cfg.train.steps, "wall_min": round(wall / 60, 1),
         "classifier held-out accuracy": round(holdout, 4)},
        [("Class accuracy of the samples over training (the classifier's verdict on 1,000 samples; chance: 0.1)",
          [("step", "step"), ("class_accuracy", "class accuracy"), ("fid", "FID (classifier features)"),
           ("intra_fid_mean", "intra-FID (mean of 10 classes)")], rows)],
        [f"`gan-dist sample --class 3 --num {SAMPLES}` on the final checkpoint: the classifier reads {share:.1%} of "
         "the written PNGs as 3s (docs/conditional_mnist_classes.png: the labelled grid the sampler wrote)",
         f"final class accuracy {accuracy[-1][1]:.3f} after {cfg.train.steps} steps ({wall / 60:.1f} min)"],
        "bench_conditional.py", args, raw={"rows": rows, "sampled_as_3": share, "predictions": predicted.tolist()},
    )  # fmt: skip


if __name__ == "__main__":
    main()

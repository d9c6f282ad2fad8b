"""Feature-extraction throughput (images/s) of the evaluation extractors on this machine.

Measures the classifier extractor (trained briefly on sklearn's digits) and the FID Inception v3
architecture (random weights: speed does not depend on the values) on 32x32 greyscale inputs in
[-1, 1], the shape a digits/MNIST GAN produces, at batch sizes 50 and 100. Writes
``bench/results/features.json`` and ``bench/results/features.md``.

    python bench/bench_features.py [--device cpu] [--min-seconds 10]

Thread count: torch's default (all cores); ``OMP_NUM_THREADS=1`` measures one core. On a machine shared
with other work, read the load average recorded with the results before comparing numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path

import torch

from gan_dist.storage import StorageConfig
from gan_dist.data.prepare import prepare
from gan_dist.metrics.classifier import ClassifierExtractor, train_classifier
from gan_dist.metrics.inception import FIDInceptionV3, InceptionExtractor

RESULTS = Path(__file__).resolve().parent / "results"
BATCH_SIZES = (50, 100)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def images_per_second(extractor, batch_size: int, device: str, min_seconds: float) -> dict:
    """Best-of-repeats throughput: the fastest batch is the least disturbed by other processes."""
    images = torch.rand(batch_size, 1, 32, 32, device=device) * 2 - 1
    extractor(images)  # warm-up: allocator, kernels, thread pool
    times: list[float] = []
    start = time.perf_counter()
    while time.perf_counter() - start < min_seconds or len(times) < 3:
        t0 = time.perf_counter()
        extractor(images)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return {
        "batch_size": batch_size,
        "batches": len(times),
        "best_images_per_s": batch_size / min(times),
        "median_images_per_s": batch_size / statistics.median(times),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--min-seconds", type=float, default=10.0, help="Time spent per (extractor, batch)")
    args = parser.parse_args()

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "digits"
        prepare("sklearn:digits", str(data), resolution=32, channels=1, samples_per_shard=450, progress=False)
        classifier = train_classifier(str(data), StorageConfig(), 32, 1, Path(tmp) / "clf.pt", steps=100)
        inception_weights = Path(tmp) / "inception-random.pth"
        torch.save(FIDInceptionV3().state_dict(), inception_weights)
        extractors = {
            "classifier (128-d, 32px input)": ClassifierExtractor(classifier, args.device),
            "inception v3 FID (2048-d, resized to 299px)": InceptionExtractor(inception_weights, args.device),
        }
        rows = [
            {"extractor": name, **images_per_second(ex, bs, args.device, args.min_seconds)}
            for name, ex in extractors.items()
            for bs in BATCH_SIZES
        ]
    meta = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{cpu_model()}, {os.cpu_count()} logical CPUs, torch threads {torch.get_num_threads()}",
        "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(args.device),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": version("torchvision"),
        "load_average_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "features.json").write_text(json.dumps({"meta": meta, "results": rows}, indent=2) + "\n")
    lines = [
        "# Feature extraction throughput",
        "",
        *(f"- {k}: {v}" for k, v in meta.items()),
        "",
        "Input: 32x32 greyscale in [-1, 1]. Best = fastest batch (least disturbed by other load).",
        "",
        "| extractor | batch | batches timed | best img/s | median img/s |",
        "| --- | ---: | ---: | ---: | ---: |",
        *(
            f"| {r['extractor']} | {r['batch_size']} | {r['batches']} | {r['best_images_per_s']:.1f} | "
            f"{r['median_images_per_s']:.1f} |"
            for r in rows
        ),
        "",
        "Reproduce: `python bench/bench_features.py` (see its docstring).",
    ]
    (RESULTS / "features.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

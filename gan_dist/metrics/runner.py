"""Evaluation across the worker group: feature extraction sharded over ranks, real statistics cached.

Work is split as in StyleGAN2-ADA: every rank extracts features for a contiguous share of the images,
rank 0 gathers them and computes the statistics. Real-data statistics are computed once per (dataset
manifest, extractor, resolution, channels, image count) and cached. Fakes are quantised to uint8 first,
like the real images, so both sides go through the same pixels. With a classifier of the data's classes (the
extractor itself, or ``eval.mode_classifier``), every fake's predicted class also goes to rank 0, for the
mode-coverage metrics.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from gan_dist.config import EvalConfig
from gan_dist.data.images import to_uint8
from gan_dist.data.loader import to_float
from gan_dist.data.shards import list_shards
from gan_dist.data.subset import dataset_manifest, read_images
from gan_dist.metrics.classifier import ClassifierExtractor, classifier_name
from gan_dist.metrics.extractors import FeatureExtractor
from gan_dist.metrics.inception import InceptionExtractor, fid_extra_file, inception_name
from gan_dist.metrics.modes import mode_metrics
from gan_dist.metrics.stats import (
    feature_statistics,
    frechet_distance,
    inception_score,
    kernel_inception_distance,
    precision_recall,
)
from gan_dist.storage import StorageConfig, exists, join, read_bytes, write_bytes

log = logging.getLogger(__name__)

CACHE_FORMAT = "gan_dist.real_stats"
CACHE_VERSION = 2  # bump when the image selection or the file layout changes: old files stop matching
MAX_STORED_FEATURES = 10_000  # real features kept for KID and precision/recall (mu/sigma use all)
KID_SUBSETS, KID_SUBSET_SIZE = 100, 1000  # the StyleGAN2-ADA / torch-fidelity defaults
IS_SPLITS = 10
PR_K, PR_MAX_SAMPLES = 3, 10_000  # Kynkäänniemi et al.'s k; k-NN over n samples costs O(n²·d)


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "gan_dist" / "real_stats"


def build_extractor(eval_cfg: EvalConfig, device: torch.device | str) -> FeatureExtractor:
    """The extractor ``eval.extractor`` names, with weights from ``eval.extractor_path`` (Inception without a
    path: the ``[fid]`` extra's, checksum-verified)."""
    if eval_cfg.extractor == "inception":
        return InceptionExtractor(eval_cfg.extractor_path, device)
    return ClassifierExtractor(_classifier_file(eval_cfg), device)


def _classifier_file(eval_cfg: EvalConfig) -> str:
    if eval_cfg.extractor_path is None:
        raise ValueError("eval.extractor_path must point at a classifier file from train_classifier; "
                         "see docs/evaluation.md")  # fmt: skip
    return eval_cfg.extractor_path


def extractor_identity(eval_cfg: EvalConfig) -> str:
    """The ``name`` (network + weights sha256, shortened) of the extractor ``build_extractor`` gives, without
    building it: what run records say produced their numbers, so that only like is compared with like."""
    if eval_cfg.extractor == "inception":
        if eval_cfg.extractor_path is None:
            fid_extra_file()  # the same error as build_extractor's when the extra is missing
        return inception_name(eval_cfg.extractor_path)
    return classifier_name(_classifier_file(eval_cfg))


def build_mode_classifier(eval_cfg: EvalConfig, device: torch.device | str) -> ClassifierExtractor | None:
    """The classifier ``eval.mode_classifier`` names; None when unset (a classifier extractor then names the
    modes itself)."""
    return ClassifierExtractor(eval_cfg.mode_classifier, device) if eval_cfg.mode_classifier else None


def _batches(pairs: Iterable[tuple[torch.Tensor, int | None]], batch_size: int) -> Iterator[torch.Tensor]:
    """uint8 images -> float batches in [-1, 1]."""
    batch: list[torch.Tensor] = []
    for image, _ in pairs:
        batch.append(image)
        if len(batch) == batch_size:
            yield to_float(torch.stack(batch), "cpu")
            batch = []
    if batch:
        yield to_float(torch.stack(batch), "cpu")


# ---- extraction across ranks ---------------------------------------------------------------------


def extract_features(
    extractor: FeatureExtractor,
    batches: Iterable[torch.Tensor],
    device: torch.device | str,
    progress: tqdm | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Features ``[N, dim]`` (float32, on ``device``) and logits (None when the extractor has none)."""
    features, logits = [], []
    for batch in batches:
        f, lg = extractor(batch.to(device))
        features.append(f.float())
        if lg is not None:
            logits.append(lg.float())
        if progress is not None:
            progress.update(len(batch))
    if not features:
        return torch.empty(0, extractor.dim, device=device), None
    return torch.cat(features), torch.cat(logits) if logits else None


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_to_rank0(features: torch.Tensor) -> torch.Tensor | None:
    """Rows of every rank concatenated in rank order on rank 0, None elsewhere; identity without a group.

    all_gather needs equal shapes, so each rank pads to the largest count and rank 0 trims.
    """
    if not _distributed():
        return features
    count = torch.tensor([features.shape[0]], device=features.device)
    counts = [torch.zeros_like(count) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, count)
    longest = int(max(counts))
    padded = features.new_zeros((longest, *features.shape[1:]))
    padded[: features.shape[0]] = features
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded.contiguous())
    if dist.get_rank() != 0:
        return None
    return torch.cat([part[: int(n)] for part, n in zip(parts, counts)])


# ---- real statistics cache -----------------------------------------------------------------------


@dataclass
class RealStats:
    mu: torch.Tensor  # float64 [D]
    sigma: torch.Tensor  # float64 [D, D]
    features: torch.Tensor  # float32 [<= MAX_STORED_FEATURES, D], for KID and precision/recall
    num_images: int
    location: str  # the cache file: local path or s3:// URL
    per_class: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # class: (mu, sigma)


def real_stats_key(data_url: str, storage: StorageConfig, extractor_name: str, resolution: int, channels: int,
                   num_images: int, per_class: int = 0) -> str:
    """sha256 naming the real statistics; without a manifest the shard list stands in for the content."""
    shards = list_shards(data_url, storage)
    text, _ = dataset_manifest(shards, storage)
    if text is None:
        log.warning("%s has no manifest: the statistics cache cannot notice changed shard contents", data_url)
    blob = json.dumps([CACHE_VERSION, text or shards, extractor_name, resolution, channels, num_images, per_class])
    return hashlib.sha256(blob.encode()).hexdigest()


def _load_cached(location: str, key: str, storage: StorageConfig) -> RealStats | None:
    try:
        if not exists(location, storage):
            return None
        blob = torch.load(io.BytesIO(read_bytes(location, storage)), map_location="cpu", weights_only=True)
    except Exception as exc:  # damaged, foreign or unreachable: recompute rather than fail every evaluation
        log.warning("ignoring statistics cache %s: %s", location, exc)
        return None
    if not isinstance(blob, dict) or blob.get("format") != CACHE_FORMAT or blob.get("key") != key:
        log.warning("ignoring %s: not real statistics for this dataset/extractor", location)
        return None
    per_class = {int(c): (mu, sigma) for c, (mu, sigma) in blob.get("per_class", {}).items()}
    return RealStats(blob["mu"], blob["sigma"], blob["features"], blob["num_images"], location, per_class)


def real_statistics(
    data_url: str,
    storage: StorageConfig,
    extractor: FeatureExtractor,
    resolution: int,
    channels: int,
    num_images: int,
    cache_dir: str | Path,
    batch_size: int = 100,
    rank: int = 0,
    world: int = 1,
    device: torch.device | str = "cpu",
    progress: bool = False,
    per_class: int = 0,
) -> RealStats | None:
    """Real-image statistics on rank 0 (None on other ranks), read from ``cache_dir`` (a local directory
    or an s3:// prefix, e.g. in the run's storage) or computed and written there. With ``per_class`` = k,
    also the statistics of each of the first k classes (for intra-FID; the dataset needs labels).

    Every rank must call this: on a cache miss all of them extract a share of the images.
    """
    key = real_stats_key(data_url, storage, extractor.name, resolution, channels, num_images, per_class)
    location = join(str(cache_dir), f"real-{key[:24]}.pt")
    cached = _load_cached(location, key, storage) if rank == 0 else None
    hit = [cached is not None]
    if _distributed():  # only rank 0 may see the cache (another node's disk): it decides for all
        dist.broadcast_object_list(hit, src=0)
    if hit[0]:
        return cached
    seen: list[int] = []  # the images' labels (-1: none), recorded as they stream past

    def pairs() -> Iterator[tuple[torch.Tensor, int | None]]:
        for image, label in read_images(data_url, storage, resolution, channels, num_images, per_class > 0, rank, world):
            seen.append(-1 if label is None else label)
            yield image, label

    bar = tqdm(total=num_images // world, desc="real features", unit="img", disable=not progress)
    with bar:
        features, _ = extract_features(extractor, _batches(pairs(), batch_size), device, bar)
    gathered = gather_to_rank0(features)
    labels = gather_to_rank0(torch.tensor(seen, device=features.device))
    if gathered is None:
        return None
    if gathered.shape[0] < num_images:
        log.warning("%s: only %d images for the %d asked for", data_url, gathered.shape[0], num_images)
    mu, sigma = feature_statistics(gathered)
    # A random subset: the rows are in dataset order, and datasets are often grouped by class.
    keep = torch.randperm(gathered.shape[0], generator=torch.Generator().manual_seed(0))[:MAX_STORED_FEATURES]
    kept = gathered[keep.to(gathered.device)].float().cpu()
    classes = {c: feature_statistics(gathered[labels == c]) for c in range(per_class) if (labels == c).sum() > 1}
    classes = {c: (m.cpu(), s.cpu()) for c, (m, s) in classes.items()}
    stats = RealStats(mu.cpu(), sigma.cpu(), kept, gathered.shape[0], location, classes)
    buffer = io.BytesIO()
    torch.save({"format": CACHE_FORMAT, "key": key, "mu": stats.mu, "sigma": stats.sigma, "features": kept,
                "num_images": stats.num_images, "extractor": extractor.name, "data_url": data_url,
                "per_class": classes}, buffer)  # fmt: skip
    write_bytes(location, buffer.getvalue(), storage)  # atomic: readers never see half a file
    return stats


# ---- generator evaluation ------------------------------------------------------------------------


def _fake_batches(g_ema: torch.nn.Module, z: torch.Tensor, labels: torch.Tensor | None, batch_size: int,
                  device: torch.device | str) -> Iterator[torch.Tensor]:
    for i, chunk in enumerate(z.split(batch_size)):
        with torch.no_grad():
            if labels is None:
                images = g_ema(chunk.to(device)).float()
            else:
                images = g_ema(chunk.to(device), labels[i * batch_size : (i + 1) * batch_size].to(device)).float()
        yield to_float(to_uint8(images), device)  # the pixels a saved PNG would hold


def fake_labels(class_counts: list[int], num_images: int, seed: int) -> torch.Tensor:
    """Classes for ``num_images`` fakes, drawn as the dataset's labels are distributed (as StyleGAN2-ADA's
    metrics do), the same on every rank."""
    weights = torch.tensor(class_counts, dtype=torch.float64)
    return torch.multinomial(weights, num_images, replacement=True, generator=torch.Generator().manual_seed(seed))


def class_metrics(real: RealStats, fake: torch.Tensor, fake_logits: torch.Tensor | None, labels: torch.Tensor,
                  classifier: bool) -> dict[str, float]:
    """A conditional generator's extra scores: intra-FID (FID within a class) for the classes ``real`` has
    statistics of, their mean, and (with the dataset's own classifier as extractor) the share of fakes it
    classifies as the class they were drawn for."""
    labels = labels.to(fake.device)
    metrics = {}
    for c, (mu, sigma) in real.per_class.items():
        mine = fake[labels == c]
        if mine.shape[0] > 1:
            fake_mu, fake_sigma = feature_statistics(mine)
            metrics[f"intra_fid/{c}"] = frechet_distance(fake_mu, fake_sigma, mu.to(fake.device), sigma.to(fake.device))
    if metrics:
        metrics["intra_fid_mean"] = sum(metrics.values()) / len(metrics)
    if classifier and fake_logits is not None:
        metrics["class_accuracy"] = float((fake_logits.argmax(1) == labels).double().mean())
    return metrics


def _mode_namer(extractor: FeatureExtractor, mode_classifier: ClassifierExtractor | None,
                mode_counts: list[int] | None) -> ClassifierExtractor | None:
    """The classifier that names each fake's mode: ``mode_classifier``, else the extractor when it classifies
    the data's classes; None for an unlabelled dataset."""
    if not mode_counts:
        return None
    if mode_classifier is not None:
        if mode_classifier.num_classes != len(mode_counts):
            raise ValueError(f"eval.mode_classifier tells {mode_classifier.num_classes} classes, the dataset has "
                             f"{len(mode_counts)}: train it on this dataset (docs/evaluation.md)")
        return mode_classifier
    if isinstance(extractor, ClassifierExtractor):
        if extractor.num_classes == len(mode_counts):
            return extractor
        log.warning("no mode metrics: the classifier extractor tells %d classes, the dataset has %d",
                    extractor.num_classes, len(mode_counts))
    return None


def _predict_modes(batches: Iterable[torch.Tensor], classifier: ClassifierExtractor, out: list[torch.Tensor]
                   ) -> Iterator[torch.Tensor]:
    """``batches`` passed on unchanged; each one's predicted classes are appended to ``out`` on the way."""
    for batch in batches:
        out.append(classifier(batch)[1].argmax(1))
        yield batch


def compute_metrics(real: RealStats, fake: torch.Tensor, fake_logits: torch.Tensor | None, seed: int = 0
                    ) -> dict[str, float]:
    """FID, KID (mean/std), precision/recall and, with logits, IS (mean/std) of fakes against ``real``.

    Computed on the fakes' device: on a GPU the O(n²·d) kernel and distance matrices are the cheap part.
    """
    mu, sigma = feature_statistics(fake)
    real_features = real.features.to(fake.device)
    fid = frechet_distance(mu, sigma, real.mu.to(fake.device), real.sigma.to(fake.device))
    kid_mean, kid_std = kernel_inception_distance(real_features, fake, KID_SUBSETS, KID_SUBSET_SIZE, seed)
    metrics = {"fid": fid, "kid_mean": kid_mean, "kid_std": kid_std}
    n_pr = min(PR_MAX_SAMPLES, real_features.shape[0], fake.shape[0])
    if n_pr > PR_K:  # the k-NN manifolds need more than k points
        metrics["precision"], metrics["recall"] = precision_recall(real_features[:n_pr], fake[:n_pr], PR_K)
    if fake_logits is not None:
        metrics["is_mean"], metrics["is_std"] = inception_score(fake_logits, min(IS_SPLITS, fake_logits.shape[0]))
    return metrics


def evaluate_generator_distributed(
    g_ema: torch.nn.Module,
    z_dim: int,
    extractor: FeatureExtractor,
    real_stats: RealStats | None,
    num_images: int,
    batch_size: int,
    rank: int,
    world: int,
    device: torch.device | str,
    seed: int,
    progress: bool = False,
    class_counts: list[int] | None = None,
    mode_counts: list[int] | None = None,
    mode_classifier: ClassifierExtractor | None = None,
) -> dict[str, float] | None:
    """Metrics of ``num_images`` fakes on rank 0 (None elsewhere); every rank must call it. A conditional
    generator gets ``class_counts`` (the dataset's, from its manifest): fakes are drawn for classes
    distributed as those, and the class metrics join the rest. ``mode_counts`` (a labelled dataset's class
    counts, for any generator) add ``modes`` and ``mode_kl`` (:mod:`gan_dist.metrics.modes`), the modes named
    by ``mode_classifier``, else by the extractor when it is a classifier of those classes.

    All ranks draw the same z matrix (and labels) and each takes a contiguous slice, so the fakes, and hence
    the metrics, do not depend on the number of workers.
    """
    if num_images < world:
        raise ValueError(f"need at least one image per rank: num_images={num_images} < world={world}")
    z = torch.randn(num_images, z_dim, generator=torch.Generator().manual_seed(seed))
    labels = fake_labels(class_counts, num_images, seed) if class_counts else None
    share = slice(num_images * rank // world, num_images * (rank + 1) // world)
    namer, modes = _mode_namer(extractor, mode_classifier, mode_counts), []
    bar = tqdm(total=share.stop - share.start, desc="fake features", unit="img", disable=not progress)
    with bar:
        batches = _fake_batches(g_ema, z[share], labels[share] if labels is not None else None, batch_size, device)
        if namer is not None and namer is not extractor:
            batches = _predict_modes(batches, namer, modes)
        features, logits = extract_features(extractor, batches, device, bar)
    if namer is extractor and logits is not None:  # None: this rank's share was empty
        modes = [logits.argmax(1)]
    features = gather_to_rank0(features)
    logits = gather_to_rank0(logits) if logits is not None else None
    own = torch.cat(modes) if modes else torch.empty(0, dtype=torch.long, device=device)
    predicted = gather_to_rank0(own) if namer is not None else None
    if features is None:
        return None
    if real_stats is None:
        raise ValueError("rank 0 needs real_stats (from real_statistics)")
    metrics = compute_metrics(real_stats, features, logits, seed)
    if labels is not None:
        metrics.update(class_metrics(real_stats, features, logits, labels, isinstance(extractor, ClassifierExtractor)))
    if predicted is not None:
        metrics.update(mode_metrics(predicted, mode_counts))
    return metrics

"""``gan-dist evaluate``: FID / KID / IS / precision-recall (and, on a labelled dataset with a classifier, mode
coverage) of a saved generator against a dataset."""

from __future__ import annotations

from pathlib import Path

import torch

from gan_dist.config import EvalConfig
from gan_dist.data.shards import list_shards
from gan_dist.data.subset import dataset_manifest
from gan_dist.metrics.runner import (
    build_extractor,
    build_mode_classifier,
    default_cache_dir,
    evaluate_generator_distributed,
    real_statistics,
)
from gan_dist.models.io import load_generator
from gan_dist.storage import StorageConfig


def evaluate(
    source: str,
    data_url: str,
    cfg: EvalConfig,
    storage: StorageConfig,
    num_images: int,
    device: torch.device | str = "cpu",
    cache_dir: str | Path | None = None,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, float]:
    """Score a checkpoint directory or exported generator file against the dataset at ``data_url``
    (``progress``: tqdm bars, for a terminal)."""
    g, meta = load_generator(source, map_location=device)
    g.to(device)
    extractor = build_extractor(cfg, device)
    _, manifest = dataset_manifest(list_shards(data_url, storage), storage)
    real = real_statistics(data_url, storage, extractor, meta["resolution"], meta["channels"], num_images,
                           cache_dir or default_cache_dir(), cfg.batch_size, device=device, progress=progress)
    metrics = evaluate_generator_distributed(g, meta["model"]["z_dim"], extractor, real, num_images,
                                             cfg.batch_size, 0, 1, device, seed, progress=progress,
                                             mode_counts=manifest.class_counts if manifest else None,
                                             mode_classifier=build_mode_classifier(cfg, device))
    assert metrics is not None  # a single process is rank 0
    return metrics

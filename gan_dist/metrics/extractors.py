"""What a feature extractor is, and the helpers every extractor uses to load its weights safely.

An extractor takes float images in [-1, 1] (NCHW, any resolution, 1 or 3 channels) and returns
``(features [N, dim], logits [N, classes] or None)``. Weights are read only with
``torch.load(weights_only=True)``: a weights file can never run code.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Protocol

import torch


class FeatureExtractor(Protocol):
    name: str  # identifies network + weights: part of the real-statistics cache key
    dim: int

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]: ...


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def load_weights(path: str | Path, what: str) -> object:
    """``torch.load(weights_only=True)`` of a local file, with errors that say what to do."""
    if "://" in str(path):  # checked before Path(), which would fold "s3://" into "s3:/"
        raise ValueError(f"{what} must be a local file path; download it first (see docs/evaluation.md): {path}")
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path} (see docs/evaluation.md)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # the unpickler names the offending global; keep its text
        raise ValueError(f"refusing to load {what} {path}: not a plain tensor file ({exc})") from None


def to_rgb(images: torch.Tensor) -> torch.Tensor:
    if images.shape[1] == 1:
        return images.expand(-1, 3, -1, -1)
    if images.shape[1] != 3:
        raise ValueError(f"expected 1 or 3 channels, got {images.shape[1]}")
    return images

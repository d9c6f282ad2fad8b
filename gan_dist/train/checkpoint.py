"""Training state <-> checkpoint directory.

A checkpoint directory holds ``state.pt`` (tensors and plain Python values only, so it loads with
``torch.load(weights_only=True)``: no pickled code ever runs) and ``config.yaml`` (the effective config,
readable without torch).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import yaml

FORMAT_VERSION = 1
STATE_FILE = "state.pt"
CONFIG_FILE = "config.yaml"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unsafe or of an unknown format."""


def save_checkpoint(directory: str | Path, state: dict[str, Any]) -> Path:
    """Write ``state`` (must contain "config": a JSON-able dict) into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.save({**state, "format_version": FORMAT_VERSION}, directory / STATE_FILE)
    (directory / CONFIG_FILE).write_text(yaml.safe_dump(state["config"], sort_keys=False))
    return directory


def load_checkpoint(directory: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint`; refuses anything that is not plain data."""
    path = Path(directory) / STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"no {STATE_FILE} in checkpoint {directory}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # the unpickler's error names the offending global; keep that text
        raise CheckpointError(f"refusing to load {path}: not a plain-data checkpoint ({exc})") from None
    version = state.get("format_version") if isinstance(state, dict) else None
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format {version!r}; this gan_dist reads format {FORMAT_VERSION}"
        )
    return state

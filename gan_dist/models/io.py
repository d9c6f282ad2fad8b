"""Trained generators on disk: reading checkpoint state safely, exporting the EMA generator, loading it back.

Serving code (``sample``, ``evaluate``, the MLflow model) loads generators through this module and never
imports the trainer. Every file is read with ``torch.load(weights_only=True)``: plain tensors and Python
values only, so no pickled code can run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from gan_dist.models import build_generator, model_config

FORMAT_VERSION = 1
STATE_FILE = "state.pt"
GENERATOR_FORMAT = "gan_dist.generator"
_META_KEYS = ("model", "resolution", "channels", "step", "run_name", "class_names")


class CheckpointError(RuntimeError):
    """A checkpoint or generator file that is missing, unsafe or of an unknown format."""


def read_state(directory: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The ``state.pt`` of a checkpoint directory; refuses anything that is not plain data of our format."""
    path = Path(directory) / STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"no {STATE_FILE} in checkpoint {directory}")
    state = _load_plain(path, "checkpoint", map_location)
    version = state.get("format_version") if isinstance(state, dict) else None
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{path} has checkpoint format {version!r}; this gan_dist reads format {FORMAT_VERSION}")
    return state


def _load_plain(path: Path, what: str, map_location: str | torch.device) -> Any:
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # the unpickler's error names the offending global; keep that text
        raise CheckpointError(f"refusing to load {path}: not a plain-data {what} file ({exc})") from None


def _generator_meta(state: dict[str, Any]) -> dict[str, Any]:
    cfg = state["config"]
    return {
        "model": cfg["model"],
        "resolution": cfg["data"]["resolution"],
        "channels": cfg["data"]["channels"],
        "step": state["step"],
        "run_name": cfg["run"]["name"],
        "class_names": state.get("class_names") or [],  # a conditional generator's classes, by index
    }


def export_generator(checkpoint_dir: str | Path, out_file: str | Path) -> Path:
    """Write the EMA generator alone (weights + what is needed to rebuild it): small enough to serve."""
    state = read_state(checkpoint_dir)
    artifact = {"format": GENERATOR_FORMAT, "format_version": FORMAT_VERSION, **_generator_meta(state),
                "g_ema": state["g_ema"]}
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    torch.save(artifact, out_file)
    return out_file


def load_generator(source: str | Path, map_location: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict]:
    """The EMA generator (eval mode) from an exported file or a checkpoint directory, plus its metadata."""
    source = Path(source)
    if source.is_dir():
        state = read_state(source, map_location)
        meta, weights = _generator_meta(state), state["g_ema"]
    elif source.is_file():
        artifact = _load_plain(source, "generator", map_location)
        if not isinstance(artifact, dict) or artifact.get("format") != GENERATOR_FORMAT:
            raise CheckpointError(f"{source} is not a gan_dist generator export")
        meta, weights = {k: artifact.get(k) for k in _META_KEYS}, artifact["g_ema"]
        meta["class_names"] = meta["class_names"] or []  # exports from before conditioning existed
    else:
        raise CheckpointError(f"{source}: no such checkpoint directory or generator file")
    g = build_generator(model_config(meta["model"]), meta["resolution"], meta["channels"])
    g.load_state_dict(weights)
    return g.eval().requires_grad_(False), meta


def generate(
    g: torch.nn.Module, z: torch.Tensor, truncation_psi: float = 1.0, labels: torch.Tensor | None = None
) -> torch.Tensor:
    """Images (float, about [-1, 1]) of a loaded generator for latents ``z`` (and class ``labels`` [N] for a
    conditional one): a style-based G with constant noise (the same z gives the same image) and truncation
    ``truncation_psi`` (1.0: none)."""
    if hasattr(g, "mapping"):
        return g(z, labels, truncation_psi=truncation_psi, noise_mode="const")
    if truncation_psi != 1.0:
        raise ValueError("truncation needs a style-based generator (model.arch=stylegan2)")
    return g(z, labels) if labels is not None else g(z)

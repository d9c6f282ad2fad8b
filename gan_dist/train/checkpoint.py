"""Training state <-> checkpoint directory.

A checkpoint directory holds ``state.pt`` (tensors and plain Python values only, so it loads with
``torch.load(weights_only=True)``: no pickled code ever runs) and ``config.yaml`` (the effective config,
readable without torch).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from gan_dist.train.step import GanModules, bare

FORMAT_VERSION = 1
STATE_FILE = "state.pt"
CONFIG_FILE = "config.yaml"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unsafe or of an unknown format."""


def capture_rng(noise: torch.Generator) -> dict[str, Any]:
    """Every random stream a rank draws from, as plain data (numpy's state becomes a tensor)."""
    np_state = np.random.get_state()
    return {
        "noise": noise.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
    }


def restore_rng(state: dict[str, Any], noise: torch.Generator) -> None:
    noise.set_state(state["noise"].cpu())
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    random.setstate(_as_tuples(state["python"]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))


def _as_tuples(value: Any) -> Any:
    """random.setstate wants tuples; a save/load round trip may hand back lists."""
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def training_state(m: GanModules, **extra: Any) -> dict[str, Any]:
    """Model, EMA, optimizer and scaler state plus ``extra`` (step, rng, data position, config, ...)."""
    return {
        "g": bare(m.g).state_dict(),
        "d": bare(m.d).state_dict(),
        "g_ema": m.g_ema.state_dict(),
        "opt_g": m.opt_g.state_dict(),
        "opt_d": m.opt_d.state_dict(),
        "scaler_g": m.scaler_g.state_dict(),
        "scaler_d": m.scaler_d.state_dict(),
        **extra,
    }


def restore_modules(m: GanModules, state: dict[str, Any]) -> None:
    bare(m.g).load_state_dict(state["g"])
    bare(m.d).load_state_dict(state["d"])
    m.g_ema.load_state_dict(state["g_ema"])
    m.opt_g.load_state_dict(state["opt_g"])
    m.opt_d.load_state_dict(state["opt_d"])
    m.scaler_g.load_state_dict(state["scaler_g"])
    m.scaler_d.load_state_dict(state["scaler_d"])


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


GENERATOR_FORMAT = "gan_dist.generator"


def export_generator(checkpoint_dir: str | Path, out_file: str | Path) -> Path:
    """Write the EMA generator alone (weights + what is needed to rebuild it): small enough to serve."""
    state = load_checkpoint(checkpoint_dir)
    cfg = state["config"]
    artifact = {
        "format": GENERATOR_FORMAT,
        "format_version": FORMAT_VERSION,
        "model": cfg["model"],
        "resolution": cfg["data"]["resolution"],
        "channels": cfg["data"]["channels"],
        "step": state["step"],
        "run_name": cfg["run"]["name"],
        "g_ema": state["g_ema"],
    }
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    torch.save(artifact, out_file)
    return out_file


def load_generator(source: str | Path, map_location: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict]:
    """The EMA generator (eval mode) from an exported file or a checkpoint directory, plus its metadata."""
    from gan_dist.config import ModelConfig
    from gan_dist.models import build_generator

    source = Path(source)
    if source.is_dir():
        state = load_checkpoint(source, map_location)
        meta = {
            "model": state["config"]["model"],
            "resolution": state["config"]["data"]["resolution"],
            "channels": state["config"]["data"]["channels"],
            "step": state["step"],
            "run_name": state["config"]["run"]["name"],
        }
        weights = state["g_ema"]
    else:
        try:
            artifact = torch.load(source, map_location=map_location, weights_only=True)
        except Exception as exc:
            raise CheckpointError(f"refusing to load {source}: not a plain-data generator file ({exc})") from None
        if not isinstance(artifact, dict) or artifact.get("format") != GENERATOR_FORMAT:
            raise CheckpointError(f"{source} is not a gan_dist generator export")
        meta = {k: artifact[k] for k in ("model", "resolution", "channels", "step", "run_name")}
        weights = artifact["g_ema"]
    g = build_generator(ModelConfig.model_validate(meta["model"]), meta["resolution"], meta["channels"])
    g.load_state_dict(weights)
    return g.eval().requires_grad_(False), meta

"""Training state <-> checkpoint directory.

A checkpoint directory holds ``state.pt`` (tensors and plain Python values only, so it loads with
``torch.load(weights_only=True)``: no pickled code ever runs) and ``config.yaml`` (the effective config,
readable without torch).
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from gan_dist.models.io import FORMAT_VERSION, STATE_FILE
from gan_dist.train.step import GanModules, bare

CONFIG_FILE = "config.yaml"

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


def seed_rank_streams(
    noise: torch.Generator, seed: int, rank: int, world: int, step: int, saved: list[dict[str, Any]] | None
) -> None:
    """Set every random stream of ``rank`` (``noise`` and torch's, CUDA's, Python's and numpy's global ones)
    for a run at ``step`` of a ``world``-rank group: each rank its own streams, so no two ranks draw the same
    noise inputs, style mixing or augmentations. A checkpoint's ``saved`` streams (one per rank) come back
    exactly at the same world size; a fresh run, or another world size (elastic), derives new ones."""
    # Checkpoints written before ranks had streams of their own hold one global stream for all: derive new ones.
    shared = len(saved or []) > 1 and all(torch.equal(s["torch"], saved[0]["torch"]) for s in saved)
    if saved is not None and len(saved) == world and not shared:
        restore_rng(saved[rank], noise)
    else:
        reseed(noise, seed, rank, step)


def reseed(noise: torch.Generator, seed: int, rank: int, step: int) -> None:
    """New random streams for ``rank`` from ``step`` on, derived from the seed, the rank and the step: the
    same on every restart from that step, different on every rank."""
    base = int.from_bytes(hashlib.sha256(f"{seed}/{rank}/{step}".encode()).digest()[:7], "little")
    noise.manual_seed(base)
    torch.manual_seed(base + 1)
    random.seed(base + 2)
    np.random.seed((base + 3) % 2**32)


def _as_tuples(value: Any) -> Any:
    """random.setstate wants tuples; a save/load round trip may hand back lists."""
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def training_state(m: GanModules, **extra: Any) -> dict[str, Any]:
    """Model, EMA, optimizer, schedule, scaler and augmentation state plus ``extra`` (step, rng, data position,
    config, ...)."""
    state = {
        "g": bare(m.g).state_dict(),
        "d": bare(m.d).state_dict(),
        "g_ema": m.g_ema.state_dict(),
        "opt_g": m.opt_g.state_dict(),
        "opt_d": m.opt_d.state_dict(),
        "sched_g": m.sched_g.state_dict(),
        "sched_d": m.sched_d.state_dict(),
        "scaler_g": m.scaler_g.state_dict(),
        "scaler_d": m.scaler_d.state_dict(),
        **extra,
    }
    if m.augment is not None:
        state["augment"] = m.augment.state_dict()  # ADA's p lives in the pipe
    if m.ada is not None:
        state["ada"] = m.ada.state_dict()
    if m.pl_mean is not None:
        state["pl_mean"] = m.pl_mean
    return state


def restore_weights(m: GanModules, state: dict[str, Any]) -> None:
    """G, D and EMA-G only (with their buffers: the mean style, BatchNorm statistics): a fine-tune's start."""
    bare(m.g).load_state_dict(state["g"])
    bare(m.d).load_state_dict(state["d"])
    m.g_ema.load_state_dict(state["g_ema"])


def restore_modules(m: GanModules, state: dict[str, Any]) -> None:
    """Everything :func:`training_state` saved, exactly. Parts a checkpoint does not hold (it predates
    schedules, or its run had no augmentation or path-length penalty) keep their fresh state."""
    restore_weights(m, state)
    m.opt_g.load_state_dict(state["opt_g"])
    m.opt_d.load_state_dict(state["opt_d"])
    m.scaler_g.load_state_dict(state["scaler_g"])
    m.scaler_d.load_state_dict(state["scaler_d"])
    for key, part in (("sched_g", m.sched_g), ("sched_d", m.sched_d), ("augment", m.augment), ("ada", m.ada)):
        if part is not None and key in state:
            part.load_state_dict(state[key])
    if m.pl_mean is not None and "pl_mean" in state:
        m.pl_mean.copy_(state["pl_mean"])


def save_checkpoint(directory: str | Path, state: dict[str, Any]) -> Path:
    """Write ``state`` (must contain "config": a JSON-able dict) into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.save({**state, "format_version": FORMAT_VERSION}, directory / STATE_FILE)
    (directory / CONFIG_FILE).write_text(yaml.safe_dump(state["config"], sort_keys=False))
    return directory


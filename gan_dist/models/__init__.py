"""The architecture registry: one entry per ``model.arch``, the single list the config validates against.

An entry holds the architecture's config section (its ``model.*`` keys) and builders for G and D. G maps
z [N, z_dim] to images [N, C, R, R] (about [-1, 1]); D maps images to raw logits [N].
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

from torch import nn

from gan_dist.models import dcgan, mlp, resnet
from gan_dist.models.base import ModelSection

_Builder = Callable[[ModelSection, int, int], nn.Module]  # (model config, resolution, channels) -> net


@dataclass(frozen=True)
class Architecture:
    config: type[ModelSection]
    generator: _Builder
    discriminator: _Builder


def _classic(module: ModuleType) -> Architecture:
    """mlp, dcgan and resnet take the same constructor arguments."""
    return Architecture(
        config=module.Config,
        generator=lambda cfg, res, ch: module.Generator(cfg.z_dim, cfg.g_width, res, ch, cfg.g_batchnorm),
        discriminator=lambda cfg, res, ch: module.Discriminator(cfg.d_width, res, ch, cfg.d_norm, cfg.d_spectral_norm),
    )


ARCHITECTURES: dict[str, Architecture] = {"mlp": _classic(mlp), "dcgan": _classic(dcgan), "resnet": _classic(resnet)}


def _lookup(arch: str) -> Architecture:
    try:
        return ARCHITECTURES[arch]
    except KeyError:
        raise ValueError(f"unknown model arch '{arch}'; choose one of {sorted(ARCHITECTURES)}") from None


def model_config(tree: dict) -> ModelSection:
    """Validate a ``model`` section (a dict with ``arch``, default dcgan) against its architecture's keys."""
    return _lookup(tree.get("arch", "dcgan")).config.model_validate(tree)


def build_generator(cfg: ModelSection, resolution: int, channels: int) -> nn.Module:
    """G for ``cfg.arch``: z [N, cfg.z_dim] -> images [N, channels, resolution, resolution]."""
    return _lookup(cfg.arch).generator(cfg, resolution, channels)


def build_discriminator(cfg: ModelSection, resolution: int, channels: int) -> nn.Module:
    """D for ``cfg.arch``: images [N, channels, resolution, resolution] -> raw logits [N]."""
    return _lookup(cfg.arch).discriminator(cfg, resolution, channels)


__all__ = ["ARCHITECTURES", "Architecture", "ModelSection", "build_discriminator", "build_generator", "model_config"]

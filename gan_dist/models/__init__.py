"""Generator / discriminator registry.

Every architecture module exposes ``Generator(z_dim, width, resolution, channels, batchnorm)``
and ``Discriminator(width, resolution, channels, norm, spectral_norm)``; G maps z [N, z_dim] to
images [N, C, R, R] in [-1, 1], D maps images to raw logits [N].
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from torch import nn

from gan_dist.models import dcgan, mlp, resnet

if TYPE_CHECKING:
    from gan_dist.config import ModelConfig

_Builder = Callable[..., nn.Module]

ARCHITECTURES: dict[str, tuple[_Builder, _Builder]] = {
    "mlp": (mlp.Generator, mlp.Discriminator),
    "dcgan": (dcgan.Generator, dcgan.Discriminator),
    "resnet": (resnet.Generator, resnet.Discriminator),
}


def _lookup(arch: str) -> tuple[_Builder, _Builder]:
    try:
        return ARCHITECTURES[arch]
    except KeyError:
        raise ValueError(f"unknown model arch '{arch}'; choose one of {sorted(ARCHITECTURES)}") from None


def build_generator(cfg: ModelConfig, resolution: int, channels: int) -> nn.Module:
    """G for ``cfg.arch``: z [N, cfg.z_dim] -> images [N, channels, resolution, resolution] in [-1, 1]."""
    generator_cls, _ = _lookup(cfg.arch)
    return generator_cls(
        z_dim=cfg.z_dim, width=cfg.g_width, resolution=resolution, channels=channels, batchnorm=cfg.g_batchnorm
    )


def build_discriminator(cfg: ModelConfig, resolution: int, channels: int) -> nn.Module:
    """D for ``cfg.arch``: images [N, channels, resolution, resolution] -> raw logits [N]."""
    _, discriminator_cls = _lookup(cfg.arch)
    return discriminator_cls(
        width=cfg.d_width,
        resolution=resolution,
        channels=channels,
        norm=cfg.d_norm,
        spectral_norm=cfg.d_spectral_norm,
    )


__all__ = ["ARCHITECTURES", "build_discriminator", "build_generator"]

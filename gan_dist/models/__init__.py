"""The architecture registry: one entry per ``model.arch``, the single list the config validates against.

An entry holds the architecture's config section (its ``model.*`` keys) and builders for G and D. G maps
z [N, z_dim] to images [N, C, R, R] (about [-1, 1]); D maps images to raw logits [N].
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

from torch import nn

from gan_dist.models import dcgan, mlp, r3gan, resnet, stylegan2, stylegan2_d
from gan_dist.models.base import ModelSection

_Builder = Callable[..., nn.Module]  # (model config, resolution, channels[, classify]) -> net


@dataclass(frozen=True)
class Architecture:
    config: type[ModelSection]
    generator: _Builder
    discriminator: _Builder  # takes ``classify``: add the AC-GAN class head
    auxiliary_classifier: bool = True  # whether its D can carry that head


def _classic(module: ModuleType) -> Architecture:
    """mlp, dcgan and resnet take the same constructor arguments."""

    def generator(cfg: ModelSection, res: int, ch: int) -> nn.Module:
        return module.Generator(cfg.z_dim, cfg.g_width, res, ch, cfg.g_batchnorm, cfg.classes())

    def discriminator(cfg: ModelSection, res: int, ch: int, classify: bool = False) -> nn.Module:
        return module.Discriminator(cfg.d_width, res, ch, cfg.d_norm, cfg.d_spectral_norm, cfg.classes(), classify)

    return Architecture(module.Config, generator, discriminator)


def _stylegan2() -> Architecture:
    shared = ("channel_base", "channel_max", "bf16_resolutions", "conv_clamp")

    def generator(cfg: stylegan2.Config, res: int, ch: int) -> nn.Module:
        options = {k: getattr(cfg, k) for k in (*shared, "z_dim", "w_dim", "mapping_layers")}
        return stylegan2.Generator(resolution=res, channels=ch, num_classes=cfg.classes(), **options)

    def discriminator(cfg: stylegan2.Config, res: int, ch: int, classify: bool = False) -> nn.Module:
        if classify:
            raise ValueError("the stylegan2 D has no auxiliary classifier head")
        options = {k: getattr(cfg, k) for k in (*shared, "mbstd_group_size", "mapping_layers")}
        return stylegan2_d.Discriminator(resolution=res, channels=ch, num_classes=cfg.classes(), **options)

    return Architecture(stylegan2.Config, generator, discriminator, auxiliary_classifier=False)


ARCHITECTURES: dict[str, Architecture] = {
    "mlp": _classic(mlp),
    "dcgan": _classic(dcgan),
    "resnet": _classic(resnet),
    "stylegan2": _stylegan2(),
    "r3gan": Architecture(r3gan.Config, r3gan.generator, r3gan.discriminator, auxiliary_classifier=False),
}


def _lookup(arch: str) -> Architecture:
    try:
        return ARCHITECTURES[arch]
    except KeyError:
        raise ValueError(f"unknown model arch '{arch}'; choose one of {sorted(ARCHITECTURES)}") from None


def model_config(tree: dict) -> ModelSection:
    """Validate a ``model`` section (a dict with ``arch``, default dcgan) against its architecture's keys."""
    return _lookup(tree.get("arch", "dcgan")).config.model_validate(tree)


def build_generator(cfg: ModelSection, resolution: int, channels: int) -> nn.Module:
    """G for ``cfg.arch``: z [N, cfg.z_dim] (+ labels [N] when conditional) -> images [N, channels, R, R]."""
    return _lookup(cfg.arch).generator(cfg, resolution, channels)


def build_discriminator(cfg: ModelSection, resolution: int, channels: int, classify: bool = False) -> nn.Module:
    """D for ``cfg.arch``: images [N, channels, resolution, resolution] (+ labels [N] when conditional) -> raw
    logits [N]; with ``classify`` also AC-GAN class logits [N, classes]."""
    return _lookup(cfg.arch).discriminator(cfg, resolution, channels, classify)


__all__ = ["ARCHITECTURES", "Architecture", "ModelSection", "build_discriminator", "build_generator", "model_config"]

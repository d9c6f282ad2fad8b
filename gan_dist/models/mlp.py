"""Fully-connected G and D of the classic GAN tutorials (Goodfellow et al. 2014 style).

With base width ``w`` the hidden sizes are 4w, 8w, 16w in G (256, 512, 1024 at w=64) and the
mirror image in D. Works for any square resolution, but parameters grow with R^2.
"""

from __future__ import annotations

from itertools import pairwise
from typing import Literal

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm as _spectral_norm

from gan_dist.models.base import ClassicConfig
from gan_dist.models.conditioning import CLASS_EMBEDDING, ClassEmbedding, ConditionalCritic, require_labels

_MULTIPLIERS = (4, 8, 16)


class Config(ClassicConfig):
    arch: Literal["mlp"] = "mlp"


class Generator(nn.Module):
    """z [N, z_dim] (+ labels [N] when conditional: a class vector joins z) -> images [N, C, R, R] in [-1, 1]."""

    def __init__(
        self, z_dim: int, width: int, resolution: int, channels: int, batchnorm: bool = True, num_classes: int = 0
    ) -> None:
        super().__init__()
        self.out_shape = (channels, resolution, resolution)
        self.embed = ClassEmbedding(num_classes) if num_classes else None
        sizes = [z_dim + (CLASS_EMBEDDING if num_classes else 0)] + [width * m for m in _MULTIPLIERS]
        layers: list[nn.Module] = []
        for i, (fan_in, fan_out) in enumerate(pairwise(sizes)):
            # No BN right after z: normalising the noise itself only removes its scale.
            use_bn = batchnorm and i > 0
            layers.append(nn.Linear(fan_in, fan_out, bias=not use_bn))
            if use_bn:
                layers.append(nn.BatchNorm1d(fan_out))
            layers.append(nn.LeakyReLU(0.2))
        layers += [nn.Linear(sizes[-1], channels * resolution * resolution), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if self.embed is not None:
            z = self.embed(z, require_labels(labels, z.shape[0]))
        return self.net(z).view(z.shape[0], *self.out_shape)


class Discriminator(nn.Module):
    """images [N, C, R, R] (+ labels [N] when conditional: a class vector joins the pixels) -> raw logits [N]
    (and class logits from the last hidden layer with the AC-GAN head)."""

    def __init__(
        self,
        width: int,
        resolution: int,
        channels: int,
        norm: str = "none",
        spectral_norm: bool = False,
        num_classes: int = 0,
        classify: bool = False,
    ) -> None:
        super().__init__()

        def linear(fan_in: int, fan_out: int, bias: bool = True) -> nn.Module:
            layer = nn.Linear(fan_in, fan_out, bias=bias)
            return _spectral_norm(layer) if spectral_norm else layer

        self.embed = ClassEmbedding(num_classes) if num_classes else None
        pixels = channels * resolution * resolution + (CLASS_EMBEDDING if num_classes else 0)
        sizes = [pixels] + [width * m for m in reversed(_MULTIPLIERS)]
        layers: list[nn.Module] = [nn.Flatten()]
        for i, (fan_in, fan_out) in enumerate(pairwise(sizes)):
            use_bn = norm == "batch" and i > 0  # no BN on the layer that sees the images
            layers.append(linear(fan_in, fan_out, bias=not use_bn))
            if use_bn:
                layers.append(nn.BatchNorm1d(fan_out))
            layers.append(nn.LeakyReLU(0.2))
        layers.append(linear(sizes[-1], 1))
        self.net = nn.Sequential(*layers)
        self.critic = ConditionalCritic(sizes[-1], num_classes, False, classify, spectral_norm)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        h = self.net[0](x)  # flattened pixels
        if self.embed is not None:
            h = self.embed(h, require_labels(labels, x.shape[0]))
        features = self.net[1:-1](h)
        return self.critic(self.net[-1](features).squeeze(1), features, labels)


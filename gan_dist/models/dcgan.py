"""DCGAN (Radford et al. 2016) for square power-of-two resolutions 32..256.

Channel plan, shared by G and D: a feature map of side ``r`` in a net for resolution ``R`` has
``width * min(R / (2r), 8)`` channels, so the 4x4 end is the widest (capped at 8·width) and the
R/2 stage next to the image has ``width`` channels. At R=64 this is the paper's 512-256-128-64.
"""

from __future__ import annotations

from itertools import pairwise
from typing import ClassVar, Literal

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm as _spectral_norm

from gan_dist.models.base import ClassicConfig, resolution_steps
from gan_dist.models.conditioning import ConditionalCritic, Conditioned, batch_norm, require_labels

MAX_MULTIPLIER = 8


class Config(ClassicConfig):
    arch: Literal["dcgan"] = "dcgan"
    class_through_batchnorm: ClassVar[bool] = True
    d_norm: Literal["batch", "none"] = "batch"

    def check_resolution(self, resolution: int) -> None:
        resolution_steps(resolution)


def stage_channels(width: int, resolution: int) -> list[int]:
    """Channels at sides 4, 8, ..., R/2 (G's order; D walks it backwards)."""
    steps = resolution_steps(resolution)
    return [width * min(2 ** (steps - 1 - i), MAX_MULTIPLIER) for i in range(steps)]


def init_weights(module: nn.Module) -> None:
    """The paper's init: conv weights N(0, 0.02), BN scale N(1, 0.02), biases 0."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm2d) and module.affine:
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


class Generator(nn.Module):
    """z [N, z_dim] (+ labels [N] when conditional: conditional BatchNorm) -> images [N, C, R, R] in [-1, 1]."""

    def __init__(
        self, z_dim: int, width: int, resolution: int, channels: int, batchnorm: bool = True, num_classes: int = 0
    ) -> None:
        super().__init__()
        if num_classes and not batchnorm:
            raise ValueError("a conditional dcgan G takes the class through its BatchNorm layers: batchnorm=True")
        chans = stage_channels(width, resolution)
        self.num_classes = num_classes

        def block(conv: nn.Module, out: int) -> list[nn.Module]:
            return [conv, batch_norm(out, num_classes), nn.ReLU()] if batchnorm else [conv, nn.ReLU()]

        # The projection is a 4x4 transposed conv on z seen as a 1x1 map (same as a linear layer).
        layers = block(nn.ConvTranspose2d(z_dim, chans[0], 4, 1, 0, bias=not batchnorm), chans[0])
        for c_in, c_out in pairwise(chans):
            layers += block(nn.ConvTranspose2d(c_in, c_out, 4, 2, 1, bias=not batchnorm), c_out)
        layers += [nn.ConvTranspose2d(chans[-1], channels, 4, 2, 1), nn.Tanh()]
        self.net = Conditioned(*layers)
        self.apply(init_weights)

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if self.num_classes:
            require_labels(labels, z.shape[0])
        return self.net(z.view(*z.shape, 1, 1), labels)


class Discriminator(nn.Module):
    """images [N, C, R, R] (+ labels [N] when conditional: projection) -> raw logits [N] (and class logits
    with the AC-GAN head). The projection and the head read the last 4x4 feature map, flattened: the final
    4x4 convolution is a linear map of exactly that."""

    def __init__(
        self,
        width: int,
        resolution: int,
        channels: int,
        norm: str = "batch",
        spectral_norm: bool = False,
        num_classes: int = 0,
        classify: bool = False,
    ) -> None:
        super().__init__()
        chans = stage_channels(width, resolution)[::-1]
        use_bn = norm == "batch"
        layers: list[nn.Module] = [nn.Conv2d(channels, chans[0], 4, 2, 1), nn.LeakyReLU(0.2)]
        for c_in, c_out in pairwise(chans):
            layers.append(nn.Conv2d(c_in, c_out, 4, 2, 1, bias=not use_bn))
            if use_bn:
                layers.append(nn.BatchNorm2d(c_out))
            layers.append(nn.LeakyReLU(0.2))
        layers.append(nn.Conv2d(chans[-1], 1, 4, 1, 0))
        self.net = nn.Sequential(*layers)
        self.apply(init_weights)
        if spectral_norm:
            for i, layer in enumerate(self.net):
                if isinstance(layer, nn.Conv2d):
                    self.net[i] = _spectral_norm(layer)
        self.critic = ConditionalCritic(chans[-1] * 16, num_classes, True, classify, spectral_norm)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        features = self.net[:-1](x)
        return self.critic(self.net[-1](features).view(x.shape[0]), features.flatten(1), labels)


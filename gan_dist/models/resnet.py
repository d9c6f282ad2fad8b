"""SNGAN-style residual G and D (Miyato et al. 2018) for square power-of-two resolutions 32..256.

Channel plan: G's feature map of side ``r`` has ``width * min(R / r, 8)`` channels (the last up
block outputs ``width``); D's has ``width * min(R / (2r), 8)`` (the first block outputs ``width``).
Residual 3x3 convs use Xavier-uniform init with gain sqrt(2) (they feed ReLUs), the rest gain 1.
"""

from __future__ import annotations

import math
from itertools import pairwise
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm as _spectral_norm

from gan_dist.models.base import ClassicConfig, resolution_steps
from gan_dist.models.conditioning import ConditionalCritic, Conditioned, apply, batch_norm, require_labels

MAX_MULTIPLIER = 8


class Config(ClassicConfig):
    arch: Literal["resnet"] = "resnet"
    class_through_batchnorm: ClassVar[bool] = True
    d_spectral_norm: bool = True

    def check_resolution(self, resolution: int) -> None:
        resolution_steps(resolution)


def _init(layer: nn.Conv2d | nn.Linear, gain: float = 1.0) -> nn.Conv2d | nn.Linear:
    nn.init.xavier_uniform_(layer.weight, gain)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)
    return layer


def _conv(c_in: int, c_out: int, kernel: int, gain: float = 1.0, sn: bool = False) -> nn.Module:
    conv = _init(nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2), gain)
    return _spectral_norm(conv) if sn else conv


class GBlock(nn.Module):
    """BN-ReLU-up-conv3-BN-ReLU-conv3, plus a 1x1 conv shortcut on the upsampled input. In a conditional G
    both BatchNorms take the class's scale and shift (SNGAN's conditional generator)."""

    def __init__(self, c_in: int, c_out: int, batchnorm: bool, num_classes: int = 0) -> None:
        super().__init__()
        self.bn1 = batch_norm(c_in, num_classes) if batchnorm else nn.Identity()
        self.conv1 = _conv(c_in, c_out, 3, math.sqrt(2))
        self.bn2 = batch_norm(c_out, num_classes) if batchnorm else nn.Identity()
        self.conv2 = _conv(c_out, c_out, 3, math.sqrt(2))
        self.shortcut = _conv(c_in, c_out, 1)

    takes_labels = True

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        h = F.interpolate(F.relu(apply(self.bn1, x, labels)), scale_factor=2, mode="nearest")
        h = self.conv2(F.relu(apply(self.bn2, self.conv1(h), labels)))
        return h + self.shortcut(F.interpolate(x, scale_factor=2, mode="nearest"))


class DBlock(nn.Module):
    """Down block: (norm-)ReLU-conv3-(norm-)ReLU-conv3-avgpool, shortcut conv1-avgpool.

    ``first=True`` is SNGAN's "optimized" block for the image input: no activation before the
    first conv, and the shortcut pools before its 1x1 conv (cheaper, same result for a linear map).
    """

    def __init__(self, c_in: int, c_out: int, batchnorm: bool, sn: bool, first: bool = False) -> None:
        super().__init__()
        self.first = first
        self.norm1 = nn.BatchNorm2d(c_in) if batchnorm and not first else nn.Identity()
        self.conv1 = _conv(c_in, c_out, 3, math.sqrt(2), sn)
        self.norm2 = nn.BatchNorm2d(c_out) if batchnorm else nn.Identity()
        self.conv2 = _conv(c_out, c_out, 3, math.sqrt(2), sn)
        self.shortcut = _conv(c_in, c_out, 1, sn=sn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(x if self.first else F.relu(self.norm1(x)))
        h = F.avg_pool2d(self.conv2(F.relu(self.norm2(h))), 2)
        skip = self.shortcut(F.avg_pool2d(x, 2)) if self.first else F.avg_pool2d(self.shortcut(x), 2)
        return h + skip


class Generator(nn.Module):
    """z [N, z_dim] (+ labels [N] when conditional) -> images [N, C, R, R] in [-1, 1]."""

    def __init__(
        self, z_dim: int, width: int, resolution: int, channels: int, batchnorm: bool = True, num_classes: int = 0
    ) -> None:
        super().__init__()
        if num_classes and not batchnorm:
            raise ValueError("a conditional resnet G takes the class through its BatchNorm layers: batchnorm=True")
        steps = resolution_steps(resolution)
        chans = [width * min(2 ** (steps - i), MAX_MULTIPLIER) for i in range(steps + 1)]
        self.num_classes = num_classes
        self.linear = _init(nn.Linear(z_dim, 4 * 4 * chans[0]))
        self.blocks = Conditioned(*(GBlock(a, b, batchnorm, num_classes) for a, b in pairwise(chans)))
        self.out_bn = nn.BatchNorm2d(chans[-1]) if batchnorm else nn.Identity()
        self.out_conv = _conv(chans[-1], channels, 3)

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if self.num_classes:
            require_labels(labels, z.shape[0])
        h = self.blocks(self.linear(z).view(z.shape[0], -1, 4, 4), labels)
        return torch.tanh(self.out_conv(F.relu(self.out_bn(h))))


class Discriminator(nn.Module):
    """images [N, C, R, R] (+ labels [N] when conditional: projection on the pooled features) -> raw logits
    [N] (and class logits with the AC-GAN head)."""

    def __init__(
        self,
        width: int,
        resolution: int,
        channels: int,
        norm: str = "none",
        spectral_norm: bool = True,
        num_classes: int = 0,
        classify: bool = False,
    ) -> None:
        super().__init__()
        steps = resolution_steps(resolution)
        chans = [width * min(2**i, MAX_MULTIPLIER) for i in range(steps)]
        batchnorm = norm == "batch"
        blocks = [DBlock(channels, chans[0], batchnorm, spectral_norm, first=True)]
        blocks += [DBlock(a, b, batchnorm, spectral_norm) for a, b in pairwise(chans)]
        self.blocks = nn.Sequential(*blocks)
        linear = _init(nn.Linear(chans[-1], 1))
        self.linear = _spectral_norm(linear) if spectral_norm else linear
        self.critic = ConditionalCritic(chans[-1], num_classes, True, classify, spectral_norm)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        h = F.relu(self.blocks(x)).sum(dim=(2, 3))  # global sum pool, as in SNGAN
        return self.critic(self.linear(h).squeeze(1), h, labels)


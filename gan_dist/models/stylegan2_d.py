"""StyleGAN2 discriminator (config F, residual architecture, as trained by StyleGAN2-ADA).

images [N, C, R, R] -> FromRGB -> one residual block per resolution R, R/2, ..., 8 (two 3x3 convs,
the second blurring then striding by 2; skip = blur + strided 1x1 conv; sum scaled by sqrt(1/2))
-> epilogue at 4x4: minibatch-stddev, 3x3 conv, dense, output -> logits [N].

Conditional (num_classes > 0) uses StyleGAN2-ADA's projection output: an MLP embeds the label to
``cmap_dim`` features and the logit is the dot product with the output features / sqrt(cmap_dim).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from gan_dist.models.layers import EqualConv2d, EqualLinear, MinibatchStd, bf16_autocast
from gan_dist.models.stylegan2 import LatentMLP, channels_at, one_hot_labels, resolution_log2, uses_bf16


class DiscriminatorBlock(nn.Module):
    """Residual down block at resolution r; the top one first maps the image in with FromRGB."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        image_channels: int = 0,
        bf16: bool = False,
        conv_clamp: float | None = None,
    ) -> None:
        super().__init__()
        self.fromrgb = (
            EqualConv2d(image_channels, in_channels, 1, activation=True, conv_clamp=conv_clamp)
            if image_channels
            else None
        )
        self.conv0 = EqualConv2d(in_channels, in_channels, 3, activation=True, conv_clamp=conv_clamp)
        self.conv1 = EqualConv2d(in_channels, out_channels, 3, activation=True, down=True, conv_clamp=conv_clamp)
        self.skip = EqualConv2d(in_channels, out_channels, 1, bias=False, down=True)
        self.bf16 = bf16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with bf16_autocast(x, self.bf16):
            if self.fromrgb is not None:
                x = self.fromrgb(x)
            # sqrt(1/2) keeps the sum of two unit-variance branches at unit variance; it rides on
            # each branch's weights, and the sum reuses the skip's fresh output.
            x = self.skip(x, gain=math.sqrt(0.5)).add_(self.conv1(self.conv0(x), gain=math.sqrt(0.5)))
        return x.float()


class DiscriminatorEpilogue(nn.Module):
    """4x4 features -> minibatch std, conv 3x3, dense, output (1 logit or cmap_dim features)."""

    def __init__(
        self,
        in_channels: int,
        out_features: int,
        mbstd_group_size: int = 4,
        mbstd_channels: int = 1,
        conv_clamp: float | None = None,
    ) -> None:
        super().__init__()
        self.mbstd = MinibatchStd(mbstd_group_size, mbstd_channels)
        self.conv = EqualConv2d(in_channels + mbstd_channels, in_channels, 3, activation=True, conv_clamp=conv_clamp)
        self.fc = EqualLinear(in_channels * 4 * 4, in_channels, activation=True)
        self.out = EqualLinear(in_channels, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(self.mbstd(x))
        return self.out(self.fc(x.flatten(1)))


class Discriminator(nn.Module):
    """images [N, C, R, R] (+ labels [N] if num_classes > 0) -> raw logits [N] (float32).

    ``mapping_layers`` sizes the label-embedding MLP of a conditional D (StyleGAN2-ADA: 8, lr_mul 0.01).
    """

    def __init__(
        self,
        resolution: int = 256,
        channels: int = 3,
        num_classes: int = 0,
        channel_base: int = 16384,
        channel_max: int = 512,
        mbstd_group_size: int = 4,
        mbstd_channels: int = 1,
        bf16_resolutions: int = 0,
        conv_clamp: float | None = None,
        mapping_layers: int = 8,
    ) -> None:
        super().__init__()
        log2 = resolution_log2(resolution)
        self.num_classes = num_classes
        self.blocks = nn.ModuleList(
            DiscriminatorBlock(
                channels_at(r, channel_base, channel_max),
                channels_at(r // 2, channel_base, channel_max),
                channels if r == resolution else 0,
                uses_bf16(r, resolution, bf16_resolutions),
                conv_clamp,
            )
            for r in (2**i for i in range(log2, 2, -1))
        )
        c4 = channels_at(4, channel_base, channel_max)
        self.cmap_dim = c4 if num_classes else 0
        self.mapping = LatentMLP(0, self.cmap_dim, num_classes, mapping_layers) if num_classes else None
        self.epilogue = DiscriminatorEpilogue(c4, self.cmap_dim or 1, mbstd_group_size, mbstd_channels, conv_clamp)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        c = one_hot_labels(labels, self.num_classes, x.shape[0])
        for block in self.blocks:
            x = block(x)
        out = self.epilogue(x)
        if c is None:
            return out.squeeze(1).float()
        cmap = self.mapping(None, c)  # projection: logit = <features, label embedding> / sqrt(cmap_dim)
        return ((out * cmap).sum(dim=1) / math.sqrt(self.cmap_dim)).float()


__all__ = ["Discriminator", "DiscriminatorBlock", "DiscriminatorEpilogue"]

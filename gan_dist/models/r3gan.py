"""R3GAN's generator and discriminator (Huang et al., "The GAN is dead; long live the GAN! A Modern GAN Baseline",
NeurIPS 2024), in plain PyTorch.

Both nets are one stage per resolution 4, 8, ..., R (D runs G's plan backwards). A stage is a transition and
``blocks`` residual blocks without normalisation, ResNeXt-style: 1x1 conv expanding the channels ``expansion``
times -> bias + lrelu(0.2) -> grouped 3x3 conv (``cardinality`` groups) -> bias + lrelu -> 1x1 conv back, added to
the block's input.

- G: z (+ a class embedding) -> a linear layer scales each channel of a learned 4x4 basis -> stages, each after the
  first entered by a 1x1 conv (if the width changes) and 2x upsampling -> 1x1 conv to the image (raw, no tanh).
- D: 1x1 conv from the image -> stages, each left by 2x downsampling and a 1x1 conv (if the width changes); the
  last by a depthwise 4x4 conv over the 4x4 map (one value per channel) and a linear layer to the logit or, for a
  conditional D, to a vector whose dot product with the class's embedding is the logit (projection).

Resampling is the paper's [1, 2, 1] low-pass filter in its interpolating form, [1, 2, 1] * [1, 1] = [1, 3, 3, 1]
(the official code builds it so), which is StyleGAN2's FIR: ``layers.upsample2d`` / ``downsample2d`` as they are.

Initialisation (the paper's fix-up rule; no equalized learning rate, the scale lives in the weights): every weight
~ N(0, gain² / fan_in). In each residual block the last conv is zero, so the block starts as the identity, and the
other two take the lrelu gain times L^(-1/(2m-2)) = L^(-1/4), L the net's number of blocks and m = 3 the branch's
layers: Fixup's scaling (Zhang et al. 2019), which keeps the blocks' summed effect on the output, and so the size of
a training step's change to it, from growing with L. Everything else has gain 1.
Channels at resolution r are min(channel_base / r, channel_max); ``Config`` documents the published settings.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import pairwise
from typing import Literal, NamedTuple, TypeVar

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from gan_dist.models.base import ModelSection, resolution_steps
from gan_dist.models.conditioning import require_labels
from gan_dist.models.layers import FIR_KERNEL, LRELU_SLOPE, downsample2d, fir_filter, upsample2d

BRANCH_LAYERS = 3  # m: the convs of a residual branch
LRELU_INIT_GAIN = nn.init.calculate_gain("leaky_relu", LRELU_SLOPE)  # sqrt(2 / (1 + 0.2²))
RESAMPLE_KERNEL = FIR_KERNEL  # [1, 2, 1] convolved with the [1, 1] box of 2x interpolation
Layer = TypeVar("Layer", nn.Conv2d, nn.Linear)


class Stage(NamedTuple):
    """One resolution of the nets: its channels, the groups of its 3x3 convs and its residual blocks."""

    width: int
    cardinality: int
    blocks: int


class Config(ModelSection):
    """``model.*`` keys of arch r3gan; the defaults are a small net for the CPU (at 32 px widths 128, 64, 32, 16 and
    about 0.33M parameters each for G and D; a forward costs about 1.5x DCGAN's at its default width).

    The published nets (the official train.py presets, all with blocks_per_stage 2, expansion 2, z_dim 64):
    CIFAR-10 channel_base 24576, channel_max 768, group_width 16; FFHQ-64/256 the same (768 up to 32 px, then
    halving); ImageNet-32/64 channel_base 49152/98304, channel_max 1536, group_width 32.
    """

    arch: Literal["r3gan"] = "r3gan"
    z_dim: int = Field(64, ge=1, description="Latent size (the paper: 64)")
    channel_base: int = Field(
        512, ge=1, description="Channels of the stage at resolution r: min(channel_base / r, channel_max)"
    )
    channel_max: int = Field(128, ge=1, description="Channel cap (the paper: 768; ImageNet 1536)")
    blocks_per_stage: int = Field(2, ge=1, description="Residual blocks per resolution in G and in D (the paper: 2)")
    expansion: int = Field(2, ge=1, description="Width factor of a residual branch's middle (the paper: 2)")
    group_width: int = Field(
        16,
        ge=1,
        description="Channels per group of the grouped 3x3 convs: cardinality = expansion * width / group_width "
        "(the paper: 16; ImageNet 32); a branch narrower than one group is one group",
    )
    class_embedding: int | None = Field(
        None, ge=1, description="Size of the class embedding a conditional G joins to z; unset: z_dim (the paper)"
    )

    def stages(self, resolution: int) -> list[Stage]:
        """G's stages, 4x4 first; ValueError unless ``resolution`` is a power of two in 8..1024 whose widths split
        into whole groups."""
        plan = []
        for r in (4 << i for i in range(resolution_steps(resolution, 8, 1024) + 1)):
            width = max(1, min(self.channel_base // r, self.channel_max))
            expanded = width * self.expansion
            if expanded > self.group_width and expanded % self.group_width:
                raise ValueError(f"{expanded} branch channels at {r}x{r} are no whole groups of {self.group_width}")
            plan.append(Stage(width, max(1, expanded // self.group_width), self.blocks_per_stage))
        return plan

    def check_resolution(self, resolution: int) -> None:
        self.stages(resolution)


def _init(layer: Layer, gain: float) -> Layer:
    """Weights ~ N(0, gain² / fan_in), fan_in = what one output unit reads (in / groups · k² for a conv)."""
    nn.init.normal_(layer.weight, 0.0, gain / math.sqrt(layer.weight[0].numel()))
    return layer


def _conv(c_in: int, c_out: int, kernel: int = 1, gain: float = 1.0, groups: int = 1) -> nn.Conv2d:
    return _init(nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2, groups=groups, bias=False), gain)


def _class_embedding(num_classes: int, size: int, gain: float) -> nn.Embedding | None:
    """The class vectors of a conditional net: the official one-hot linear layer (fan-in = the classes) as a table."""
    if not num_classes:
        return None
    embed = nn.Embedding(num_classes, size)
    nn.init.normal_(embed.weight, 0.0, gain / math.sqrt(num_classes))
    return embed


def _class_vectors(embed: nn.Embedding | None, labels: torch.Tensor | None, batch: int) -> torch.Tensor | None:
    """The labels' class vectors [N, size] (a conditional net) or None (an unconditional one, which takes none)."""
    if embed is None:
        if labels is not None:
            raise ValueError("labels given to an unconditional model (model.conditional=false)")
        return None
    return embed(require_labels(labels, batch))


class BiasedLeakyReLU(nn.Module):
    """Per-channel bias, then lrelu(0.2), without a gain (it is in the next layer's init)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The bias in x's dtype keeps bf16 activations bf16; the lrelu runs in place on the sum it just made.
        return F.leaky_relu(x + self.bias.to(x.dtype).view(1, -1, 1, 1), LRELU_SLOPE, inplace=True)


class ResidualBlock(nn.Module):
    """x + conv1x1(act(grouped conv3x3(act(conv1x1(x))))), the last conv zero: the identity at init."""

    def __init__(self, channels: int, cardinality: int, expansion: int, total_blocks: int) -> None:
        super().__init__()
        expanded = channels * expansion
        gain = LRELU_INIT_GAIN * total_blocks ** (-1 / (2 * BRANCH_LAYERS - 2))
        self.expand = _conv(channels, expanded, gain=gain)
        self.act1 = BiasedLeakyReLU(expanded)
        self.conv = _conv(expanded, expanded, 3, gain, groups=cardinality)
        self.act2 = BiasedLeakyReLU(expanded)
        self.project = _conv(expanded, channels, gain=0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.project(self.act2(self.conv(self.act1(self.expand(x)))))


class Upsample(nn.Module):
    """G's transition: 1x1 conv to the next width (if it differs; at the lower resolution, 4x cheaper), then 2x."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv = _conv(c_in, c_out) if c_in != c_out else None
        self.register_buffer("resample_filter", fir_filter(RESAMPLE_KERNEL), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return upsample2d(x if self.conv is None else self.conv(x), self.resample_filter)


class Downsample(nn.Module):
    """D's transition: 2x down, then 1x1 conv to the next width (if it differs)."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv = _conv(c_in, c_out) if c_in != c_out else None
        self.register_buffer("resample_filter", fir_filter(RESAMPLE_KERNEL), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = downsample2d(x, self.resample_filter)
        return x if self.conv is None else self.conv(x)


class GenerativeBasis(nn.Module):
    """z [N, in] -> [N, C, 4, 4]: a learned 4x4 map per channel, scaled by a linear function of z."""

    def __init__(self, in_features: int, channels: int) -> None:
        super().__init__()
        self.basis = nn.Parameter(torch.randn(channels, 4, 4))
        self.linear = _init(nn.Linear(in_features, channels, bias=False), 1.0)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        scale = self.linear(z)
        return self.basis.to(scale.dtype) * scale[:, :, None, None]


class DiscriminativeBasis(nn.Module):
    """[N, C, 4, 4] -> [N, out]: a depthwise 4x4 conv (one learned 4x4 pattern per channel), then linear."""

    def __init__(self, channels: int, out_features: int) -> None:
        super().__init__()
        self.basis = _init(nn.Conv2d(channels, channels, 4, groups=channels, bias=False), 1.0)
        self.linear = _init(nn.Linear(channels, out_features, bias=False), 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.basis(x).flatten(1))


def _blocks(stage: Stage, expansion: int, total_blocks: int) -> list[nn.Module]:
    return [ResidualBlock(stage.width, stage.cardinality, expansion, total_blocks) for _ in range(stage.blocks)]


class Generator(nn.Module):
    """z [N, z_dim] (+ labels [N] when conditional) -> float32 images [N, channels, R, R], R = 4·2^(stages-1)."""

    def __init__(
        self,
        stages: Sequence[Stage],
        expansion: int = 2,
        channels: int = 3,
        z_dim: int = 64,
        num_classes: int = 0,
        class_embedding: int = 64,
    ) -> None:
        super().__init__()
        total = sum(s.blocks for s in stages)
        self.embed = _class_embedding(num_classes, class_embedding, 1.0)
        first = GenerativeBasis(z_dim + (class_embedding if num_classes else 0), stages[0].width)
        entries = [first] + [Upsample(a.width, b.width) for a, b in pairwise(stages)]
        self.stages = nn.Sequential(
            *(nn.Sequential(entry, *_blocks(s, expansion, total)) for s, entry in zip(stages, entries))
        )
        self.to_image = _conv(stages[-1].width, channels)

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        classes = _class_vectors(self.embed, labels, z.shape[0])
        x = z if classes is None else torch.cat([z, classes.to(z.dtype)], dim=1)
        return self.to_image(self.stages(x)).float()


class Discriminator(nn.Module):
    """images [N, channels, R, R] (+ labels [N] when conditional) -> float32 raw logits [N].

    ``stages`` are G's, 4x4 first, as ``Config.stages`` gives them; D runs them from R down to 4x4.
    """

    def __init__(self, stages: Sequence[Stage], expansion: int = 2, channels: int = 3, num_classes: int = 0) -> None:
        super().__init__()
        total = sum(s.blocks for s in stages)
        top_down = list(reversed(stages))
        # A conditional D projects onto a class vector as wide as its 4x4 stage (the official choice), whose
        # init gain 1/sqrt(size) keeps the dot product at the scale of one feature.
        out_features = stages[0].width if num_classes else 1
        self.embed = _class_embedding(num_classes, out_features, 1 / math.sqrt(out_features))
        self.from_image = _conv(channels, top_down[0].width)
        exits = [Downsample(a.width, b.width) for a, b in pairwise(top_down)]
        exits.append(DiscriminativeBasis(top_down[-1].width, out_features))
        self.stages = nn.Sequential(
            *(nn.Sequential(*_blocks(s, expansion, total), exit_) for s, exit_ in zip(top_down, exits))
        )

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        classes = _class_vectors(self.embed, labels, images.shape[0])
        out = self.stages(self.from_image(images)).float()
        return out.squeeze(1) if classes is None else (out * classes).sum(dim=1)


def generator(cfg: Config, resolution: int, channels: int) -> Generator:
    """G for ``cfg`` at ``resolution`` with ``channels`` image channels."""
    embedding = cfg.class_embedding or cfg.z_dim
    return Generator(cfg.stages(resolution), cfg.expansion, channels, cfg.z_dim, cfg.classes(), embedding)


def discriminator(cfg: Config, resolution: int, channels: int, classify: bool = False) -> Discriminator:
    """D for ``cfg``; it has no AC-GAN head (``classify``)."""
    if classify:
        raise ValueError("the r3gan D has no auxiliary classifier head")
    return Discriminator(cfg.stages(resolution), cfg.expansion, channels, cfg.classes())


__all__ = ["Config", "Discriminator", "Generator", "Stage", "discriminator", "generator"]

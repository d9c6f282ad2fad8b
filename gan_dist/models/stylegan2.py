"""StyleGAN2 generator (config F, skip architecture, as trained by StyleGAN2-ADA), in plain PyTorch.

z [N, z_dim] (+ class labels) -> mapping MLP -> w, broadcast to ``num_ws`` = 2·log2(R) - 2 layers
-> synthesis: a learned 4x4 constant, then per resolution r = 4, 8, ..., R one (at 4x4) or two
modulated 3x3 convs (the first upsamples) with per-layer noise, and a ToRGB whose output is summed
into an FIR-upsampled running image. Images are raw (no tanh), roughly in [-1, 1].

Channels at resolution r: ``min(channel_base // r, channel_max)`` (StyleGAN2-ADA's plan; its
config F is channel_base=32768, its 256-px "paper256"/"auto" config channel_base=16384).
The discriminator is in ``stylegan2_d.py``; both share this file's plan and mapping MLP.

Randomness at run time comes only from torch's global RNG: style mixing draws a second z, the
per-sample cutoffs and the per-sample mixing coins; noise_mode="random" draws every layer's noise.
"""

from __future__ import annotations

from functools import partial
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from gan_dist.models.base import ModelSection, resolution_steps
from gan_dist.models.layers import EqualLinear, ModulatedConv2d, activate, bf16_autocast, fir_filter
from gan_dist.models.layers import normalize_2nd_moment, upsample2d

NOISE_SEED = 0  # seed of the generator that draws the noise_const buffers (identical on every rank)
NOISE_MODES = ("random", "const", "none")


class Config(ModelSection):
    """``model.*`` keys of arch stylegan2; defaults are StyleGAN2-ADA's 256-px configuration."""

    arch: Literal["stylegan2"] = "stylegan2"
    z_dim: int = Field(512, ge=1, description="Latent size")
    w_dim: int = Field(512, ge=1, description="Style size")
    mapping_layers: int = Field(8, ge=1, description="Fully connected layers of the mapping network")
    channel_base: int = Field(16384, ge=16, description="Channels at resolution r: min(channel_base / r, channel_max)")
    channel_max: int = Field(512, ge=1)
    mbstd_group_size: int = Field(4, ge=1, description="D's minibatch-stddev group: every forward on a rank holds at least this many images")
    style_mixing: float = Field(0.9, ge=0, le=1, description="Probability of style-mixing regularization per sample")
    bf16_resolutions: int = Field(0, ge=0, description="Run this many highest-resolution blocks in bf16")
    conv_clamp: float | None = Field(None, gt=0, description="Clamp conv activations to +-this (e.g. 256 with bf16)")

    def check_resolution(self, resolution: int) -> None:
        resolution_steps(resolution, 32, 1024)


def resolution_log2(resolution: int) -> int:
    """log2 of a power-of-two resolution in 8..1024; raise otherwise."""
    if resolution & (resolution - 1) or not 8 <= resolution <= 1024:
        raise ValueError(f"resolution must be a power of two in 8..1024, got {resolution}")
    return resolution.bit_length() - 1


def channels_at(r: int, channel_base: int, channel_max: int) -> int:
    """Feature channels at resolution ``r``."""
    return min(channel_base // r, channel_max)


def uses_bf16(r: int, resolution: int, bf16_resolutions: int) -> bool:
    """Whether the block at resolution ``r`` is one of the ``bf16_resolutions`` highest (never 4x4)."""
    return bf16_resolutions > 0 and r >= max(resolution >> (bf16_resolutions - 1), 8)


def one_hot_labels(labels: torch.Tensor | None, num_classes: int, batch: int) -> torch.Tensor | None:
    """Class indices [N] -> float one-hot [N, num_classes]; labels are required iff num_classes > 0."""
    if num_classes == 0:
        if labels is not None:
            raise ValueError("labels given to an unconditional model (num_classes=0)")
        return None
    if labels is None:
        raise ValueError(f"this model is conditional (num_classes={num_classes}); pass labels [N]")
    if labels.shape != (batch,) or labels.is_floating_point():
        raise ValueError(f"labels must be integer class indices of shape [{batch}], got {tuple(labels.shape)}")
    return F.one_hot(labels, num_classes).float()


class LatentMLP(nn.Module):
    """Normalised z (z_dim may be 0) concatenated with a normalised label embedding (num_classes
    may be 0), then ``num_layers`` EqualLinear + lrelu layers with lr multiplier ``lr_mul``."""

    def __init__(
        self, z_dim: int, w_dim: int, num_classes: int = 0, num_layers: int = 8, lr_mul: float = 0.01
    ) -> None:
        super().__init__()
        if z_dim == 0 and num_classes == 0:
            raise ValueError("LatentMLP needs z_dim > 0 or num_classes > 0")
        self.z_dim, self.w_dim, self.num_classes = z_dim, w_dim, num_classes
        self.embed = EqualLinear(num_classes, w_dim) if num_classes else None
        dims = [z_dim + (w_dim if num_classes else 0)] + [w_dim] * num_layers
        self.layers = nn.Sequential(
            *(EqualLinear(a, b, lr_mul=lr_mul, activation=True) for a, b in zip(dims, dims[1:]))
        )

    def forward(self, z: torch.Tensor | None, c: torch.Tensor | None = None) -> torch.Tensor:
        """z [N, z_dim] (None if z_dim is 0) and one-hot labels c [N, num_classes] (None if 0) -> [N, w_dim]."""
        parts = [] if z is None else [normalize_2nd_moment(z)]
        if c is not None:
            parts.append(normalize_2nd_moment(self.embed(c)))
        return self.layers(torch.cat(parts, dim=1))


class MappingNetwork(LatentMLP):
    """z (+ labels) -> ws [N, num_ws, w_dim], with truncation towards the tracked mean ``w_avg``.

    The forward never changes ``w_avg``: the trainer calls ``update_w_avg`` with a batch mean of w
    (all-reduced across ranks), so every rank holds the same average.
    """

    def __init__(self, z_dim: int, w_dim: int, num_ws: int, num_classes: int = 0, num_layers: int = 8) -> None:
        super().__init__(z_dim, w_dim, num_classes, num_layers, lr_mul=0.01)
        self.num_ws = num_ws
        self.register_buffer("w_avg", torch.zeros(w_dim))

    def forward(
        self,
        z: torch.Tensor,
        labels: torch.Tensor | None = None,
        truncation_psi: float = 1.0,
        truncation_cutoff: int | None = None,
    ) -> torch.Tensor:
        c = one_hot_labels(labels, self.num_classes, z.shape[0])
        ws = super().forward(z, c).unsqueeze(1).expand(-1, self.num_ws, -1)
        if truncation_psi != 1:
            cut = self.num_ws if truncation_cutoff is None else truncation_cutoff
            ws = torch.cat([self.w_avg.lerp(ws[:, :cut], truncation_psi), ws[:, cut:]], dim=1)
        return ws

    @torch.no_grad()
    def update_w_avg(self, batch_mean_w: torch.Tensor, beta: float = 0.995) -> None:
        """w_avg <- beta·w_avg + (1 - beta)·batch_mean_w."""
        self.w_avg.lerp_(batch_mean_w.to(self.w_avg), 1 - beta)


class SynthesisLayer(nn.Module):
    """Modulated, demodulated 3x3 conv (optionally upsampling 2x) + scaled noise + bias + lrelu·sqrt(2)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        w_dim: int,
        resolution: int,
        noise_generator: torch.Generator,
        up: bool = False,
        conv_clamp: float | None = None,
    ) -> None:
        super().__init__()
        self.conv = ModulatedConv2d(in_channels, out_channels, 3, w_dim, up=up)
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.noise_strength = nn.Parameter(torch.zeros([]))
        self.register_buffer("noise_const", torch.randn(resolution, resolution, generator=noise_generator))
        self.conv_clamp = conv_clamp

    def forward(self, x: torch.Tensor, w: torch.Tensor, noise_mode: str) -> torch.Tensor:
        x = self.conv(x, w)  # the demodulation's fresh product: no autograd node needs it, add in place
        if noise_mode == "random":  # drawn in float32 so bf16 blocks consume the RNG identically
            n, _, h, w_ = x.shape
            x = x.add_((torch.randn(n, 1, h, w_, device=x.device) * self.noise_strength).to(x.dtype))
        elif noise_mode == "const":
            x = x.add_((self.noise_const * self.noise_strength).to(x.dtype))
        return activate(x, self.bias, lrelu=True, clamp=self.conv_clamp)


class ToRGB(nn.Module):
    """Modulated 1x1 conv without demodulation, + bias (linear, clamped like the convs)."""

    def __init__(self, in_channels: int, channels: int, w_dim: int, conv_clamp: float | None = None) -> None:
        super().__init__()
        self.conv = ModulatedConv2d(in_channels, channels, 1, w_dim, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(channels))
        self.conv_clamp = conv_clamp

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return activate(self.conv(x, w), self.bias, lrelu=False, clamp=self.conv_clamp)


class SynthesisBlock(nn.Module):
    """One resolution: [up-conv,] conv, ToRGB; adds its RGB to the upsampled running image.

    The 4x4 block is fed by the learned constant: one conv, no upsampling (in_channels unused).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        w_dim: int,
        resolution: int,
        channels: int,
        noise_generator: torch.Generator,
        bf16: bool = False,
        conv_clamp: float | None = None,
    ) -> None:
        super().__init__()
        first = resolution == 4
        layer = partial(
            SynthesisLayer, w_dim=w_dim, resolution=resolution, noise_generator=noise_generator, conv_clamp=conv_clamp
        )
        layers = [] if first else [layer(in_channels, out_channels, up=True)]
        layers.append(layer(out_channels, out_channels))
        self.convs = nn.ModuleList(layers)
        self.torgb = ToRGB(out_channels, channels, w_dim, conv_clamp)
        self.register_buffer("resample_filter", None if first else fir_filter(), persistent=False)
        self.bf16 = bf16
        self.num_ws = len(layers) + 1  # ToRGB reads the w the next block's first conv reads

    def forward(
        self, x: torch.Tensor, img: torch.Tensor | None, ws: torch.Tensor, noise_mode: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        with bf16_autocast(x, self.bf16):
            for i, layer in enumerate(self.convs):
                x = layer(x, ws[:, i], noise_mode)
            rgb = self.torgb(x, ws[:, len(self.convs)])
        x, rgb = x.float(), rgb.float()
        return x, (rgb if img is None else upsample2d(img, self.resample_filter) + rgb)


class SynthesisNetwork(nn.Module):
    """ws [N, num_ws, w_dim] -> images [N, channels, R, R] (float32)."""

    def __init__(
        self,
        w_dim: int,
        resolution: int,
        channels: int,
        channel_base: int,
        channel_max: int,
        bf16_resolutions: int = 0,
        conv_clamp: float | None = None,
    ) -> None:
        super().__init__()
        log2 = resolution_log2(resolution)
        self.w_dim, self.resolution = w_dim, resolution
        self.num_ws = 2 * log2 - 2
        self.const = nn.Parameter(torch.randn(channels_at(4, channel_base, channel_max), 4, 4))
        noise_generator = torch.Generator().manual_seed(NOISE_SEED)
        self.blocks = nn.ModuleList()
        for r in (2**i for i in range(2, log2 + 1)):
            self.blocks.append(
                SynthesisBlock(
                    channels_at(max(r // 2, 4), channel_base, channel_max),
                    channels_at(r, channel_base, channel_max),
                    w_dim,
                    r,
                    channels,
                    noise_generator,
                    uses_bf16(r, resolution, bf16_resolutions),
                    conv_clamp,
                )
            )

    def forward(self, ws: torch.Tensor, noise_mode: str = "random") -> torch.Tensor:
        if noise_mode not in NOISE_MODES:
            raise ValueError(f"noise_mode must be one of {NOISE_MODES}, got {noise_mode!r}")
        if ws.shape[1:] != (self.num_ws, self.w_dim):
            raise ValueError(f"ws must be [N, {self.num_ws}, {self.w_dim}], got {tuple(ws.shape)}")
        x = self.const.unsqueeze(0).expand(ws.shape[0], -1, -1, -1)
        img = None
        start = 0
        for block in self.blocks:
            x, img = block(x, img, ws.narrow(1, start, block.num_ws), noise_mode)
            start += block.num_ws - 1
        return img


class Generator(nn.Module):
    """StyleGAN2 generator: z [N, z_dim] (+ labels [N] if num_classes > 0) -> float32 images [N, C, R, R]."""

    def __init__(
        self,
        z_dim: int = 512,
        w_dim: int = 512,
        resolution: int = 256,
        channels: int = 3,
        num_classes: int = 0,
        mapping_layers: int = 8,
        channel_base: int = 16384,
        channel_max: int = 512,
        bf16_resolutions: int = 0,
        conv_clamp: float | None = None,
    ) -> None:
        super().__init__()
        self.z_dim, self.w_dim, self.num_classes = z_dim, w_dim, num_classes
        self.synthesis = SynthesisNetwork(
            w_dim, resolution, channels, channel_base, channel_max, bf16_resolutions, conv_clamp
        )
        self.num_ws = self.synthesis.num_ws
        self.mapping = MappingNetwork(z_dim, w_dim, self.num_ws, num_classes, mapping_layers)

    def mapping_forward(
        self,
        z: torch.Tensor,
        labels: torch.Tensor | None = None,
        truncation_psi: float = 1.0,
        truncation_cutoff: int | None = None,
    ) -> torch.Tensor:
        """z -> ws [N, num_ws, w_dim] (truncated towards w_avg for the first truncation_cutoff layers)."""
        return self.mapping(z, labels, truncation_psi, truncation_cutoff)

    def synthesis_forward(self, ws: torch.Tensor, noise_mode: str = "random") -> torch.Tensor:
        """ws [N, num_ws, w_dim] -> images [N, C, R, R]."""
        return self.synthesis(ws, noise_mode)

    def mix_styles(
        self,
        ws: torch.Tensor,
        z: torch.Tensor,
        labels: torch.Tensor | None,
        prob: float,
        truncation_psi: float = 1.0,
        truncation_cutoff: int | None = None,
    ) -> torch.Tensor:
        """Style mixing: per sample, with probability ``prob``, the layers from a random cutoff in
        [1, num_ws) on take the ws of a fresh z (same labels). Tensor ops only (compile-friendly);
        draws z2, then the cutoffs, then the coins from the global RNG, whatever ``prob`` is."""
        n = ws.shape[0]
        ws2 = self.mapping(torch.randn_like(z), labels, truncation_psi, truncation_cutoff)
        cutoff = torch.randint(1, self.num_ws, (n,), device=ws.device)
        mix = torch.rand(n, device=ws.device) < prob
        cutoff = torch.where(mix, cutoff, torch.full_like(cutoff, self.num_ws))
        take_second = torch.arange(self.num_ws, device=ws.device) >= cutoff[:, None]  # [N, num_ws]
        return torch.where(take_second[:, :, None], ws2, ws)

    def forward(
        self,
        z: torch.Tensor,
        labels: torch.Tensor | None = None,
        truncation_psi: float = 1.0,
        truncation_cutoff: int | None = None,
        style_mix_prob: float = 0.0,
        noise_mode: str = "random",
        return_ws: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Images [N, C, R, R]; with ``return_ws`` also the ws [N, num_ws, w_dim] synthesis read."""
        ws = self.mapping(z, labels, truncation_psi, truncation_cutoff)
        if style_mix_prob > 0:
            ws = self.mix_styles(ws, z, labels, style_mix_prob, truncation_psi, truncation_cutoff)
        img = self.synthesis(ws, noise_mode)
        return (img, ws) if return_ws else img


__all__ = ["Generator", "MappingNetwork", "SynthesisNetwork", "LatentMLP", "channels_at", "resolution_log2"]

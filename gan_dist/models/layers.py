"""Building blocks of StyleGAN2-style networks, in plain PyTorch (no custom CUDA ops).

- Equalized learning rate: ``EqualLinear`` / ``EqualConv2d`` store N(0, 1)/lr_mul weights and
  scale them at run time by lr_mul/sqrt(fan_in), so every layer learns at the same speed under Adam.
- FIR resampling: ``fir_filter``, ``blur``, ``upsample2d`` (zero insertion, then FIR with gain 4)
  and ``downsample2d`` (FIR, then stride-2 decimation), plus ``conv2d_resample`` which fuses them
  with a convolution the way StyleGAN2 does (transposed conv + blur up, blur + strided conv down).
- Style modulation: ``modulated_conv2d`` scales the input by the styles, runs one ordinary conv
  with the shared weight and scales the output by ``demodulation`` -- StyleGAN2-ADA's training
  path; per-sample weights [N, out, in, k, k] are never formed. ``ModulatedConv2d`` owns the weight
  and the style affine.
- ``MinibatchStd``, ``normalize_2nd_moment``, ``activate`` (bias, lrelu·sqrt(2), clamp) and
  ``bf16_autocast`` (the mixed-precision switch of a block).

FIR filtering here is a depthwise 2-D correlation with a separable, normalised kernel of an even
number of taps; for the symmetric kernels StyleGAN uses this is the same as a convolution. Each
step is one conv call (its own zero padding, stride or transposed stride), so no padded or
zero-inserted copies are made. Forward + backward on the CPU at this project's sizes, this beat
two 1-D passes, sums of shifted slices and average pooling.

Speed notes: lrelu(g·z) = g·lrelu(z) for g > 0, so the sqrt(2) gain (and a block's sqrt(1/2)) rides
on the weights and biases of the equalized layers, and the lrelu runs in place on a tensor the
layer just made (no autograd node needs it). Fewer full-size temporaries matter on the CPU, where
each fresh allocation of a large tensor costs page faults.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

FIR_KERNEL = (1, 3, 3, 1)
LRELU_SLOPE = 0.2
LRELU_GAIN = math.sqrt(2)  # keeps the activations' second moment ~1 through lrelu(0.2)


def fir_filter(kernel: Sequence[float] = FIR_KERNEL) -> torch.Tensor:
    """Separable 2-D FIR kernel (outer product of ``kernel`` with itself), normalised to sum 1.

    The taps must be even in number: the resampling paddings below are then symmetric.
    """
    if len(kernel) % 2:
        raise ValueError(f"fir_filter needs an even number of taps, got {len(kernel)}")
    k = torch.as_tensor(kernel, dtype=torch.float32)
    f = torch.outer(k, k)
    return f / f.sum()


def _depthwise(f: torch.Tensor, gain: float, x: torch.Tensor) -> torch.Tensor:
    """``f * gain`` as a depthwise conv weight [C, 1, taps, taps] for ``x`` [N, C, H, W]."""
    return (f * gain).to(x.dtype).expand(x.shape[1], 1, *f.shape).contiguous()


def blur(
    x: torch.Tensor,
    f: torch.Tensor,
    pad: int,
    gain: float = 1.0,
    stride: int = 1,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Depthwise 2-D correlation of every channel with ``f * gain`` after ``pad`` zeros on every side
    (+ a per-channel ``bias``)."""
    return F.conv2d(x, _depthwise(f, gain, x), bias, stride=stride, padding=pad, groups=x.shape[1])


def upsample2d(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """2x upsampling: insert a zero after every pixel in both axes, then FIR with gain 4.

    One depthwise transposed conv of stride 2 does both (its zero insertion and padding line up).
    """
    taps = f.shape[-1]
    return F.conv_transpose2d(x, _depthwise(f, 4.0, x), stride=2, padding=taps // 2 - 1, groups=x.shape[1])


def downsample2d(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """2x downsampling: FIR, then keep every second pixel (one stride-2 correlation)."""
    return blur(x, f, f.shape[-1] // 2 - 1, stride=2)


def conv2d_resample(
    x: torch.Tensor,
    weight: torch.Tensor,
    f: torch.Tensor | None = None,
    up: bool = False,
    down: bool = False,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """'Same' conv with an odd square ``weight`` [out, in, k, k] (+ ``bias``), optionally resampling 2x.

    up: stride-2 transposed conv, then FIR (gain 4) -- the cheap equivalent of upsample2d + conv.
    down: FIR, then stride-2 conv -- the equivalent of conv + downsample2d.
    The paddings make the output exactly 2H (up), H/2 (down) or H.
    """
    k = weight.shape[-1]
    p = k // 2
    if up and down:
        raise ValueError("conv2d_resample: up and down are exclusive")
    if (up or down) and f is None:
        raise ValueError("conv2d_resample: resampling needs a FIR filter")
    if up:
        x = F.conv_transpose2d(x, weight.transpose(0, 1), stride=2)
        return blur(x, f, p + f.shape[-1] // 2 - k + 1, gain=4.0, bias=bias)
    if down and k == 1:  # a 1x1 conv commutes with the FIR: decimate first, filter a quarter of the pixels
        return F.conv2d(downsample2d(x, f), weight, bias)
    if down:
        return F.conv2d(blur(x, f, p + f.shape[-1] // 2 - 1), weight, bias, stride=2)
    return F.conv2d(x, weight, bias, padding=p)


def activate(
    x: torch.Tensor, bias: torch.Tensor | None, lrelu: bool, clamp: float | None = None
) -> torch.Tensor:
    """Add a per-channel bias (dim 1), apply lrelu(0.2)·sqrt(2) if asked, then clamp to ±clamp.

    Bias and gain take one pass (gain·x + gain·bias), the lrelu runs in place on that new tensor.
    The bias is cast to x's dtype so bf16 activations stay bf16 (no silent promotion to float32).
    """
    gain = LRELU_GAIN if lrelu else 1.0
    if bias is not None:
        x = torch.add(bias.to(x.dtype).reshape(-1, *([1] * (x.ndim - 2))) * gain, x, alpha=gain)
    elif lrelu:
        x = x * gain
    if lrelu:
        x = F.leaky_relu(x, LRELU_SLOPE, inplace=True)
    if clamp is not None:
        x = x.clamp(-clamp, clamp)
    return x


def normalize_2nd_moment(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Scale each row of ``x`` [N, D] to unit mean square."""
    return x * (x.square().mean(dim=1, keepdim=True) + eps).rsqrt()


def bf16_autocast(x: torch.Tensor, enabled: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on ``x``'s device if ``enabled``; otherwise leave the caller's autocast as it is."""
    if enabled:
        return torch.autocast(device_type=x.device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class _Equalized(nn.Module):
    """What EqualLinear and EqualConv2d share: the run-time weight/bias scaling and the activation."""

    weight: nn.Parameter
    bias: nn.Parameter | None

    def __init__(
        self, weight_shape: Sequence[int], bias: bool, bias_init: float, lr_mul: float, activation: bool
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(*weight_shape) / lr_mul)
        self.bias = nn.Parameter(torch.full(weight_shape[:1], bias_init / lr_mul)) if bias else None
        self.weight_gain = lr_mul / math.sqrt(math.prod(weight_shape[1:]))
        self.lr_mul = lr_mul
        self.activation = activation

    def effective_weight(self) -> torch.Tensor:
        """The weight the layer applies: stored · lr_mul / sqrt(fan_in)."""
        return self.weight * self.weight_gain

    def scaled_params(self, gain: float = 1.0) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Effective weight and bias times ``gain`` and, with the activation, the lrelu gain."""
        gain *= LRELU_GAIN if self.activation else 1.0
        bias = None if self.bias is None else self.bias * (self.lr_mul * gain)
        return self.weight * (self.weight_gain * gain), bias

    def act(self, x: torch.Tensor) -> torch.Tensor:
        """lrelu(0.2) in place on the layer's fresh output (its gain is already in the parameters)."""
        return F.leaky_relu(x, LRELU_SLOPE, inplace=True) if self.activation else x


class EqualLinear(_Equalized):
    """Fully connected layer with equalized learning rate and optional lrelu·sqrt(2).

    Effective weight = stored·lr_mul/sqrt(in_features), effective bias = stored·lr_mul;
    ``bias_init`` is the effective initial bias (stored as bias_init/lr_mul).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        bias_init: float = 0.0,
        lr_mul: float = 1.0,
        activation: bool = False,
    ) -> None:
        super().__init__((out_features, in_features), bias, bias_init, lr_mul, activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(F.linear(x, *self.scaled_params()))


class EqualConv2d(_Equalized):
    """'Same' square conv with equalized learning rate, optional FIR 2x downsampling, lrelu·sqrt(2)
    and output clamp (``conv_clamp``, applied after the activation)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        bias: bool = True,
        lr_mul: float = 1.0,
        activation: bool = False,
        down: bool = False,
        conv_clamp: float | None = None,
    ) -> None:
        super().__init__((out_channels, in_channels, kernel_size, kernel_size), bias, 0.0, lr_mul, activation)
        self.down = down
        self.conv_clamp = conv_clamp
        self.register_buffer("resample_filter", fir_filter() if down else None, persistent=False)

    def forward(self, x: torch.Tensor, gain: float = 1.0) -> torch.Tensor:
        """The layer's output times ``gain`` (> 0; the clamp scales with it, as in StyleGAN2-ADA)."""
        weight, bias = self.scaled_params(gain)
        x = self.act(conv2d_resample(x, weight, self.resample_filter, down=self.down, bias=bias))
        return x if self.conv_clamp is None else x.clamp(-self.conv_clamp * gain, self.conv_clamp * gain)


def demodulation(weight: torch.Tensor, styles: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """[N, out]: 1 / ||weight[o] · styles[n]|| over (in, k, k), from [out, in] and [N, in] sums of squares."""
    with torch.autocast(styles.device.type, enabled=False):  # float32 even inside a bf16 block
        return (styles.float().square() @ weight.float().square().sum(dim=(2, 3)).T + eps).rsqrt()


def modulated_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    styles: torch.Tensor,
    demodulate: bool = True,
    up: bool = False,
    down: bool = False,
    resample_filter: torch.Tensor | None = None,
) -> torch.Tensor:
    """Convolve each sample of ``x`` [N, in, H, W] with ``weight`` [out, in, k, k] scaled along ``in``
    by its ``styles`` [N, in] (and demodulated: unit L2 norm per output channel), optionally with
    FIR 2x up/downsampling.

    Linearity moves the per-sample scalings onto the activations: x·s into one shared-weight conv,
    then the per-(sample, output channel) demodulation on its output. A plain 1x1 conv (ToRGB) is
    the exception: its per-sample weights are only [N, out, in], and one batched matmul with them
    beats scaling all of ``x``.
    """
    if weight.shape[-1] == 1 and not (up or down):
        w = weight.flatten(1) * styles.unsqueeze(1)  # [N, out, in]
        if demodulate:
            w = w * demodulation(weight, styles).unsqueeze(2)
        return torch.matmul(w.to(x.dtype), x.flatten(2)).unflatten(2, x.shape[2:])
    x = x * styles.to(x.dtype).reshape(*styles.shape, 1, 1)
    x = conv2d_resample(x, weight, resample_filter, up=up, down=down)
    if demodulate:
        x = x * demodulation(weight, styles).to(x.dtype).reshape(*x.shape[:2], 1, 1)
    return x


class ModulatedConv2d(nn.Module):
    """Style-modulated 'same' conv: a style affine (bias init 1, so styles start near 1) of ``w``
    scales the weight's input channels; no bias, noise or activation (the callers add those)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        w_dim: int,
        demodulate: bool = True,
        up: bool = False,
    ) -> None:
        super().__init__()
        self.affine = EqualLinear(w_dim, in_channels, bias_init=1.0)
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size))
        # Equalized LR through the styles; demodulation cancels it, without it (ToRGB) it matters.
        self.weight_gain = 1 / math.sqrt(in_channels * kernel_size**2)
        self.demodulate = demodulate
        self.up = up
        self.register_buffer("resample_filter", fir_filter() if up else None, persistent=False)

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        styles = self.affine(w) * self.weight_gain
        return modulated_conv2d(
            x, self.weight, styles, self.demodulate, up=self.up, resample_filter=self.resample_filter
        )


class MinibatchStd(nn.Module):
    """Appends ``num_channels`` feature maps holding the std over a group of samples, averaged
    over the channels of a channel slice and the pixels (StyleGAN's minibatch-stddev).

    Groups are strided like StyleGAN2's: with k = N // G groups, sample i belongs to group i % k. The group
    stays G whatever N is, so the feature means the same on every rank of an uneven split: when G does not
    divide N, the N - kG samples left over take the statistic of group i % k (computed over G other samples).
    Only a batch smaller than G is one group of all N (the config refuses training such forwards).
    """

    def __init__(self, group_size: int, num_channels: int = 1) -> None:
        super().__init__()
        self.group_size = group_size
        self.num_channels = num_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        g = min(self.group_size, n)
        k, f = n // g, self.num_channels
        y = x[: k * g].reshape(g, k, f, c // f, h, w)
        y = (y - y.mean(dim=0)).square().mean(dim=0)  # variance over each group
        y = (y + 1e-8).sqrt().mean(dim=(2, 3, 4))  # [k, f]
        y = y[torch.arange(n, device=x.device) % k].reshape(n, f, 1, 1).expand(n, f, h, w)
        return torch.cat([x, y.to(x.dtype)], dim=1)

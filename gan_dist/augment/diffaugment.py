"""DiffAugment (Zhao et al. 2020, "Differentiable Augmentation for Data-Efficient GAN Training").

The same random, differentiable transforms are applied to every image D sees, real and fake, in both the
D and the G step, so gradients reach G through the augmented fakes. Images are NCHW in [-1, 1], 1 or 3
channels; every image is transformed (there is no probability), with fresh parameters per sample.

==============  ===========================================================================================
policy          transforms, in this order
==============  ===========================================================================================
color           brightness: add U(-0.5, 0.5); saturation: scale each pixel's deviation from its channel mean
                by U(0, 2) (3 channels only, a grey pixel has no saturation); contrast: scale the deviation
                from the image mean by U(0.5, 1.5)
translation     shift by whole pixels, up to 1/8 of the side on each axis independently, filling with 0
cutout          zero one square of half the side centred at a uniformly drawn pixel (clipped at the border)
==============  ===========================================================================================

The fill value: the paper's code applies these transforms to images already in [-1, 1] and pads with
0, so the fill is 0 here too, i.e. mid-grey, not black (-1).

Random draws come from torch's global RNG on the images' device, or from ``generator`` when one is given.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

TRANSLATION_RATIO = 0.125  # largest shift, as a fraction of the side
CUTOUT_RATIO = 0.5  # side of the cut-out square, as a fraction of the image side
FILL = 0.0  # what translation pads with and cutout writes: the paper's 0, mid-grey in [-1, 1]


def _uniform(x: Tensor, low: float, high: float, generator: torch.Generator | None) -> Tensor:
    """One U(low, high) per sample, shaped [N, 1, 1, 1] to broadcast over an image batch."""
    u = torch.rand(x.shape[0], 1, 1, 1, device=x.device, generator=generator)
    return (u * (high - low) + low).to(x.dtype)


def color(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Brightness, then saturation (3 channels only), then contrast."""
    x = x + _uniform(x, -0.5, 0.5, generator)
    if x.shape[1] > 1:
        pixel_mean = x.mean(dim=1, keepdim=True)
        x = (x - pixel_mean) * _uniform(x, 0.0, 2.0, generator) + pixel_mean
    image_mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - image_mean) * _uniform(x, 0.5, 1.5, generator) + image_mean


def _randint(x: Tensor, low: int, high: int, generator: torch.Generator | None) -> Tensor:
    """One integer in [low, high) per sample, shaped [N, 1]."""
    return torch.randint(low, high, (x.shape[0], 1), device=x.device, generator=generator)


def translation(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Shift each image by (dy, dx) whole pixels, |dy| <= H/8 and |dx| <= W/8, padding with ``FILL``."""
    n, _, h, w = x.shape
    max_y, max_x = int(h * TRANSLATION_RATIO + 0.5), int(w * TRANSLATION_RATIO + 0.5)
    dy = _randint(x, -max_y, max_y + 1, generator)
    dx = _randint(x, -max_x, max_x + 1, generator)
    # out[y, x] = in[y - dy, x - dx]; in padded coordinates the source row is y - dy + max_y, always inside.
    rows = torch.arange(h, device=x.device) - dy + max_y  # [N, H]
    cols = torch.arange(w, device=x.device) - dx + max_x  # [N, W]
    padded = F.pad(x, (max_x, max_x, max_y, max_y), value=FILL)
    batch = torch.arange(n, device=x.device)[:, None, None]
    # Advanced indices around a slice put the indexed dimensions first: the result is [N, H, W, C].
    return padded[batch, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


def cutout(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Set one square of side H/2 x W/2 per image to ``FILL``, centred at a random pixel."""
    _, _, h, w = x.shape
    size_y, size_x = int(h * CUTOUT_RATIO + 0.5), int(w * CUTOUT_RATIO + 0.5)
    top = _randint(x, 0, h, generator) - size_y // 2  # [N, 1]
    left = _randint(x, 0, w, generator) - size_x // 2
    ys, xs = torch.arange(h, device=x.device), torch.arange(w, device=x.device)
    in_rows = (ys >= top) & (ys < top + size_y)  # [N, H]
    in_cols = (xs >= left) & (xs < left + size_x)  # [N, W]
    inside = (in_rows[:, :, None] & in_cols[:, None, :]).unsqueeze(1)  # [N, 1, H, W]
    return torch.where(inside, torch.full_like(x, FILL), x)


_OPS: dict[str, Callable[[Tensor, torch.Generator | None], Tensor]] = {
    "color": color,
    "translation": translation,
    "cutout": cutout,
}
POLICIES = tuple(_OPS)


class DiffAugment(nn.Module):
    """Apply the comma-separated ``policy`` ops (see the module table) in the order given."""

    def __init__(self, policy: str = "color,translation,cutout") -> None:
        super().__init__()
        names = tuple(name.strip() for name in policy.split(",") if name.strip())
        unknown = sorted(set(names) - set(POLICIES))
        if unknown:
            raise ValueError(f"unknown DiffAugment op(s) {unknown}; valid ops: {', '.join(POLICIES)}")
        self.policy = names

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        for name in self.policy:
            x = _OPS[name](x, generator)
        return x

    def extra_repr(self) -> str:
        return f"policy={','.join(self.policy)!r}"

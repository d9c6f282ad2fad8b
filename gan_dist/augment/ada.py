"""ADA, the adaptive discriminator augmentation of Karras et al. 2020, "Training GANs with limited data".

``AugmentPipe`` is the paper's "bgc" pipeline: blit (x-flip, 90-degree rotations, integer translation),
general geometric (isotropic scaling, rotation, anisotropic scaling, fractional translation) and colour
(brightness, contrast, luma flip, hue rotation, saturation). Each transform is applied to each image
independently with probability ``p`` times its multiplier; the rotation is split into a pre- and a
post-rotation, each with probability 1 - sqrt(1 - p), so that at least one happens with probability p.
``AdaController`` is the heuristic that steers ``p`` towards a target r_t = E[sign(D(real))].

Choices made here:

* Geometry. All geometric transforms of a sample are folded into one 3x3 matrix (in pixel units about
  the image centre) and the batch is resampled once with ``F.grid_sample`` (bilinear, reflected border,
  no supersampling), so flips, 90-degree rotations and integer translations stay exact while the
  fractional ones are bilinearly interpolated. Each factor is drawn directly as the output-to-input
  (sampling) map; every distribution is symmetric, so this is the paper's distribution of transforms.
* Exact identity. A sample whose drawn matrices are the identity keeps its input bit for bit
  (``torch.where``), so p = 0 returns the input exactly without a host sync or a data-dependent branch.
  Resampling is skipped outright only when every geometric multiplier is 0 (a static decision).
* Colour works on [-1, 1], so contrast, luma flip, hue and saturation act about mid-grey 0; the luma
  axis is the paper's grey diagonal (1, 1, 1)/sqrt(3). For 1-channel images only brightness and
  contrast apply: hue and saturation do nothing to grey, and the luma flip would invert the image.
* Randomness. Every draw comes from torch's global RNG on the images' device (each rank has its own
  stream: docs/architecture.md), or from ``generator``; all choices are masks over the batch (no Python
  branch on a random value), so every rank runs the same kernels whatever it draws.
* Precision. Matrices, resampling and colour run in float32 even under autocast (bf16 would move pixels
  by up to ~1 on a [-1, 1] image); the result goes back to the input dtype.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

GEOMETRIC = ("xflip", "rotate90", "xint", "scale", "rotate", "aniso", "xfrac")
COLOR = ("brightness", "contrast", "lumaflip", "hue", "saturation")
GREY_COLOR = ("brightness", "contrast")  # the colour transforms that mean something for 1 channel

# The paper's spreads (Appendix B). Sizes are fractions of the image side; scales are powers of two.
XINT_MAX = 0.125  # integer translation: U(-0.125, 0.125) of the side, rounded to whole pixels
SCALE_STD = 0.2  # isotropic and anisotropic scaling: 2^N(0, 0.2^2)
ROTATE_MAX = 1.0  # rotation: U(-pi, pi) * ROTATE_MAX
XFRAC_STD = 0.125  # fractional translation: N(0, 0.125^2) of the side
BRIGHTNESS_STD = 0.2  # brightness: add N(0, 0.2^2)
CONTRAST_STD = 0.5  # contrast: multiply by 2^N(0, 0.5^2)
HUE_MAX = 1.0  # hue: rotate by U(-pi, pi) * HUE_MAX about the luma axis
SATURATION_STD = 1.0  # saturation: scale the chroma by 2^N(0, 1)


class _Draws:
    """The random draws of one forward call: one value per sample, from ``generator`` or the global RNG."""

    def __init__(self, n: int, device: torch.device, generator: torch.Generator | None) -> None:
        self.n, self.device, self.generator = n, device, generator

    def uniform(self, low: float = 0.0, high: float = 1.0) -> Tensor:
        u = torch.rand(self.n, device=self.device, generator=self.generator)
        return u * (high - low) + low

    def normal(self, std: float) -> Tensor:
        return torch.randn(self.n, device=self.device, generator=self.generator) * std

    def integers(self, high: int) -> Tensor:
        return torch.randint(0, high, (self.n,), device=self.device, generator=self.generator).float()

    def gate(self, prob: Tensor) -> Tensor:
        """Which samples get the transform: True with probability ``prob``."""
        return self.uniform() < prob


def _affine2d(a: Tensor, b: Tensor, c: Tensor, d: Tensor, tx: Tensor, ty: Tensor) -> Tensor:
    """Per-sample matrices [[a, b, tx], [c, d, ty], [0, 0, 1]] from [N] tensors -> [N, 3, 3]."""
    zero, one = torch.zeros_like(a), torch.ones_like(a)
    return torch.stack([a, b, tx, c, d, ty, zero, zero, one], dim=1).view(-1, 3, 3)


def _scale2d(sx: Tensor, sy: Tensor) -> Tensor:
    zero = torch.zeros_like(sx)
    return _affine2d(sx, zero, zero, sy, zero, zero)


def _rotate2d(cos: Tensor, sin: Tensor) -> Tensor:
    zero = torch.zeros_like(cos)
    return _affine2d(cos, -sin, sin, cos, zero, zero)


def _translate2d(tx: Tensor, ty: Tensor) -> Tensor:
    zero, one = torch.zeros_like(tx), torch.ones_like(tx)
    return _affine2d(one, zero, zero, one, tx, ty)


def _resample(images: Tensor, pixel_map: Tensor) -> Tensor:
    """Output pixel q (pixel units about the centre) takes the input at ``pixel_map @ q``."""
    _, _, h, w = images.shape
    # affine_grid wants a map in [-1, 1] units; converting through pixels keeps a rotation a rotation on
    # non-square images.
    to_pixels = torch.diag(images.new_tensor([w / 2, h / 2, 1.0]))
    to_unit = torch.diag(images.new_tensor([2 / w, 2 / h, 1.0]))
    theta = (to_unit @ pixel_map @ to_pixels)[:, :2]
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def _luma_frame(device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """The projections onto the luma axis v = (1, 1, 1)/sqrt(3) and onto its orthogonal (chroma) plane, and
    the cross-product matrix [v]x, which turns the chroma plane by 90 degrees about v."""
    eye = torch.eye(3, device=device)
    luma = torch.full((3, 3), 1 / 3, device=device)  # v v^T
    cross = (eye.roll(1, dims=0) - eye.roll(-1, dims=0)) / math.sqrt(3)  # [v]x @ y = v x y
    return luma, eye - luma, cross


def _luma_chroma_map(frame: tuple[Tensor, Tensor, Tensor], luma: Tensor, chroma: Tensor, turn: Tensor) -> Tensor:
    """[N, 3, 3] maps that scale a pixel's luma part by ``luma`` and its chroma part by ``chroma`` and add
    ``turn`` times the chroma turned by 90 degrees. Written as I + (luma - 1) P + (chroma - 1) Q + turn K,
    so that (1, 1, 0), a sample the gate left alone, gives exactly I (P + Q is I only up to rounding)."""
    eye = torch.eye(3, device=luma.device)
    weights = torch.stack([luma - 1, chroma - 1, turn], dim=1)  # [N, 3]
    return eye + torch.einsum("nk,kij->nij", weights, torch.stack(frame))


class AugmentPipe(nn.Module):
    """The "bgc" ADA pipeline on NCHW images in [-1, 1] (see the module docstring).

    ``p`` is a 0-d float buffer (initially 0): set it with ``pipe.p.fill_(x)`` or let ``AdaController``
    drive it. Each keyword is a multiplier on ``p`` for one transform; 0 leaves the transform out."""

    def __init__(
        self,
        channels: int,
        xflip: float = 1,
        rotate90: float = 1,
        xint: float = 1,
        scale: float = 1,
        rotate: float = 1,
        aniso: float = 1,
        xfrac: float = 1,
        brightness: float = 1,
        contrast: float = 1,
        lumaflip: float = 1,
        hue: float = 1,
        saturation: float = 1,
    ) -> None:
        super().__init__()
        if channels not in (1, 3):
            raise ValueError(f"AugmentPipe supports 1 or 3 channels, got {channels}")
        strengths = dict(
            xflip=xflip, rotate90=rotate90, xint=xint, scale=scale, rotate=rotate, aniso=aniso, xfrac=xfrac,
            brightness=brightness, contrast=contrast, lumaflip=lumaflip, hue=hue, saturation=saturation,
        )
        negative = [name for name, value in strengths.items() if value < 0]
        if negative:
            raise ValueError(f"augmentation multipliers must be >= 0, got negative {negative}")
        self.channels = channels
        self.strengths = {name: float(value) for name, value in strengths.items()}
        self.register_buffer("p", torch.zeros(()))
        colors = COLOR if channels == 3 else GREY_COLOR
        self._geometric_on = any(self.strengths[name] > 0 for name in GEOMETRIC)
        self._color_on = any(self.strengths[name] > 0 for name in colors)

    def _gate(self, draws: _Draws, name: str) -> Tensor:
        return draws.gate(self.p * self.strengths[name])

    def _geometric(self, draws: _Draws, h: int, w: int) -> Tensor:
        """[N, 3, 3] output-to-input pixel maps; factors multiply on the right in the paper's order."""
        s = self.strengths
        pixel_map = torch.eye(3, device=draws.device).expand(draws.n, 3, 3)
        if s["xflip"] > 0:
            sign = torch.where(self._gate(draws, "xflip"), 1 - 2 * draws.integers(2), 1.0)
            pixel_map = pixel_map @ _scale2d(sign, torch.ones_like(sign))
        if s["rotate90"] > 0:
            quarter = torch.where(self._gate(draws, "rotate90"), draws.integers(4), 0.0) * (math.pi / 2)
            # Rounding makes cos and sin of multiples of pi/2 exactly 0 or +-1, so rot90 stays exact.
            pixel_map = pixel_map @ _rotate2d(quarter.cos().round(), quarter.sin().round())
        if s["xint"] > 0:
            on = self._gate(draws, "xint")
            tx = torch.where(on, (draws.uniform(-XINT_MAX, XINT_MAX) * w).round(), 0.0)
            ty = torch.where(on, (draws.uniform(-XINT_MAX, XINT_MAX) * h).round(), 0.0)
            pixel_map = pixel_map @ _translate2d(tx, ty)
        if s["scale"] > 0:
            factor = torch.where(self._gate(draws, "scale"), torch.exp2(draws.normal(SCALE_STD)), 1.0)
            pixel_map = pixel_map @ _scale2d(factor, factor)
        if s["rotate"] > 0:
            pixel_map = pixel_map @ self._rotation(draws)
        if s["aniso"] > 0:
            factor = torch.where(self._gate(draws, "aniso"), torch.exp2(draws.normal(SCALE_STD)), 1.0)
            pixel_map = pixel_map @ _scale2d(factor, 1 / factor)
        if s["rotate"] > 0:
            pixel_map = pixel_map @ self._rotation(draws)
        if s["xfrac"] > 0:
            on = self._gate(draws, "xfrac")
            tx = torch.where(on, draws.normal(XFRAC_STD) * w, 0.0)
            ty = torch.where(on, draws.normal(XFRAC_STD) * h, 0.0)
            pixel_map = pixel_map @ _translate2d(tx, ty)
        return pixel_map

    def _rotation(self, draws: _Draws) -> Tensor:
        """The pre- or the post-rotation, each with 1 - sqrt(1 - p), so at least one happens with probability p."""
        prob = 1 - torch.sqrt((1 - self.p * self.strengths["rotate"]).clamp(0, 1))
        angle = torch.where(draws.gate(prob), draws.uniform(-math.pi, math.pi) * ROTATE_MAX, 0.0)
        return _rotate2d(angle.cos(), angle.sin())

    def _color(self, draws: _Draws) -> tuple[Tensor, Tensor]:
        """Per-sample linear part [N, C, C] and offset [N, C]: a pixel y becomes linear @ y + offset."""
        s, n, c = self.strengths, draws.n, self.channels
        linear = torch.eye(c, device=draws.device).expand(n, c, c)
        offset = torch.zeros(n, c, device=draws.device)

        def then(matrix: Tensor) -> None:  # apply a linear transform after everything so far
            nonlocal linear, offset
            linear, offset = matrix @ linear, (matrix @ offset.unsqueeze(2)).squeeze(2)

        if s["brightness"] > 0:
            shift = torch.where(self._gate(draws, "brightness"), draws.normal(BRIGHTNESS_STD), 0.0)
            offset = offset + shift[:, None]
        if s["contrast"] > 0:
            factor = torch.where(self._gate(draws, "contrast"), torch.exp2(draws.normal(CONTRAST_STD)), 1.0)
            then(factor[:, None, None] * torch.eye(c, device=draws.device))
        if c == 1:
            return linear, offset
        frame = _luma_frame(draws.device)
        one, zero = torch.ones(n, device=draws.device), torch.zeros(n, device=draws.device)
        if s["lumaflip"] > 0:  # Householder reflection I - 2 v v^T, half the time when gated
            flip = torch.where(self._gate(draws, "lumaflip"), draws.integers(2), 0.0)
            then(_luma_chroma_map(frame, 1 - 2 * flip, one, zero))
        if s["hue"] > 0:  # rotation by theta about v (Rodrigues)
            theta = torch.where(self._gate(draws, "hue"), draws.uniform(-math.pi, math.pi) * HUE_MAX, 0.0)
            then(_luma_chroma_map(frame, one, theta.cos(), theta.sin()))
        if s["saturation"] > 0:
            factor = torch.where(self._gate(draws, "saturation"), torch.exp2(draws.normal(SATURATION_STD)), 1.0)
            then(_luma_chroma_map(frame, one, factor, zero))
        return linear, offset

    def forward(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        if images.ndim != 4 or images.shape[1] != self.channels:
            raise ValueError(f"expected images [N, {self.channels}, H, W], got {list(images.shape)}")
        with torch.autocast(device_type=images.device.type, enabled=False):  # float32 whatever the caller's
            return self._augment(images, generator)

    def _augment(self, images: Tensor, generator: torch.Generator | None) -> Tensor:
        n, c, h, w = images.shape
        draws = _Draws(n, images.device, generator)
        dtype = torch.promote_types(images.dtype, torch.float32)
        x = images.to(dtype)
        if self._geometric_on:
            pixel_map = self._geometric(draws, h, w)
            moved = (pixel_map != torch.eye(3, device=images.device)).flatten(1).any(dim=1)
            x = torch.where(moved[:, None, None, None], _resample(x, pixel_map.to(dtype)), x)
        if self._color_on:
            linear, offset = self._color(draws)
            changed = (linear != torch.eye(c, device=images.device)).flatten(1).any(dim=1)
            changed = changed | (offset != 0).any(dim=1)
            linear, offset = linear.to(dtype), offset.to(dtype)
            recolored = torch.einsum("nij,njhw->nihw", linear, x) + offset[:, :, None, None]
            x = torch.where(changed[:, None, None, None], recolored, x)
        return x.to(images.dtype)

    def extra_repr(self) -> str:
        active = ", ".join(f"{name}={value:g}" for name, value in self.strengths.items() if value > 0)
        return f"channels={self.channels}, {active}"


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class AdaController:
    """Adjust ``AugmentPipe.p`` so that r_t = E[sign(D(real))] approaches ``target``.

    Call ``accumulate`` with D's logits on every real batch and ``update`` every ``interval`` D steps;
    each update moves p by sign(r_t - target) * batch_size * interval / (speed_kimg * 1000), so p can
    go from 0 to 1 in ``speed_kimg`` thousand real images. ``batch_size`` is the global batch."""

    def __init__(self, target: float = 0.6, interval: int = 4, speed_kimg: float = 500, *, batch_size: int) -> None:
        if interval < 1 or batch_size < 1 or speed_kimg <= 0:
            raise ValueError("AdaController needs interval >= 1, batch_size >= 1 and speed_kimg > 0")
        self.target = target
        self.interval = interval
        self.speed_kimg = speed_kimg
        self.batch_size = batch_size
        self.updates = 0
        self._totals: Tensor | None = None  # float64 (sum of sign(D(real)), count), on the logits' device

    @property
    def step_size(self) -> float:
        """How far one update moves p."""
        return self.batch_size * self.interval / (self.speed_kimg * 1000)

    def accumulate(self, real_logits: Tensor) -> None:
        """Add this batch's signs to the running totals, on the logits' device (no host sync)."""
        logits = real_logits.detach()
        if self._totals is None:
            self._totals = torch.zeros(2, dtype=torch.float64, device=logits.device)
        self._totals = self._totals.to(logits.device)  # after load_state_dict they sit on the CPU
        self._totals[0] += logits.sign().sum(dtype=torch.float64)
        self._totals[1] += logits.numel()

    def update(self, pipe: AugmentPipe) -> dict[str, float]:
        """Move ``pipe.p`` from the (all-ranks) totals, reset them, and report p and r_t as floats."""
        device = pipe.p.device
        totals = torch.zeros(2, dtype=torch.float64, device=device) if self._totals is None else self._totals
        totals = totals.to(device, copy=True)
        if _distributed():
            dist.all_reduce(totals)  # every rank then computes the same r_t and the same p
        signs, count = totals.unbind()
        rt = signs / count  # NaN when nothing was accumulated; p then stays put
        step = torch.where(count > 0, torch.sign(rt - self.target) * self.step_size, 0.0)
        with torch.no_grad():
            pipe.p.copy_((pipe.p + step).clamp(0, 1))
        self._totals = torch.zeros_like(totals)
        self.updates += 1
        p, rt_value = torch.stack([pipe.p.double(), rt]).tolist()  # the one host sync per interval
        return {"augment/p": p, "augment/rt": rt_value}

    def state_dict(self) -> dict[str, Tensor | int]:
        """Totals and update count (p itself is saved with the pipe); totals are returned on the CPU."""
        totals = torch.zeros(2, dtype=torch.float64) if self._totals is None else self._totals.detach().cpu()
        return {"totals": totals.clone(), "updates": self.updates}

    def load_state_dict(self, state: dict[str, Tensor | int]) -> None:
        totals = torch.as_tensor(state["totals"], dtype=torch.float64)
        if totals.shape != (2,):
            raise ValueError(f"AdaController state 'totals' must have shape (2,), got {tuple(totals.shape)}")
        self._totals = totals.clone()
        self.updates = int(state["updates"])

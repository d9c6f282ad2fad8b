"""Pixels in and out: generator output in [-1, 1] to uint8, uint8 images to PIL, and image grids."""

from __future__ import annotations

import math

import torch
from PIL import Image


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Generator output in [-1, 1] -> uint8 pixels (the inverse of the loader's ``to_float``)."""
    return images.add(1).mul(127.5).round().clamp(0, 255).to(torch.uint8)


def to_pil(image: torch.Tensor) -> Image.Image:
    """uint8 [C, H, W] -> a greyscale or RGB PIL image."""
    pixels = image.cpu().permute(1, 2, 0).numpy()
    return Image.fromarray(pixels[..., 0] if pixels.shape[2] == 1 else pixels)


def image_grid(images: torch.Tensor, nrow: int | None = None, pad: int = 2) -> Image.Image:
    """uint8 [N, C, H, W] -> rows of ``nrow`` images (default: a square-ish grid) on black, ``pad`` pixels apart."""
    from torchvision.utils import make_grid  # imported here: torchvision costs ~1 s, and only grids need it

    nrow = nrow or math.ceil(math.sqrt(images.shape[0]))
    grid = make_grid(images.cpu(), nrow=nrow, padding=pad)
    return to_pil(grid[:1] if images.shape[1] == 1 else grid)  # make_grid repeats grey into 3 channels

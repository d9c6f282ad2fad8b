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


def labelled_rows(images: torch.Tensor, names: list[str], pad: int = 2) -> Image.Image:
    """uint8 [rows * per_row, C, H, W] in row order -> a grid with one row per name, the name written to its
    left (the class x sample grid of a conditional generator)."""
    from PIL import ImageDraw

    per_row = images.shape[0] // len(names)
    grid = image_grid(images, nrow=per_row, pad=pad).convert("RGB")
    margin = 8 + 6 * max(len(n) for n in names)  # the default bitmap font is 6 px per character
    canvas = Image.new("RGB", (grid.width + margin, grid.height))
    canvas.paste(grid, (margin, 0))
    draw, row_height = ImageDraw.Draw(canvas), images.shape[2] + pad
    for i, name in enumerate(names):
        draw.text((4, pad + i * row_height + max(0, images.shape[2] // 2 - 5)), name, fill=(255, 255, 255))
    return canvas

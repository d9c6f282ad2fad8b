"""Images from a trained generator: numbered PNGs, a grid, and a latent interpolation strip."""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm import tqdm

from gan_dist.data.images import image_grid, to_pil, to_uint8
from gan_dist.models.io import load_generator

GRID_MAX = 64  # grid.png shows the first images only: a 10,000-image grid is no use to look at
INTERPOLATION_ROWS = 8


def slerp(z0: torch.Tensor, z1: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation, rows of ``z0``/``z1`` [N, D] at fractions ``t`` [K] -> [N, K, D].

    Gaussian latents concentrate on a sphere; a straight line between two cuts through its low-norm
    interior, which G rarely saw, while the great-circle path keeps the norm typical.
    """
    cos = torch.nn.functional.cosine_similarity(z0, z1, dim=1).clamp(-1, 1)
    omega = torch.acos(cos)[:, None, None]
    t = t[None, :, None]
    sin = torch.sin(omega)
    nearly_parallel = sin.abs() < 1e-6
    w0 = torch.where(nearly_parallel, 1 - t, torch.sin((1 - t) * omega) / torch.where(nearly_parallel, 1, sin))
    w1 = torch.where(nearly_parallel, t, torch.sin(t * omega) / torch.where(nearly_parallel, 1, sin))
    return w0 * z0[:, None] + w1 * z1[:, None]


@torch.no_grad()
def write_samples(
    source: str | Path,
    num: int,
    out_dir: str | Path,
    seed: int = 0,
    batch_size: int = 64,
    interpolate: int = 0,
) -> list[Path]:
    """Write ``sample-NNNNNN.png`` x ``num``, ``grid.png`` and, when ``interpolate`` = K >= 2,
    ``interpolation.png`` (8 rows of K frames, each row between two random latents).

    ``source``: a checkpoint directory or an exported generator file. Same seed, same images.
    """
    if num < 1:
        raise ValueError(f"num must be >= 1, got {num}")
    if interpolate == 1 or interpolate < 0:
        raise ValueError(f"interpolate needs at least 2 frames per row (or 0 for none), got {interpolate}")
    g, meta = load_generator(source)
    z_dim = meta["model"]["z_dim"]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    noise = torch.Generator().manual_seed(seed)
    written, grid_images = [], []
    with tqdm(total=num, desc="sample", unit="img") as bar:
        for start in range(0, num, batch_size):
            z = torch.randn(min(batch_size, num - start), z_dim, generator=noise)
            images = to_uint8(g(z))
            for i, image in enumerate(images):
                path = out_dir / f"sample-{start + i:06d}.png"
                to_pil(image).save(path)
                written.append(path)
            grid_images.extend(images[: max(0, GRID_MAX - len(grid_images))])
            bar.update(len(images))
    grid = out_dir / "grid.png"
    image_grid(torch.stack(grid_images)).save(grid)
    written.append(grid)
    if interpolate:
        # Own stream: the strip stays the same whatever ``num`` is.
        ends = torch.randn(2, INTERPOLATION_ROWS, z_dim, generator=torch.Generator().manual_seed(seed + 1))
        path_z = slerp(ends[0], ends[1], torch.linspace(0, 1, interpolate)).reshape(-1, z_dim)
        frames = torch.cat([to_uint8(g(chunk)) for chunk in path_z.split(batch_size)])
        strip = out_dir / "interpolation.png"
        image_grid(frames, nrow=interpolate).save(strip)
        written.append(strip)
    return written

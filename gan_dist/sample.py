"""Images from a trained generator: numbered PNGs, a grid, a latent interpolation strip and, for a style-based
G, truncated samples and a style-mixing grid.

Style-based generators (stylegan2) sample with constant noise inputs, so the same seed gives the same images,
and interpolate in W (the mapped styles, which are what the synthesis network sees); the others interpolate z
along a great circle.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm import tqdm

from gan_dist.data.images import image_grid, labelled_rows, to_pil, to_uint8
from gan_dist.models.io import generate, load_generator

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


class Sampler:
    """A loaded generator and how to draw from it: ``images(z)`` for any architecture, truncation ``psi``
    for a style-based one (1.0: none), the classes to draw for a conditional one (``classes``, cycled over
    the images; unset: drawn uniformly from ``seed``)."""

    def __init__(
        self, g: torch.nn.Module, meta: dict, truncation_psi: float = 1.0, classes: list[int] | None = None, seed: int = 0
    ) -> None:
        self.g, self.meta, self.psi = g, meta, truncation_psi
        self.z_dim = meta["model"]["z_dim"]
        self.num_classes = (meta["model"].get("num_classes") or 0) if meta["model"].get("conditional") else 0
        self.style_based = hasattr(g, "mapping")
        if truncation_psi != 1.0 and not self.style_based:
            raise ValueError(f"truncation needs a style-based generator (stylegan2); this one is {meta['model']['arch']}")
        if classes and not self.num_classes:
            raise ValueError("this generator is not conditional: it takes no class")
        if classes and not all(0 <= c < self.num_classes for c in classes):
            raise ValueError(f"classes must be in 0..{self.num_classes - 1} ({', '.join(self.class_names())}), got {classes}")
        self.classes, self._class_noise = classes, torch.Generator().manual_seed(seed + 3)

    def class_names(self) -> list[str]:
        return self.meta.get("class_names") or [str(c) for c in range(self.num_classes)]

    def labels(self, n: int) -> torch.Tensor | None:
        """The classes of the next ``n`` images: the requested ones in turn, else uniform draws."""
        if not self.num_classes:
            return None
        if self.classes:
            return torch.tensor(self.classes).repeat(n // len(self.classes) + 1)[:n]
        return torch.randint(self.num_classes, (n,), generator=self._class_noise)

    @torch.no_grad()
    def images(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """uint8 images [N, C, R, R] for latents z [N, z_dim] (a conditional G: ``labels`` or the next classes)."""
        return to_uint8(generate(self.g, z, self.psi, labels if labels is not None else self.labels(len(z))))

    @torch.no_grad()
    def styles(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """ws [N, num_ws, w_dim] of a style-based G, truncated by ``psi``."""
        labels = labels if labels is not None else self.labels(len(z))
        return self.g.mapping_forward(z, labels, truncation_psi=self.psi)

    @torch.no_grad()
    def class_grid(self, z: torch.Tensor) -> tuple[torch.Tensor, list[str]]:
        """The class x sample grid: one row per class (the requested ones, else the first 10), the latents
        ``z`` in every row."""
        rows = self.classes or list(range(min(self.num_classes, 10)))
        labels = torch.tensor(rows).repeat_interleave(len(z))
        names = self.class_names()
        return self.images(z.repeat(len(rows), 1), labels), [names[c] for c in rows]

    @torch.no_grad()
    def synthesize(self, ws: torch.Tensor) -> torch.Tensor:
        return to_uint8(self.g.synthesis_forward(ws, noise_mode="const"))

    @torch.no_grad()
    def interpolation(self, ends: torch.Tensor, frames: int, batch_size: int) -> torch.Tensor:
        """Rows of ``frames`` images from ``ends[0]`` to ``ends[1]`` latents: straight in W, slerp in z."""
        t = torch.linspace(0, 1, frames)
        rows = self.labels(len(ends[0]))  # a conditional G: one class per row
        if self.style_based:
            w0, w1 = self.styles(ends[0], rows), self.styles(ends[1], rows)
            path = torch.lerp(w0[:, None], w1[:, None], t[None, :, None, None]).flatten(0, 1)
            return torch.cat([self.synthesize(chunk) for chunk in path.split(batch_size)])
        path = slerp(ends[0], ends[1], t).reshape(-1, self.z_dim)
        labels = rows.repeat_interleave(frames) if rows is not None else torch.zeros(len(path), dtype=torch.long)
        return torch.cat([self.images(p, y if rows is not None else None) for p, y in zip(path.split(batch_size), labels.split(batch_size))])

    @torch.no_grad()
    def style_mixing_grid(self, rows: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
        """StyleGAN's figure: a blank corner, the column images on top, the row images down the left, and in
        each cell the row image with its coarse styles (the first half of the layers) from the column image."""
        w_rows, w_cols = self.styles(rows), self.styles(columns)
        coarse = self.g.num_ws // 2
        cells = [torch.cat([w_cols[j, :coarse], w_rows[i, coarse:]])[None] for i in range(len(rows)) for j in range(len(columns))]
        mixed = self.synthesize(torch.cat(cells)).view(len(rows), len(columns), *self.g_shape())
        top = torch.cat([torch.zeros(1, *self.g_shape(), dtype=torch.uint8), self.synthesize(w_cols)])
        body = torch.cat([torch.cat([self.synthesize(w_rows[i : i + 1]), mixed[i]]) for i in range(len(rows))])
        return torch.cat([top, body])

    def g_shape(self) -> tuple[int, int, int]:
        return (self.meta["channels"], self.meta["resolution"], self.meta["resolution"])


def write_samples(
    source: str | Path,
    num: int,
    out_dir: str | Path,
    seed: int = 0,
    batch_size: int = 64,
    interpolate: int = 0,
    truncation_psi: float = 1.0,
    style_mix: int = 0,
    classes: list[int] | None = None,
) -> list[Path]:
    """Write ``sample-NNNNNN.png`` x ``num``, ``grid.png``, and optionally ``interpolation.png`` (8 rows of
    ``interpolate`` frames between two random latents) and ``style_mixing.png`` (a ``style_mix`` x
    ``style_mix`` grid, style-based generators only). A conditional generator draws ``classes`` (in turn;
    unset: uniformly) and also writes ``classes.png``, one labelled row per class.

    ``source``: a checkpoint directory or an exported generator file. Same seed, same images.
    """
    if num < 1:
        raise ValueError(f"num must be >= 1, got {num}")
    if interpolate == 1 or interpolate < 0:
        raise ValueError(f"interpolate needs at least 2 frames per row (or 0 for none), got {interpolate}")
    if style_mix < 0:
        raise ValueError(f"style_mix must be >= 0, got {style_mix}")
    sampler = Sampler(*load_generator(source), truncation_psi=truncation_psi, classes=classes, seed=seed)
    if style_mix and not sampler.style_based:
        raise ValueError("a style-mixing grid needs a style-based generator (stylegan2)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    noise = torch.Generator().manual_seed(seed)
    written, grid_images = [], []
    with tqdm(total=num, desc="sample", unit="img") as bar:
        for start in range(0, num, batch_size):
            images = sampler.images(torch.randn(min(batch_size, num - start), sampler.z_dim, generator=noise))
            for i, image in enumerate(images):
                path = out_dir / f"sample-{start + i:06d}.png"
                to_pil(image).save(path)
                written.append(path)
            grid_images.extend(images[: max(0, GRID_MAX - len(grid_images))])
            bar.update(len(images))
    written.append(_save_grid(torch.stack(grid_images), out_dir / "grid.png"))
    if sampler.num_classes:
        row_z = torch.randn(8, sampler.z_dim, generator=torch.Generator().manual_seed(seed + 4))
        labelled_rows(*sampler.class_grid(row_z)).save(out_dir / "classes.png")
        written.append(out_dir / "classes.png")
    if interpolate:  # own stream: the strip stays the same whatever ``num`` is
        ends = torch.randn(2, INTERPOLATION_ROWS, sampler.z_dim, generator=torch.Generator().manual_seed(seed + 1))
        strip = sampler.interpolation(ends, interpolate, batch_size)
        written.append(_save_grid(strip, out_dir / "interpolation.png", nrow=interpolate))
    if style_mix:
        latents = torch.randn(2, style_mix, sampler.z_dim, generator=torch.Generator().manual_seed(seed + 2))
        grid = sampler.style_mixing_grid(latents[0], latents[1])
        written.append(_save_grid(grid, out_dir / "style_mixing.png", nrow=style_mix + 1))
    return written


def _save_grid(images: torch.Tensor, path: Path, nrow: int | None = None) -> Path:
    image_grid(images, nrow=nrow).save(path)
    return path

"""Differentiable augmentations for training GANs on little data, applied to everything D sees.

* ``diffaug``: DiffAugment (Zhao et al. 2020), fixed transforms on every image (``diffaugment``).
* ``ada``: the ADA pipeline of Karras et al. 2020 (``ada.AugmentPipe``), each transform with probability
  ``p``; ``ada.AdaController`` adapts p from D's outputs on reals, or p is set once and left fixed.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from gan_dist.augment.ada import AdaController, AugmentPipe
from gan_dist.augment.diffaugment import DiffAugment

AUGMENTS = ("none", "diffaug", "ada")


def build_augment(kind: str, channels: int, **options: Any) -> nn.Module | None:
    """The augmentation module for ``kind`` on ``channels``-channel images, or None for ``none``.

    ``options`` go to the constructor: ``policy`` for diffaug, the transform multipliers for ada."""
    if kind == "none":
        return None
    if kind == "diffaug":
        return DiffAugment(**options)
    if kind == "ada":
        return AugmentPipe(channels, **options)
    raise ValueError(f"unknown augment '{kind}'; valid kinds: {', '.join(AUGMENTS)}")


__all__ = ["AUGMENTS", "AdaController", "AugmentPipe", "DiffAugment", "build_augment"]

"""Class conditioning for the classic nets: how G is told the class, and how D judges the pair (image, class).

- ``ConditionalBatchNorm``: BatchNorm whose scale and shift are the class's own (the generators of SNGAN and
  BigGAN; de Vries et al. 2017), for dcgan and resnet G.
- ``Projection``: the projection discriminator's class term <embed(y), phi(x)> added to the unconditional logit
  (Miyato & Koyama 2018), for dcgan and resnet D.
- ``ClassEmbedding``: a learned class vector concatenated to z or to the flattened image (the CGAN of Mirza &
  Osindero 2014), for mlp G and D.
- ``ClassifierHead``: AC-GAN's auxiliary classifier on D's features (Odena et al. 2017), any classic D.

Labels are int64 class indices [N]; a conditional module refuses ``None``.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm as _spectral_norm

CLASS_EMBEDDING = 32  # size of the CGAN class vector concatenated in the mlp nets


def require_labels(labels: torch.Tensor | None, batch: int) -> torch.Tensor:
    if labels is None:
        raise ValueError("this model is conditional: pass class labels [N]")
    if labels.shape != (batch,) or labels.is_floating_point():
        raise ValueError(f"labels must be integer class indices of shape [{batch}], got {tuple(labels.shape)}")
    return labels


class ConditionalBatchNorm(nn.Module):
    """Normalise as BatchNorm (statistics over the batch), then scale and shift by the class's parameters."""

    takes_labels = True

    def __init__(self, features: int, num_classes: int, dims: int = 2) -> None:
        super().__init__()
        self.norm = (nn.BatchNorm2d if dims == 2 else nn.BatchNorm1d)(features, affine=False)
        self.scale = nn.Embedding(num_classes, features)
        self.shift = nn.Embedding(num_classes, features)
        nn.init.ones_(self.scale.weight)
        nn.init.zeros_(self.shift.weight)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        shape = (x.shape[0], -1) + (1,) * (x.dim() - 2)
        return self.norm(x) * self.scale(labels).view(shape) + self.shift(labels).view(shape)


def apply(layer: nn.Module, x: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    """``layer(x, labels)`` for a layer that takes labels (``takes_labels``), else ``layer(x)``."""
    return layer(x, labels) if getattr(layer, "takes_labels", False) else layer(x)


class Conditioned(nn.Sequential):
    """A Sequential that hands the labels to the layers that take them."""

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        for layer in self:
            x = apply(layer, x, labels)
        return x


def batch_norm(features: int, num_classes: int, dims: int = 2) -> nn.Module:
    """Plain BatchNorm for an unconditional G, the class's own scale and shift for a conditional one."""
    if num_classes:
        return ConditionalBatchNorm(features, num_classes, dims)
    return nn.BatchNorm2d(features) if dims == 2 else nn.BatchNorm1d(features)


class Projection(nn.Module):
    """<embed(y), phi(x)>: a per-class direction in D's feature space (spectrally normalised with D)."""

    def __init__(self, num_classes: int, features: int, spectral_norm: bool = False) -> None:
        super().__init__()
        embed = nn.Embedding(num_classes, features)
        nn.init.xavier_uniform_(embed.weight)
        self.embed = _spectral_norm(embed) if spectral_norm else embed

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return (self.embed(labels) * features).sum(dim=1)


class ClassEmbedding(nn.Module):
    """``x`` with a learned class vector concatenated along dimension 1."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(num_classes, CLASS_EMBEDDING)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.embed(labels).to(x.dtype)], dim=1)


class ClassifierHead(nn.Module):
    """AC-GAN: class logits [N, num_classes] from D's features."""

    def __init__(self, features: int, num_classes: int, spectral_norm: bool = False) -> None:
        super().__init__()
        linear = nn.Linear(features, num_classes)
        self.linear = _spectral_norm(linear) if spectral_norm else linear

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(features)


class ConditionalCritic(nn.Module):
    """What a classic D adds on top of its features phi(x) [N, F] and unconditional logit: the class term
    (projection, or nothing for mlp, whose input already carries the class) and, for AC-GAN, the class logits.
    ``forward`` returns the logit [N], or (logit, class logits) with the classifier head."""

    def __init__(self, features: int, num_classes: int, project: bool, classify: bool, spectral_norm: bool) -> None:
        super().__init__()
        self.projection = Projection(num_classes, features, spectral_norm) if num_classes and project else None
        self.classifier = ClassifierHead(features, num_classes, spectral_norm) if classify else None

    def forward(
        self, logit: torch.Tensor, features: torch.Tensor, labels: torch.Tensor | None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if self.projection is not None:
            logit = logit + self.projection(features, require_labels(labels, features.shape[0]))
        if self.classifier is None:
            return logit
        return logit, self.classifier(features)

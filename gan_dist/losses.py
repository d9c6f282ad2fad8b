"""GAN losses on raw discriminator logits, plus the WGAN-GP and R1 gradient penalties.

Notation: r = D(x) on real images, f = D(G(z)) on fakes, E = batch mean, sigma = sigmoid.
Log-sigmoid terms use softplus: -log sigma(t) = softplus(-t), -log(1 - sigma(t)) = softplus(t),
which stays finite for large |t|. Logits are promoted to float32 before any maths.

====================  =====================================  ==========================
name                  L_D                                    L_G
====================  =====================================  ==========================
minimax               -E[log sigma(r)] - E[log(1-sigma(f))]  E[log(1 - sigma(f))]
nonsaturating         same as minimax                        -E[log sigma(f)]
lsgan                 1/2 E[(r-1)^2] + 1/2 E[f^2]            1/2 E[(f-1)^2]
wgan, wgan-gp         E[f] - E[r]                            -E[f]
hinge                 E[relu(1-r)] + E[relu(1+f)]            -E[f]
====================  =====================================  ==========================

WGAN weight clipping and the gradient-penalty term are applied by the training loop.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


_LossD = Callable[[Tensor, Tensor], Tensor]
_LossG = Callable[[Tensor], Tensor]


def _bce_d(r: Tensor, f: Tensor) -> Tensor:
    return F.softplus(-r).mean() + F.softplus(f).mean()


def _wasserstein_d(r: Tensor, f: Tensor) -> Tensor:
    return f.mean() - r.mean()


def _neg_mean_g(f: Tensor) -> Tensor:
    return -f.mean()


_D_LOSSES: dict[str, _LossD] = {
    "minimax": _bce_d,
    "nonsaturating": _bce_d,
    "lsgan": lambda r, f: 0.5 * (r - 1).square().mean() + 0.5 * f.square().mean(),
    "wgan": _wasserstein_d,
    "wgan-gp": _wasserstein_d,
    "hinge": lambda r, f: F.relu(1 - r).mean() + F.relu(1 + f).mean(),
}

_G_LOSSES: dict[str, _LossG] = {
    "minimax": lambda f: -F.softplus(f).mean(),  # log(1 - sigma(f)) = -softplus(f)
    "nonsaturating": lambda f: F.softplus(-f).mean(),
    "lsgan": lambda f: 0.5 * (f - 1).square().mean(),
    "wgan": _neg_mean_g,
    "wgan-gp": _neg_mean_g,
    "hinge": _neg_mean_g,
}


LOSSES = tuple(_D_LOSSES)  # the registry the config validates ``loss.name`` against


def _lookup(table: dict[str, Callable[..., Tensor]], name: str) -> Callable[..., Tensor]:
    try:
        return table[name]
    except KeyError:
        raise ValueError(f"unknown loss '{name}'; valid names: {', '.join(LOSSES)}") from None


def discriminator_loss(name: str, real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """Scalar L_D of loss ``name`` (see the module table) from D's logits on real and fake images."""
    return _lookup(_D_LOSSES, name)(real_logits.float(), fake_logits.float())


def generator_loss(name: str, fake_logits: Tensor) -> Tensor:
    """Scalar L_G of loss ``name`` (see the module table) from D's logits on fake images."""
    return _lookup(_G_LOSSES, name)(fake_logits.float())


def _input_gradient(discriminator: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """dD/dx per sample, flattened to [N, -1], kept in the graph for a double backward."""
    x = x.requires_grad_(True)
    out = discriminator(x).float()
    (grad,) = torch.autograd.grad(out.sum(), x, create_graph=True)
    return grad.flatten(1)


def gradient_penalty(
    discriminator: Callable[[Tensor], Tensor], real: Tensor, fake: Tensor, eps: Tensor | None = None
) -> Tensor:
    """WGAN-GP (Gulrajani et al. 2017): E[(||grad_x D(x_hat)||_2 - 1)^2].

    x_hat = eps * real + (1 - eps) * fake with per-sample eps [N] ~ U[0, 1] (drawn here if not given).
    Computed in float32 with autocast off; differentiable w.r.t. D's parameters. Multiply by the GP
    weight (lambda) outside.
    """
    with torch.autocast(device_type=real.device.type, enabled=False):
        real, fake = real.detach().float(), fake.detach().float()
        eps = torch.rand(real.shape[0], device=real.device) if eps is None else eps.to(real.device, torch.float32)
        eps = eps.view(-1, *(1,) * (real.dim() - 1))
        grad = _input_gradient(discriminator, eps * real + (1 - eps) * fake)
        return (torch.linalg.vector_norm(grad, dim=1) - 1).square().mean()


def path_lengths(images: Tensor, ws: Tensor) -> Tensor:
    """Per-sample ||J_w^T y||_2 (Karras et al. 2020): J the Jacobian of the images w.r.t. the styles ``ws``
    [N, num_ws, w_dim], y ~ N(0, I) / sqrt(H*W) image noise; averaged over the style layers as StyleGAN2
    does. In the graph for a double backward; the penalty is E[(length - a)^2], a the running mean."""
    noise = torch.randn_like(images) / math.sqrt(images.shape[2] * images.shape[3])
    (grads,) = torch.autograd.grad((images * noise).sum(), ws, create_graph=True)
    return grads.float().square().sum(2).mean(1).sqrt()


def r1_penalty(discriminator: Callable[[Tensor], Tensor], real: Tensor) -> Tensor:
    """R1 (Mescheder et al. 2018): E[||grad_x D(x)||_2^2] on real data, in float32.

    Differentiable w.r.t. D's parameters; the caller scales it by gamma/2 (times the lazy interval).
    """
    with torch.autocast(device_type=real.device.type, enabled=False):
        grad = _input_gradient(discriminator, real.detach().float())
        return grad.square().sum(dim=1).mean()

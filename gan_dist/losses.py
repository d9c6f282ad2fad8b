"""GAN losses on raw discriminator logits, plus the WGAN-GP gradient penalty and the zero-centred R1/R2 penalties.

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
rpgan                 E[softplus(f - r)]                     E[softplus(r - f)]
====================  =====================================  ==========================

rpgan is the relativistic pairing GAN (Jolicoeur-Martineau 2019; R3GAN, Huang et al. 2024): each fake is judged
against a real image, pair by pair (r and f of the same length), so its G step needs D's logits on real images too.
WGAN weight clipping and the gradient-penalty term are applied by the training loop.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


_LossD = Callable[[Tensor, Tensor], Tensor]
_LossG = Callable[[Tensor, Tensor | None], Tensor]  # (f, r): r only for the relativistic losses


def _bce_d(r: Tensor, f: Tensor) -> Tensor:
    return F.softplus(-r).mean() + F.softplus(f).mean()


def _wasserstein_d(r: Tensor, f: Tensor) -> Tensor:
    return f.mean() - r.mean()


def _neg_mean_g(f: Tensor, r: Tensor | None) -> Tensor:
    return -f.mean()


_D_LOSSES: dict[str, _LossD] = {
    "minimax": _bce_d,
    "nonsaturating": _bce_d,
    "lsgan": lambda r, f: 0.5 * (r - 1).square().mean() + 0.5 * f.square().mean(),
    "wgan": _wasserstein_d,
    "wgan-gp": _wasserstein_d,
    "hinge": lambda r, f: F.relu(1 - r).mean() + F.relu(1 + f).mean(),
    "rpgan": lambda r, f: F.softplus(f - r).mean(),  # -log sigma(r - f)
}

_G_LOSSES: dict[str, _LossG] = {
    "minimax": lambda f, r: -F.softplus(f).mean(),  # log(1 - sigma(f)) = -softplus(f)
    "nonsaturating": lambda f, r: F.softplus(-f).mean(),
    "lsgan": lambda f, r: 0.5 * (f - 1).square().mean(),
    "wgan": _neg_mean_g,
    "wgan-gp": _neg_mean_g,
    "hinge": _neg_mean_g,
    "rpgan": lambda f, r: F.softplus(r - f).mean(),  # -log sigma(f - r)
}


LOSSES = tuple(_D_LOSSES)  # the registry the config validates ``loss.name`` against
RELATIVISTIC = ("rpgan",)  # losses whose G step judges fakes against reals


def _lookup(table: dict[str, Callable[..., Tensor]], name: str) -> Callable[..., Tensor]:
    try:
        return table[name]
    except KeyError:
        raise ValueError(f"unknown loss '{name}'; valid names: {', '.join(LOSSES)}") from None


def discriminator_loss(name: str, real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """Scalar L_D of loss ``name`` (see the module table) from D's logits on real and fake images."""
    if name in RELATIVISTIC and real_logits.shape != fake_logits.shape:
        raise ValueError(f"loss '{name}' pairs every fake with a real image: got {len(real_logits)} real logits "
                         f"for {len(fake_logits)} fakes")
    return _lookup(_D_LOSSES, name)(real_logits.float(), fake_logits.float())


def generator_loss(name: str, fake_logits: Tensor, real_logits: Tensor | None = None) -> Tensor:
    """Scalar L_G of loss ``name`` (see the module table) from D's logits on fake images (and, for a
    relativistic loss, on as many real images)."""
    if name in RELATIVISTIC:
        if real_logits is None or real_logits.shape != fake_logits.shape:
            raise ValueError(f"loss '{name}' pairs every fake with a real image: pass real logits of the fakes' shape")
        real_logits = real_logits.float()
    return _lookup(_G_LOSSES, name)(fake_logits.float(), real_logits)


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


def zero_centred_penalty(discriminator: Callable[[Tensor], Tensor], images: Tensor) -> Tensor:
    """E[||grad_x D(x)||_2^2] over ``images``, in float32: R1 on real images (Mescheder et al. 2018), R2 on
    fakes (R3GAN pairs both with its relativistic loss).

    Differentiable w.r.t. D's parameters; the caller scales it by gamma/2 (times the lazy interval).
    """
    with torch.autocast(device_type=images.device.type, enabled=False):
        grad = _input_gradient(discriminator, images.detach().float())
        return grad.square().sum(dim=1).mean()

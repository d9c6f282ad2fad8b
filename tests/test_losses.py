"""GAN losses and gradient penalties checked against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from gan_dist.losses import LOSSES, discriminator_loss, generator_loss, gradient_penalty, zero_centred_penalty

REAL = [2.0, -1.0]
FAKE = [0.5, -3.0]


def _sigmoid(t: float) -> float:
    return 1.0 / (1.0 + math.exp(-t))


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _bce_d() -> float:
    return -_mean([math.log(_sigmoid(r)) for r in REAL]) - _mean([math.log(1 - _sigmoid(f)) for f in FAKE])


EXPECTED_D = {
    "minimax": _bce_d(),
    "nonsaturating": _bce_d(),
    "lsgan": 0.5 * _mean([(r - 1) ** 2 for r in REAL]) + 0.5 * _mean([f**2 for f in FAKE]),
    "wgan": _mean(FAKE) - _mean(REAL),
    "wgan-gp": _mean(FAKE) - _mean(REAL),
    "hinge": _mean([max(0.0, 1 - r) for r in REAL]) + _mean([max(0.0, 1 + f) for f in FAKE]),
    "rpgan": -_mean([math.log(_sigmoid(r - f)) for r, f in zip(REAL, FAKE)]),
}
EXPECTED_G = {
    "minimax": _mean([math.log(1 - _sigmoid(f)) for f in FAKE]),
    "nonsaturating": -_mean([math.log(_sigmoid(f)) for f in FAKE]),
    "lsgan": 0.5 * _mean([(f - 1) ** 2 for f in FAKE]),
    "wgan": -_mean(FAKE),
    "wgan-gp": -_mean(FAKE),
    "hinge": -_mean(FAKE),
    "rpgan": -_mean([math.log(_sigmoid(f - r)) for r, f in zip(REAL, FAKE)]),
}


def test_loss_names_match_config() -> None:
    assert LOSSES == tuple(EXPECTED_D) == tuple(EXPECTED_G)


@pytest.mark.parametrize("name", LOSSES)
def test_discriminator_loss_values(name: str) -> None:
    loss = discriminator_loss(name, torch.tensor(REAL), torch.tensor(FAKE))
    assert loss.shape == ()
    assert loss.item() == pytest.approx(EXPECTED_D[name], rel=1e-6)


@pytest.mark.parametrize("name", LOSSES)
def test_generator_loss_values(name: str) -> None:
    loss = generator_loss(name, torch.tensor(FAKE), torch.tensor(REAL))
    assert loss.shape == ()
    assert loss.item() == pytest.approx(EXPECTED_G[name], rel=1e-6)


def test_hand_worked_numbers() -> None:
    # Spot checks written out fully, independent of the helper formulas above.
    assert EXPECTED_D["lsgan"] == pytest.approx(0.5 * (1 + 4) / 2 + 0.5 * (0.25 + 9) / 2)
    assert EXPECTED_D["hinge"] == pytest.approx((0 + 2) / 2 + (1.5 + 0) / 2)
    assert EXPECTED_D["wgan"] == pytest.approx(-1.25 - 0.5)
    softplus = lambda t: math.log1p(math.exp(t))  # noqa: E731
    assert EXPECTED_D["minimax"] == pytest.approx((softplus(-2) + softplus(1)) / 2 + (softplus(0.5) + softplus(-3)) / 2)
    # RpGAN pairs (r, f) = (2, 0.5) and (-1, -3): D sees margins 1.5 and 2, G the opposite ones.
    assert EXPECTED_D["rpgan"] == pytest.approx((softplus(-1.5) + softplus(-2)) / 2)
    assert EXPECTED_G["rpgan"] == pytest.approx((softplus(1.5) + softplus(2)) / 2)


def test_rpgan_judges_each_fake_against_its_real_pair() -> None:
    """Only the margins r - f matter: shifting every logit by one constant leaves both losses unchanged, and the
    G loss's gradient flows to the fakes only (reals are data), -sigma(r - f)/n per fake."""
    real, fake = torch.tensor(REAL), torch.tensor(FAKE, requires_grad=True)
    shifted = discriminator_loss("rpgan", real + 7, fake.detach() + 7)
    assert shifted.item() == pytest.approx(EXPECTED_D["rpgan"], rel=1e-6)
    (grad,) = torch.autograd.grad(generator_loss("rpgan", fake, real), fake)
    assert grad.tolist() == pytest.approx([-_sigmoid(r - f) / 2 for r, f in zip(REAL, FAKE)], rel=1e-6)
    with pytest.raises(ValueError, match="pairs every fake"):
        generator_loss("rpgan", fake)
    with pytest.raises(ValueError, match="pairs every fake"):
        discriminator_loss("rpgan", real, torch.zeros(3))


def test_minimax_vs_nonsaturating_generator() -> None:
    fake = torch.tensor(FAKE, requires_grad=True)
    saturating = generator_loss("minimax", fake)
    (g_sat,) = torch.autograd.grad(saturating, fake)
    nonsat = generator_loss("nonsaturating", fake)
    (g_ns,) = torch.autograd.grad(nonsat, fake)
    # Minimax L_G is bounded above by 0 and is negative; non-saturating is positive.
    assert saturating.item() < 0 < nonsat.item()
    # d/df of mean log(1 - sigma(f)) is -sigma(f)/n; of -mean log sigma(f) it is -(1 - sigma(f))/n.
    n = len(FAKE)
    assert g_sat.tolist() == pytest.approx([-_sigmoid(f) / n for f in FAKE], rel=1e-6)
    assert g_ns.tolist() == pytest.approx([-(1 - _sigmoid(f)) / n for f in FAKE], rel=1e-6)
    # The point of the trick: where D confidently rejects fakes (f = -3) the saturating gradient
    # vanishes while the non-saturating one stays near its maximum.
    assert abs(g_sat[1]) < 0.05 * abs(g_ns[1])


def test_losses_are_finite_for_extreme_logits() -> None:
    big = torch.tensor([200.0, -200.0])
    for name in LOSSES:
        assert torch.isfinite(discriminator_loss(name, big, -big))
        assert torch.isfinite(generator_loss(name, big, -big))


def test_low_precision_logits_give_float32_loss() -> None:
    real, fake = torch.tensor(REAL, dtype=torch.bfloat16), torch.tensor(FAKE, dtype=torch.float16)
    loss = discriminator_loss("nonsaturating", real, fake)
    assert loss.dtype == torch.float32


def test_unknown_loss_name_raises() -> None:
    with pytest.raises(ValueError, match="wgan-gp"):
        discriminator_loss("wasserstein", torch.zeros(2), torch.zeros(2))
    with pytest.raises(ValueError, match="valid names"):
        generator_loss("bogus", torch.zeros(2))


class LinearCritic(nn.Module):
    """D(x) = <w, x> per sample: its input gradient is w everywhere."""

    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        self.w = nn.Parameter(w.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) @ self.w


W = torch.tensor([0.3, -1.2, 2.0, 0.5, 0.0, 1.1])


def test_gradient_penalty_linear_critic_is_exact() -> None:
    critic = LinearCritic(W)
    real, fake = torch.randn(5, 1, 2, 3), torch.randn(5, 1, 2, 3)
    gp = gradient_penalty(critic, real, fake)
    norm = W.norm().item()
    assert gp.item() == pytest.approx((norm - 1) ** 2, rel=1e-5)
    # Double backward into D's parameters: d/dw (||w|| - 1)^2 = 2 (||w|| - 1) w / ||w||.
    gp.backward()
    expected = 2 * (norm - 1) * W / norm
    torch.testing.assert_close(critic.w.grad, expected, rtol=1e-5, atol=1e-6)


def test_r1_linear_critic_and_its_gradient() -> None:
    critic = LinearCritic(W)
    r1 = zero_centred_penalty(critic, torch.randn(4, 6))
    assert r1.item() == pytest.approx(W.square().sum().item(), rel=1e-5)
    r1.backward()  # d/dw ||w||^2 = 2w
    torch.testing.assert_close(critic.w.grad, 2 * W, rtol=1e-5, atol=1e-6)


def test_r2_on_fakes_of_a_quadratic_critic() -> None:
    """R2 is the same penalty on fakes: for D(x) = a * sum(x^2) the input gradient is 2ax, so the penalty is
    E[4 a^2 ||x||^2] and its derivative in a is E[8 a ||x||^2]."""
    a = nn.Parameter(torch.tensor(0.7))
    fakes = torch.tensor([[1.0, 2.0, 0.0], [0.0, -1.0, 3.0]])  # ||x||^2 = 5 and 10
    r2 = zero_centred_penalty(lambda x: a * x.square().sum(1), fakes)
    assert r2.item() == pytest.approx(4 * 0.49 * 7.5, rel=1e-6)
    r2.backward()
    assert a.grad.item() == pytest.approx(8 * 0.7 * 7.5, rel=1e-6)


class QuadraticCritic(nn.Module):
    """D(x) = sum_i a_i x_i^2 per sample: input gradient 2 a * x, varying along the interpolation."""

    def __init__(self, a: torch.Tensor) -> None:
        super().__init__()
        self.a = nn.Parameter(a.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.square() * self.a).sum(dim=1)


def test_gradient_penalty_quadratic_critic_matches_finite_differences() -> None:
    torch.manual_seed(0)
    a = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    critic = QuadraticCritic(a.float())
    real, fake = torch.randn(4, 3), torch.randn(4, 3)
    eps = torch.rand(4, generator=torch.Generator().manual_seed(7))
    gp = gradient_penalty(critic, real, fake, eps=eps)

    # The same interpolation, then gradients by central differences in float64.
    x_hat = eps[:, None].double() * real.double() + (1 - eps[:, None].double()) * fake.double()
    h = 1e-5
    quad = lambda x: (x.square() * a).sum(dim=1)  # noqa: E731
    basis = torch.eye(3, dtype=torch.float64)
    grads = torch.stack([(quad(x_hat + h * e) - quad(x_hat - h * e)) / (2 * h) for e in basis], dim=1)
    expected = (grads.norm(dim=1) - 1).square().mean()
    assert gp.item() == pytest.approx(expected.item(), rel=1e-4)

    gp.backward()
    assert critic.a.grad is not None and torch.isfinite(critic.a.grad).all()
    assert critic.a.grad.abs().sum() > 0


def test_gradient_penalty_draws_its_own_mixing_weights_from_the_global_rng() -> None:
    critic = QuadraticCritic(torch.tensor([1.0, 2.0, 3.0]))
    real, fake = torch.randn(8, 3), torch.randn(8, 3)
    torch.manual_seed(1)
    first = gradient_penalty(critic, real, fake)
    torch.manual_seed(1)
    assert gradient_penalty(critic, real, fake).item() == first.item()
    eps = torch.rand(8, generator=torch.Generator().manual_seed(1))
    assert gradient_penalty(critic, real, fake, eps=eps).item() != gradient_penalty(critic, real, fake, eps=1 - eps).item()


def test_penalties_detach_inputs_and_ignore_autocast() -> None:
    critic = LinearCritic(W)
    fake_source = torch.randn(3, 6, requires_grad=True)  # stands in for G's parameters
    fake = fake_source * 2
    real = torch.randn(3, 6)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        gp = gradient_penalty(critic, real, fake)
        r1 = zero_centred_penalty(critic, real)
    assert gp.dtype == r1.dtype == torch.float32
    assert gp.item() == pytest.approx((W.norm().item() - 1) ** 2, rel=1e-5)
    (gp + r1).backward()
    assert fake_source.grad is None  # no gradient leaks into the generator
    assert not real.requires_grad


def test_gradient_penalty_through_a_conv_discriminator() -> None:
    from gan_dist.models import model_config
    from gan_dist.models import build_discriminator

    d = build_discriminator(model_config({"arch": "resnet", "d_width": 4}), 32, 1)
    real, fake = torch.rand(2, 1, 32, 32) * 2 - 1, torch.rand(2, 1, 32, 32) * 2 - 1
    (gradient_penalty(d, real, fake) + zero_centred_penalty(d, real)).backward()
    # Every weight shapes D's input gradient; biases only move ReLU kinks (zero or no gradient).
    weights = [p for name, p in d.named_parameters() if name.endswith("weight.original")]
    assert len(weights) == 10
    for w in weights:
        assert w.grad is not None and torch.isfinite(w.grad).all() and w.grad.abs().sum() > 0


def test_path_lengths_of_a_linear_generator_by_hand() -> None:
    """images = ws·A (every style layer alike): d<images, y>/d ws[n, l] = A y_n for each layer l, so the
    length is ||A y_n||_2 with y the scaled image noise (StyleGAN2: y ~ N(0, I)/sqrt(H W))."""
    from gan_dist.losses import path_lengths

    n, layers, w_dim, c, h, w = 3, 4, 5, 2, 3, 3
    a = torch.randn(w_dim, c * h * w, generator=torch.Generator().manual_seed(1)).requires_grad_()
    ws = torch.randn(n, layers, w_dim, requires_grad=True)
    images = (ws.sum(1) @ a).view(n, c, h, w)
    torch.manual_seed(7)
    lengths = path_lengths(images, ws)
    torch.manual_seed(7)
    y = torch.randn(n, c, h, w) / (h * w) ** 0.5
    expected = (y.view(n, -1) @ a.T).norm(dim=1)
    torch.testing.assert_close(lengths, expected)
    lengths.sum().backward()  # differentiable: the penalty's double backward reaches G's weights (here A)
    assert a.grad is not None and torch.isfinite(a.grad).all() and a.grad.abs().sum() > 0

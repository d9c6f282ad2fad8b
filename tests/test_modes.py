"""StackedMNIST (``prepare stacked-mnist:SRC``), the per-channel classifier and the mode-coverage metrics: the
maths by hand, real StackedMNIST covering its 1,000 modes, and generators collapsed by construction."""

from __future__ import annotations

import gzip
import io
import math
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gan_dist.data.loader import to_float
from gan_dist.data.manifest import read_manifest
from gan_dist.data.prepare import prepare
from gan_dist.data.subset import read_images
from gan_dist.metrics.classifier import ClassifierExtractor, channel_classes, joint_log_probs, train_classifier
from gan_dist.metrics.modes import mode_metrics
from gan_dist.metrics.runner import evaluate_generator_distributed, real_statistics
from gan_dist.storage import StorageConfig

MNIST_DIR = Path(__file__).resolve().parents[2] / "shared/data/mnist"
TEST_SPLIT = ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
SAMPLES = 20_000  # ~20 samples per mode: every one of the 1,000 present (the rarest holds 7)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny networks: intra-op threads only make two busy cores wait for each other (see test_evaluate.py)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def mnist_test_split(tmp_path_factory) -> Path:
    """A folder with only the MNIST test split (links), so the digits used are known whatever else is beside it."""
    if not all((MNIST_DIR / name).is_file() for name in TEST_SPLIT):
        pytest.skip(f"MNIST test split not found in {MNIST_DIR}")
    folder = tmp_path_factory.mktemp("mnist")
    for name in TEST_SPLIT:
        (folder / name).symlink_to(MNIST_DIR / name)
    return folder


@pytest.fixture(scope="module")
def stacked(mnist_test_split, tmp_path_factory) -> Path:
    """StackedMNIST at 28 px (no resize: channels are MNIST's pixels), 20,000 samples in 20 shards."""
    out = tmp_path_factory.mktemp("stacked")
    prepare(f"stacked-mnist:{mnist_test_split}?samples={SAMPLES}", str(out), resolution=28, channels=3,
            progress=False, processes=2)
    return out


@pytest.fixture(scope="module")
def classifier(stacked, tmp_path_factory) -> Path:
    """A digit classifier applied to each channel: the 1,000-way mode classifier."""
    out = tmp_path_factory.mktemp("classifier") / "stacked.pt"
    return train_classifier(str(stacked), StorageConfig(), 28, 3, out, steps=600, width=16, max_images=5000,
                            per_channel=10)


def _idx(path: Path, header: int) -> np.ndarray:
    return np.frombuffer(gzip.decompress(path.read_bytes()), np.uint8, offset=header).astype(np.int64)


def test_prepare_writes_1000_modes_labelled_by_the_channels_digits(stacked, mnist_test_split, tmp_path):
    m = read_manifest(stacked)
    assert m.num_samples == SAMPLES and m.channels == 3 and len(m.shards) == 20
    assert m.labels == [f"{mode:03d}" for mode in range(1000)]
    assert len(m.class_counts) == 1000 and min(m.class_counts) > 0 and sum(m.class_counts) == SAMPLES

    # Every stored channel is an MNIST digit, pixel for pixel, and the label is those digits' labels.
    digits = _idx(mnist_test_split / TEST_SPLIT[0], 16).reshape(-1, 28, 28)
    digit_labels = _idx(mnist_test_split / TEST_SPLIT[1], 8)
    with tarfile.open(stacked / "shard-000003.tar") as tar:
        keys = sorted({name.split(".")[0] for name in tar.getnames()})[:40]
        for key in keys:
            pixels = np.asarray(Image.open(io.BytesIO(tar.extractfile(f"{key}.png").read())))
            label = int(tar.extractfile(f"{key}.cls").read())
            found = [digit_labels[(digits == pixels[..., c]).all(axis=(1, 2))] for c in range(3)]
            assert all(len(f) and (f == f[0]).all() for f in found)  # each channel is a digit (dupes agree)
            assert label == 100 * found[0][0] + 10 * found[1][0] + found[2][0]

    # Seeded: the same seed gives the same shards, another seed other digits; a grey dataset is refused.
    source = f"stacked-mnist:{mnist_test_split}?samples=300"
    runs = [prepare(source, str(tmp_path / name), resolution=28, channels=3, progress=False, seed=seed)
            for name, seed in (("a", 0), ("b", 0), ("c", 1))]
    assert runs[0].num_samples == 300 and runs[0].shards[0].sha256 == runs[1].shards[0].sha256
    assert runs[0].shards[0].sha256 != runs[2].shards[0].sha256
    with pytest.raises(ValueError, match="channels=3"):
        prepare(source, str(tmp_path / "grey"), resolution=28, channels=1, progress=False)
    with pytest.raises(ValueError, match="labels files"):
        prepare(f"stacked-mnist:{tmp_path / 'a'}", str(tmp_path / "none"), resolution=28, channels=3, progress=False)


def test_mode_metrics_by_hand():
    data = [2, 1, 1]  # p_data = (1/2, 1/4, 1/4)
    assert mode_metrics(torch.tensor([0, 1, 2, 0]), data) == {"modes": 3.0, "mode_kl": pytest.approx(0.0, abs=1e-12)}
    # p_fake = (1/2, 1/2, 0): 1/2·ln(1) + 1/2·ln(2); the empty fake bin adds nothing
    assert mode_metrics(torch.tensor([0, 1, 0, 1]), data) == {"modes": 2.0, "mode_kl": pytest.approx(0.5 * math.log(2))}
    # A class without data counts half a sample: p_data = (3, 0.5, 1) / 4.5, p_fake = (1/2, 1/2, 0)
    kl = 0.5 * math.log(0.5 / (3 / 4.5)) + 0.5 * math.log(0.5 / (0.5 / 4.5))
    assert mode_metrics(torch.tensor([1, 0]), [3, 0, 1]) == {"modes": 2.0, "mode_kl": pytest.approx(kl)}
    assert mode_metrics(torch.tensor([2, 2, 2]), [1, 1, 1, 1])["mode_kl"] == pytest.approx(math.log(4))
    with pytest.raises(ValueError, match="does not match"):
        mode_metrics(torch.tensor([0, 3]), data)


def test_per_channel_classes_combine_into_the_stacked_class():
    torch.testing.assert_close(channel_classes(torch.tensor([372, 5, 999]), 10, 3),
                               torch.tensor([[3, 7, 2], [0, 0, 5], [9, 9, 9]]))
    channel_logits = torch.randn(4, 3, 10)
    joint = joint_log_probs(channel_logits)
    assert joint.shape == (4, 1000)
    torch.testing.assert_close(joint.logsumexp(1), torch.zeros(4))  # a distribution over the 1,000 modes
    p = channel_logits.softmax(-1)
    torch.testing.assert_close(joint[:, 372].exp(), p[:, 0, 3] * p[:, 1, 7] * p[:, 2, 2])
    torch.testing.assert_close(channel_classes(joint.argmax(1), 10, 3), channel_logits.argmax(-1))


def test_real_stackedmnist_covers_its_modes_with_a_kl_near_zero(stacked, classifier):
    extractor = ClassifierExtractor(classifier)
    assert extractor.num_classes == 1000 and extractor.meta["per_channel"] == 10
    assert extractor.meta["holdout_channel_accuracy"] > 0.95 and extractor.meta["holdout_accuracy"] > 0.85
    pairs = list(read_images(str(stacked), StorageConfig(), 28, 3, 10_000, labels=True))
    images, labels = torch.stack([image for image, _ in pairs]), torch.tensor([label for _, label in pairs])
    features, logits = extractor(to_float(images[:8], "cpu"))
    assert features.shape == (8, 3 * 128) and logits.shape == (8, 1000)
    predicted = torch.cat([extractor(to_float(batch, "cpu"))[1].argmax(1) for batch in images.split(500)])
    assert (predicted == labels).float().mean() > 0.85
    scores = mode_metrics(predicted, read_manifest(stacked).class_counts)
    assert scores["modes"] >= 990 and scores["mode_kl"] < 0.1


class _Collapsed(torch.nn.Module):
    """A generator collapsed by construction: it cycles through a few fixed images, whatever the latent."""

    def __init__(self, images: torch.Tensor) -> None:
        super().__init__()
        self.images = to_float(images, "cpu")

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.images[torch.arange(len(z)) % len(self.images)]


def test_collapsed_generators_cover_few_modes(stacked, classifier, tmp_path):
    extractor = ClassifierExtractor(classifier)
    counts = read_manifest(stacked).class_counts
    pairs = list(read_images(str(stacked), StorageConfig(), 28, 3, 400, labels=True))
    # Images of ten different modes that the classifier names right (the metric is what is tested here).
    chosen: dict[int, torch.Tensor] = {}
    for image, label in pairs:
        if label not in chosen and int(extractor(to_float(image[None], "cpu"))[1].argmax()) == label:
            chosen[label] = image
    ten = list(chosen)[:10]
    real = real_statistics(str(stacked), StorageConfig(), extractor, 28, 3, 200, tmp_path, 100)

    def score(images: torch.Tensor, **kwargs) -> dict[str, float]:  # 500 fakes in batches of 100
        return evaluate_generator_distributed(_Collapsed(images), 8, extractor, real, 500, 100, 0, 1, "cpu", 0,
                                              mode_counts=counts, **kwargs)

    one = score(torch.stack([chosen[ten[0]]]))
    assert one["modes"] == 1 and one["mode_kl"] == pytest.approx(math.log(SAMPLES / counts[ten[0]]))
    tens = score(torch.stack([chosen[label] for label in ten]))
    assert tens["modes"] == 10
    assert tens["mode_kl"] == pytest.approx(sum(0.1 * math.log(0.1 * SAMPLES / counts[label]) for label in ten))
    # The same modes named by a separate eval.mode_classifier pass as by the extractor's own logits.
    separate = score(torch.stack([chosen[label] for label in ten]), mode_classifier=ClassifierExtractor(classifier))
    assert separate == pytest.approx(tens)
    with pytest.raises(ValueError, match="tells 1000 classes, the dataset has 10"):
        evaluate_generator_distributed(_Collapsed(torch.stack([chosen[ten[0]]])), 8, extractor, real, 10, 10, 0, 1,
                                       "cpu", 0, mode_counts=[5] * 10, mode_classifier=extractor)

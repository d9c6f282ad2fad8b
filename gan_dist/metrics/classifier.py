"""The offline feature extractor: a small CNN trained on the dataset's own labels.

It needs no download, but its FID/KID are only comparable with other numbers from the same classifier
file. It also scores a conditional generator: the share of samples classified as the class asked for, and
names the mode of each generated image for the mode-coverage metrics (``metrics/modes.py``).

A *per-channel* classifier is for stacked datasets (StackedMNIST), whose class is each channel's class as a
digit (R most significant): one k-way net classifies every channel on its own, and the extractor's logits are
the log-probabilities of all k^C combinations. Ten digit classes learn from far fewer images than 1,000 modes.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from gan_dist.data.loader import to_float
from gan_dist.data.shards import list_shards
from gan_dist.data.subset import dataset_manifest, read_images
from gan_dist.metrics.extractors import file_sha256, load_weights, to_rgb
from gan_dist.storage import StorageConfig

CLASSIFIER_FORMAT = "gan_dist.classifier"


class DatasetClassifier(nn.Module):
    """Small CNN: images -> (``feature_dim`` penultimate features, class logits)."""

    feature_dim = 128

    def __init__(self, channels: int, num_classes: int, width: int = 32) -> None:
        super().__init__()

        def stage(c_in: int, c_out: int) -> list[nn.Module]:  # halves the resolution
            return [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]

        self.body = nn.Sequential(
            *stage(channels, width), *stage(width, 2 * width), *stage(2 * width, 4 * width),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.embed = nn.Sequential(nn.Linear(4 * width, self.feature_dim), nn.ReLU())
        self.head = nn.Linear(self.feature_dim, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.embed(self.body(x))
        return features, self.head(features)


def channel_classes(labels: torch.Tensor, per_channel: int, channels: int) -> torch.Tensor:
    """``[N]`` stacked-dataset classes -> ``[N, channels]``: each channel's class, the label's base-``per_channel``
    digits, channel 0 most significant (StackedMNIST: 372 -> R 3, G 7, B 2)."""
    places = per_channel ** torch.arange(channels - 1, -1, -1, device=labels.device)
    return labels[:, None] // places % per_channel


def joint_log_probs(channel_logits: torch.Tensor) -> torch.Tensor:
    """``[N, C, k]`` logits of independently classified channels -> ``[N, k^C]`` log-probabilities of every
    combination (the product of the channels' probabilities), indexed as :func:`channel_classes` numbers them."""
    log_p = channel_logits.log_softmax(-1)
    joint = log_p[:, 0]
    for c in range(1, log_p.shape[1]):
        joint = (joint[:, :, None] + log_p[:, c, None, :]).flatten(1)
    return joint


def classifier_name(weights_path: str | Path) -> str:
    """What identifies a classifier file (cache keys, run records): its sha256, shortened."""
    return f"classifier/{file_sha256(Path(weights_path).expanduser())[:16]}"


class ClassifierExtractor:
    """Features of a classifier written by :func:`train_classifier`. NOT comparable to Inception FID.

    A per-channel classifier's features are its features of each channel, concatenated (C x 128)."""

    def __init__(self, weights_path: str | Path, device: torch.device | str = "cpu") -> None:
        blob = load_weights(weights_path, "classifier weights")
        if not isinstance(blob, dict) or blob.get("format") != CLASSIFIER_FORMAT:
            raise ValueError(f"{weights_path} is not a gan_dist classifier file (write one with train_classifier)")
        self.meta = {k: v for k, v in blob.items() if k != "state_dict"}
        self.resolution, self.channels, self.num_classes = blob["resolution"], blob["channels"], blob["num_classes"]
        self.per_channel = blob.get("per_channel", 0)  # files from before per-channel classifiers: 0
        if self.per_channel:
            self.net = DatasetClassifier(1, self.per_channel, blob["width"])
        else:
            self.net = DatasetClassifier(self.channels, self.num_classes, blob["width"])
        self.net.load_state_dict(blob["state_dict"], strict=True)
        self.net.eval().requires_grad_(False).to(device)
        self.dim = DatasetClassifier.feature_dim * (self.channels if self.per_channel else 1)
        self.name = classifier_name(weights_path)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = images.float()
        if x.shape[1] != self.channels:  # grey <-> RGB, so any G can be scored against the training data
            x = to_rgb(x) if self.channels == 3 else x.mean(dim=1, keepdim=True)
        if x.shape[-2:] != (self.resolution, self.resolution):
            x = F.interpolate(x, size=(self.resolution, self.resolution), mode="bilinear", align_corners=False)
        if not self.per_channel:
            return self.net(x)
        n, c = x.shape[:2]
        features, logits = self.net(x.reshape(n * c, 1, *x.shape[2:]))
        return features.reshape(n, -1), joint_log_probs(logits.reshape(n, c, -1))


def train_classifier(
    data_url: str,
    storage: StorageConfig,
    resolution: int,
    channels: int,
    out_path: str | Path,
    steps: int = 500,
    batch_size: int = 64,
    lr: float = 5e-3,
    max_images: int = 20_000,
    width: int = 32,
    holdout: float = 0.1,
    seed: int = 0,
    device: torch.device | str = "cpu",
    per_channel: int = 0,
) -> Path:
    """Train :class:`DatasetClassifier` on the manifest labels and save it (weights_only-loadable).

    Uses up to ``max_images`` labelled images, held in memory as uint8 (max_images x C x R² bytes);
    ``holdout`` of them are kept out of training and the accuracy on them is stored in the file as
    ``holdout_accuracy``. ``width`` is the first stage's channel count (then 2x, 4x).
    ``per_channel`` = k (StackedMNIST: 10): train a k-way classifier on the single channels, each labelled with
    its digit of the image's class (:func:`channel_classes`); the file then classifies k^C classes, and also
    records the accuracy per channel (``holdout_channel_accuracy``). ``batch_size`` counts single channels.
    """
    pairs = list(read_images(data_url, storage, resolution, channels, max_images, labels=True))
    if any(label is None for _, label in pairs):
        raise ValueError(f"{data_url}: samples without a class label; the classifier extractor needs labels")
    random.Random(seed).shuffle(pairs)
    images = torch.stack([image for image, _ in pairs])
    targets = torch.tensor([label for _, label in pairs])
    _, manifest = dataset_manifest(list_shards(data_url, storage), storage)
    num_classes = len(manifest.labels) if manifest and manifest.labels else int(targets.max()) + 1
    if per_channel:
        num_classes = per_channel**channels
        if int(targets.max()) >= num_classes:
            raise ValueError(f"{data_url}: class {int(targets.max())} is not {channels} base-{per_channel} digits")
    n_test = max(1, int(len(pairs) * holdout))
    test_x, test_y = _net_samples(images[:n_test], targets[:n_test], per_channel)
    train_x, train_y = _net_samples(images[n_test:], targets[n_test:], per_channel)
    torch.manual_seed(seed)
    net = DatasetClassifier(train_x.shape[1], per_channel or num_classes, width).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    order = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(len(train_x), (batch_size,), generator=order)
        _, logits = net(to_float(train_x[idx], device))
        loss = F.cross_entropy(logits, train_y[idx].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    net.eval()
    with torch.no_grad():
        predicted = torch.cat([net(to_float(b, device))[1].argmax(1).cpu() for b in test_x.split(256)])
    correct, scores = predicted == test_y, {}
    if per_channel:  # an image's class is right only when all its channels are
        scores["holdout_channel_accuracy"] = float(correct.float().mean())
        correct = correct.view(-1, channels).all(1)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({
        "format": CLASSIFIER_FORMAT, "state_dict": net.cpu().state_dict(), "channels": channels,
        "resolution": resolution, "num_classes": num_classes, "width": width, "per_channel": per_channel,
        "holdout_accuracy": float(correct.float().mean()), **scores, "train_images": len(pairs) - n_test,
        "steps": steps, "data_url": data_url,
    }, out_path)
    return out_path


def _net_samples(images: torch.Tensor, targets: torch.Tensor, per_channel: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The net's inputs and targets: the images and their classes, or (per channel) every channel on its own
    with its digit, image by image."""
    if not per_channel:
        return images, targets
    return images.flatten(0, 1).unsqueeze(1), channel_classes(targets, per_channel, images.shape[1]).flatten()

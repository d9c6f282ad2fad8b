"""The offline feature extractor: a small CNN trained on the dataset's own labels.

It needs no download, but its FID/KID are only comparable with other numbers from the same classifier
file. It also scores a conditional generator: the share of samples classified as the class asked for.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from gan_dist.data.loader import to_float
from gan_dist.data.subset import read_images
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


class ClassifierExtractor:
    """Features of a classifier written by :func:`train_classifier`. NOT comparable to Inception FID."""

    dim = DatasetClassifier.feature_dim

    def __init__(self, weights_path: str | Path, device: torch.device | str = "cpu") -> None:
        blob = load_weights(weights_path, "classifier weights")
        if not isinstance(blob, dict) or blob.get("format") != CLASSIFIER_FORMAT:
            raise ValueError(f"{weights_path} is not a gan_dist classifier file (write one with train_classifier)")
        self.meta = {k: v for k, v in blob.items() if k != "state_dict"}
        self.net = DatasetClassifier(blob["channels"], blob["num_classes"], blob["width"])
        self.net.load_state_dict(blob["state_dict"], strict=True)
        self.net.eval().requires_grad_(False).to(device)
        self.resolution, self.channels = blob["resolution"], blob["channels"]
        self.name = f"classifier/{file_sha256(Path(weights_path).expanduser())[:16]}"

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = images.float()
        if x.shape[1] != self.channels:  # grey <-> RGB, so any G can be scored against the training data
            x = to_rgb(x) if self.channels == 3 else x.mean(dim=1, keepdim=True)
        if x.shape[-2:] != (self.resolution, self.resolution):
            x = F.interpolate(x, size=(self.resolution, self.resolution), mode="bilinear", align_corners=False)
        return self.net(x)


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
) -> Path:
    """Train :class:`DatasetClassifier` on the manifest labels and save it (weights_only-loadable).

    Uses up to ``max_images`` labelled images, held in memory as uint8 (max_images x C x R² bytes);
    ``holdout`` of them are kept out of training and the accuracy on them is stored in the file as
    ``holdout_accuracy``. ``width`` is the first stage's channel count (then 2x, 4x).
    """
    pairs = list(read_images(data_url, storage, resolution, channels, max_images, labels=True))
    if any(label is None for _, label in pairs):
        raise ValueError(f"{data_url}: samples without a class label; the classifier extractor needs labels")
    random.Random(seed).shuffle(pairs)
    images = torch.stack([image for image, _ in pairs])
    targets = torch.tensor([label for _, label in pairs])
    n_test = max(1, int(len(pairs) * holdout))
    num_classes = int(targets.max()) + 1
    torch.manual_seed(seed)
    net = DatasetClassifier(channels, num_classes, width).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    order = torch.Generator().manual_seed(seed)
    train_x, train_y = images[n_test:], targets[n_test:]
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
        predicted = torch.cat([net(to_float(b, device))[1].argmax(1).cpu() for b in images[:n_test].split(256)])
    accuracy = float((predicted == targets[:n_test]).float().mean())
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({
        "format": CLASSIFIER_FORMAT, "state_dict": net.cpu().state_dict(), "channels": channels,
        "resolution": resolution, "num_classes": num_classes, "width": width, "holdout_accuracy": accuracy,
        "train_images": len(pairs) - n_test, "steps": steps, "data_url": data_url,
    }, out_path)
    return out_path

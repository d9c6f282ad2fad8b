"""Feature extractors for FID/KID/IS, and training of the offline classifier extractor.

An extractor takes float images in [-1, 1] (NCHW, any resolution, 1 or 3 channels) and returns
``(features [N, dim], logits [N, classes] or None)``. Two are provided:

* ``InceptionExtractor``: the TF-ported FID Inception v3 (pt_inception-2015-12-05, the network of
  pytorch-fid / torch-fidelity). With the real weights file its FID is comparable to published tables.
* ``ClassifierExtractor``: a small CNN trained on the dataset's own labels. It needs no download, but its
  numbers are only comparable with other numbers from the same classifier file.

Weights are read only with ``torch.load(weights_only=True)``: a weights file can never run code.
"""

from __future__ import annotations

import hashlib
import logging
import random
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from gan_dist.config import EvalConfig, StorageConfig

log = logging.getLogger(__name__)

INCEPTION_SHA256_PREFIX = "6726825d"  # pt_inception-2015-12-05-6726825d.pth: torch.hub names carry it
CLASSIFIER_FORMAT = "gan_dist.classifier"


class FeatureExtractor(Protocol):
    name: str  # identifies network + weights: part of the real-statistics cache key
    dim: int

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]: ...


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _load_plain(path: str | Path, what: str) -> object:
    """``torch.load(weights_only=True)`` of a local file, with errors that say what to do."""
    if "://" in str(path):  # checked before Path(), which would fold "s3://" into "s3:/"
        raise ValueError(f"{what} must be a local file path; download it first (see docs/evaluation.md): {path}")
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path} (see docs/evaluation.md)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # the unpickler names the offending global; keep its text
        raise ValueError(f"refusing to load {what} {path}: not a plain tensor file ({exc})") from None


def _to_rgb(images: torch.Tensor) -> torch.Tensor:
    if images.shape[1] == 1:
        return images.expand(-1, 3, -1, -1)
    if images.shape[1] != 3:
        raise ValueError(f"expected 1 or 3 channels, got {images.shape[1]}")
    return images


# ---- FID Inception v3 ----------------------------------------------------------------------------
# Module and parameter names follow torchvision's Inception3, whose names the pt_inception state dict
# uses. The TF graph differs from torchvision in the pooling of the Mixed blocks: average pools exclude
# the zero padding, and the last block (Mixed_7c) max-pools its pool branch.


class _ConvBN(nn.Module):
    def __init__(self, c_in: int, c_out: int, kernel: int | tuple[int, int], stride: int = 1,
                 padding: int | tuple[int, int] = 0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(c_out, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool(x: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class _MixedA(nn.Module):  # Mixed_5b/c/d
    def __init__(self, c_in: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = _ConvBN(c_in, 64, 1)
        self.branch5x5_1, self.branch5x5_2 = _ConvBN(c_in, 48, 1), _ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = _ConvBN(c_in, 64, 1)
        self.branch3x3dbl_2, self.branch3x3dbl_3 = _ConvBN(64, 96, 3, padding=1), _ConvBN(96, 96, 3, padding=1)
        self.branch_pool = _ConvBN(c_in, pool_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(_avg_pool(x)),
        ], 1)


class _ReductionB(nn.Module):  # Mixed_6a: 35x35 -> 17x17
    def __init__(self, c_in: int) -> None:
        super().__init__()
        self.branch3x3 = _ConvBN(c_in, 384, 3, stride=2)
        self.branch3x3dbl_1 = _ConvBN(c_in, 64, 1)
        self.branch3x3dbl_2, self.branch3x3dbl_3 = _ConvBN(64, 96, 3, padding=1), _ConvBN(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        deep = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), deep, F.max_pool2d(x, 3, stride=2)], 1)


class _MixedC(nn.Module):  # Mixed_6b..e: factorised 7x7 convolutions
    def __init__(self, c_in: int, c7: int) -> None:
        super().__init__()
        row, col = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
        self.branch1x1 = _ConvBN(c_in, 192, 1)
        self.branch7x7_1, self.branch7x7_2 = _ConvBN(c_in, c7, 1), _ConvBN(c7, c7, **row)
        self.branch7x7_3 = _ConvBN(c7, 192, **col)
        self.branch7x7dbl_1, self.branch7x7dbl_2 = _ConvBN(c_in, c7, 1), _ConvBN(c7, c7, **col)
        self.branch7x7dbl_3, self.branch7x7dbl_4 = _ConvBN(c7, c7, **row), _ConvBN(c7, c7, **col)
        self.branch7x7dbl_5 = _ConvBN(c7, 192, **row)
        self.branch_pool = _ConvBN(c_in, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dbl = x
        for i in range(1, 6):
            dbl = getattr(self, f"branch7x7dbl_{i}")(dbl)
        return torch.cat([
            self.branch1x1(x),
            self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
            dbl,
            self.branch_pool(_avg_pool(x)),
        ], 1)


class _ReductionD(nn.Module):  # Mixed_7a: 17x17 -> 8x8
    def __init__(self, c_in: int) -> None:
        super().__init__()
        self.branch3x3_1, self.branch3x3_2 = _ConvBN(c_in, 192, 1), _ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = _ConvBN(c_in, 192, 1)
        self.branch7x7x3_2 = _ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = _ConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = _ConvBN(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        deep = x
        for i in range(1, 5):
            deep = getattr(self, f"branch7x7x3_{i}")(deep)
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), deep, F.max_pool2d(x, 3, stride=2)], 1)


class _MixedE(nn.Module):  # Mixed_7b (average pool) and Mixed_7c (max pool): expanded filter banks
    def __init__(self, c_in: int, max_pool: bool) -> None:
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = _ConvBN(c_in, 320, 1)
        self.branch3x3_1 = _ConvBN(c_in, 384, 1)
        self.branch3x3_2a = _ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = _ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1, self.branch3x3dbl_2 = _ConvBN(c_in, 448, 1), _ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = _ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = _ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = _ConvBN(c_in, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mid = self.branch3x3_1(x)
        dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg_pool(x)
        return torch.cat([
            self.branch1x1(x),
            self.branch3x3_2a(mid), self.branch3x3_2b(mid),
            self.branch3x3dbl_3a(dbl), self.branch3x3dbl_3b(dbl),
            self.branch_pool(pooled),
        ], 1)


class FIDInceptionV3(nn.Module):
    """299x299 RGB in [-1, 1] -> (2048-d pool3 features, 1008 logits)."""

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = _ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = _ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = _ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = _ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = _ConvBN(80, 192, 3)
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = _MixedA(192, 32), _MixedA(256, 64), _MixedA(288, 64)
        self.Mixed_6a = _ReductionB(288)
        self.Mixed_6b, self.Mixed_6c = _MixedC(768, 128), _MixedC(768, 160)
        self.Mixed_6d, self.Mixed_6e = _MixedC(768, 160), _MixedC(768, 192)
        self.Mixed_7a = _ReductionD(768)
        self.Mixed_7b, self.Mixed_7c = _MixedE(1280, max_pool=False), _MixedE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(F.max_pool2d(x, 3, stride=2)))
        x = F.max_pool2d(x, 3, stride=2)
        for block in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{block}")(x)
        pool = x.mean(dim=(2, 3))
        return pool, self.fc(pool)


class InceptionExtractor:
    """FID Inception v3 from a local pt_inception-2015-12-05 state dict (or a stand-in of the same shapes)."""

    dim = 2048

    def __init__(self, weights_path: str | Path, device: torch.device | str = "cpu") -> None:
        state = _load_plain(weights_path, "Inception weights")
        if not isinstance(state, dict):
            raise ValueError(f"{weights_path}: expected a state dict, got {type(state).__name__}")
        self.net = FIDInceptionV3()
        self.net.load_state_dict(state, strict=True)
        self.net.eval().requires_grad_(False).to(device)
        self.device = torch.device(device)
        sha = _file_sha256(Path(weights_path).expanduser())
        self.standard = sha.startswith(INCEPTION_SHA256_PREFIX)
        if not self.standard:
            log.warning("%s is not the pt_inception-2015-12-05 file (sha256 %s…): FID is not comparable to "
                        "published numbers", weights_path, sha[:12])
        self.name = f"inception-fid/{sha[:16]}"

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # The standard preprocessing: bilinear resize to 299 without antialiasing, as pytorch-fid does.
        x = F.interpolate(_to_rgb(images.float()), size=(299, 299), mode="bilinear", align_corners=False)
        return self.net(x)


# ---- dataset classifier --------------------------------------------------------------------------


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
        blob = _load_plain(weights_path, "classifier weights")
        if not isinstance(blob, dict) or blob.get("format") != CLASSIFIER_FORMAT:
            raise ValueError(f"{weights_path} is not a gan_dist classifier file (write one with train_classifier)")
        self.meta = {k: v for k, v in blob.items() if k != "state_dict"}
        self.net = DatasetClassifier(blob["channels"], blob["num_classes"], blob["width"])
        self.net.load_state_dict(blob["state_dict"], strict=True)
        self.net.eval().requires_grad_(False).to(device)
        self.resolution, self.channels = blob["resolution"], blob["channels"]
        self.name = f"classifier/{_file_sha256(Path(weights_path).expanduser())[:16]}"

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = images.float()
        if x.shape[1] != self.channels:  # grey <-> RGB, so any G can be scored against the training data
            x = _to_rgb(x) if self.channels == 3 else x.mean(dim=1, keepdim=True)
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
    from gan_dist.data.loader import to_float
    from gan_dist.evaluate import read_images  # evaluate imports this module: import here, not at the top

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


def build_extractor(eval_cfg: EvalConfig, device: torch.device | str) -> FeatureExtractor:
    """The extractor ``eval.extractor`` names, with weights from ``eval.extractor_path``."""
    if eval_cfg.extractor_path is None:
        hint = ("the pt_inception-2015-12-05-6726825d.pth file" if eval_cfg.extractor == "inception"
                else "a classifier file from train_classifier")
        raise ValueError(f"eval.extractor_path must point at {hint}; see docs/evaluation.md")
    if eval_cfg.extractor == "inception":
        return InceptionExtractor(eval_cfg.extractor_path, device)
    return ClassifierExtractor(eval_cfg.extractor_path, device)

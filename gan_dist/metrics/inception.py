"""The FID Inception v3 (the TF-ported pt_inception-2015-12-05 network of pytorch-fid / torch-fidelity).

With the real weights file its FID is comparable to published tables; any other file of the same shapes
works but is flagged as not comparable.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from gan_dist.metrics.extractors import file_sha256, load_weights, to_rgb

log = logging.getLogger(__name__)

INCEPTION_SHA256_PREFIX = "6726825d"  # pt_inception-2015-12-05-6726825d.pth: torch.hub names carry it

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
        state = load_weights(weights_path, "Inception weights")
        if not isinstance(state, dict):
            raise ValueError(f"{weights_path}: expected a state dict, got {type(state).__name__}")
        self.net = FIDInceptionV3()
        self.net.load_state_dict(state, strict=True)
        self.net.eval().requires_grad_(False).to(device)
        self.device = torch.device(device)
        sha = file_sha256(Path(weights_path).expanduser())
        self.standard = sha.startswith(INCEPTION_SHA256_PREFIX)
        if not self.standard:
            log.warning("%s is not the pt_inception-2015-12-05 file (sha256 %s…): FID is not comparable to "
                        "published numbers", weights_path, sha[:12])
        self.name = f"inception-fid/{sha[:16]}"

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # The standard preprocessing: bilinear resize to 299 without antialiasing, as pytorch-fid does.
        x = F.interpolate(to_rgb(images.float()), size=(299, 299), mode="bilinear", align_corners=False)
        return self.net(x)

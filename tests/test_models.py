"""Shapes, ranges, init and normalisation of the G/D architectures (tiny widths, CPU)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gan_dist.models import model_config
from gan_dist.models import build_discriminator, build_generator, dcgan, resnet

Z_DIM = 16
TINY = {  # small nets per arch; the classic ones share their width keys
    "stylegan2": {"channel_base": 256, "channel_max": 16, "w_dim": 16, "mapping_layers": 2},
    "r3gan": {"channel_base": 256, "channel_max": 16, "group_width": 8},
}


def _cfg(arch: str, **kw):
    return model_config({"arch": arch, **TINY.get(arch, {"g_width": 8, "d_width": 8}), "z_dim": Z_DIM, **kw})


def _has_bn(module: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


def _sn_weights(module: nn.Module) -> list[torch.Tensor]:
    """Effective (normalised) weights of all spectrally normalised layers."""
    return [m.weight for m in module.modules() if "weight" in getattr(m, "parametrizations", {})]


CASES = [(arch, res, ch) for arch in ("mlp", "dcgan", "resnet") for res in (32, 64) for ch in (1, 3)]
CASES += [("mlp", 8, 1), ("dcgan", 128, 3), ("resnet", 256, 1)]


@pytest.mark.parametrize(("arch", "resolution", "channels"), CASES)
def test_shapes_and_ranges(arch: str, resolution: int, channels: int) -> None:
    torch.manual_seed(0)
    cfg = _cfg(arch, g_width=4, d_width=4) if resolution > 64 else _cfg(arch)
    g, d = build_generator(cfg, resolution, channels), build_discriminator(cfg, resolution, channels)
    z = torch.randn(3, Z_DIM)
    images = g(z)
    assert images.shape == (3, channels, resolution, resolution)
    assert images.abs().max() <= 1.0
    assert images.std() > 0  # not collapsed to a constant by construction
    logits = d(images)
    assert logits.shape == (3,)
    assert torch.isfinite(logits).all()
    d.eval()
    assert d(images[:1]).shape == (1,)  # a batch of one stays 1-D


@pytest.mark.parametrize("arch", ["mlp", "dcgan", "resnet"])
def test_d_backprops_into_g(arch: str) -> None:
    g, d = build_generator(_cfg(arch), 32, 1), build_discriminator(_cfg(arch), 32, 1)
    d(g(torch.randn(2, Z_DIM))).sum().backward()
    assert all(p.grad is not None for p in g.parameters())


def test_arch_defaults_resolved_by_config() -> None:
    assert _has_bn(build_discriminator(_cfg("dcgan"), 32, 3))
    assert not _sn_weights(build_discriminator(_cfg("dcgan"), 32, 3))
    resnet_d = build_discriminator(_cfg("resnet"), 32, 3)
    assert not _has_bn(resnet_d)
    assert _sn_weights(resnet_d)


@pytest.mark.parametrize("arch", ["mlp", "dcgan", "resnet"])
def test_batchnorm_toggles(arch: str) -> None:
    assert _has_bn(build_generator(_cfg(arch), 32, 3))
    assert not _has_bn(build_generator(_cfg(arch, g_batchnorm=False), 32, 3))
    assert _has_bn(build_discriminator(_cfg(arch, d_norm="batch"), 32, 3))
    assert not _has_bn(build_discriminator(_cfg(arch, d_norm="none"), 32, 3))


@pytest.mark.parametrize("arch", ["mlp", "dcgan", "resnet"])
def test_spectral_norm_bounds_singular_values(arch: str) -> None:
    torch.manual_seed(0)
    d = build_discriminator(_cfg(arch, d_norm="none", d_spectral_norm=True), 32, 3)
    weights = _sn_weights(d)
    n_layers = sum(isinstance(m, (nn.Linear, nn.Conv2d)) for m in d.modules())
    assert len(weights) == n_layers  # every conv/linear is normalised
    d.train()
    x = torch.randn(4, 3, 32, 32)
    for _ in range(20):  # each train-mode forward runs one more power iteration
        d(x)
    for w in _sn_weights(d):
        sigma = torch.linalg.matrix_norm(w.detach().flatten(1), ord=2).item()
        # Power iteration underestimates the top singular value, so W / sigma_est sits just above 1.
        assert 1.0 - 1e-4 <= sigma <= 1.02


def test_without_spectral_norm_weights_are_unbounded() -> None:
    d = build_discriminator(_cfg("resnet", d_spectral_norm=False), 32, 3)
    assert not _sn_weights(d)
    convs = [m for m in d.modules() if isinstance(m, nn.Conv2d)]
    sigmas = [torch.linalg.matrix_norm(m.weight.detach().flatten(1), ord=2) for m in convs]
    assert max(sigmas) > 1.1


def test_dcgan_init_statistics() -> None:
    torch.manual_seed(0)
    g = build_generator(model_config({"arch": "dcgan", "z_dim": 100}), 64, 3)  # default width: big layers
    d = build_discriminator(model_config({"arch": "dcgan"}), 64, 3)
    convs = [m for net in (g, d) for m in net.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    big = [m.weight for m in convs if m.weight.numel() >= 100_000]
    assert len(big) >= 4
    for w in big:
        assert w.std().item() == pytest.approx(0.02, rel=0.02)
        assert abs(w.mean().item()) < 1e-3
    bns = [m for net in (g, d) for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    scales = torch.cat([m.weight.detach() for m in bns])
    assert scales.mean().item() == pytest.approx(1.0, abs=0.01)
    assert scales.std().item() == pytest.approx(0.02, rel=0.2)
    assert all((m.bias == 0).all() for m in bns)


def test_dcgan_paper_channel_plan_at_64() -> None:
    g = build_generator(model_config({"arch": "dcgan"}), 64, 3)
    outs = [m.out_channels for m in g.modules() if isinstance(m, nn.ConvTranspose2d)]
    assert outs == [512, 256, 128, 64, 3]


@pytest.mark.parametrize("arch", ["dcgan", "resnet"])
def test_blocks_grow_with_resolution(arch: str) -> None:
    def count_up(resolution: int) -> int:
        g = build_generator(_cfg(arch, g_width=4), resolution, 3)
        kind = nn.ConvTranspose2d if arch == "dcgan" else resnet.GBlock
        return sum(isinstance(m, kind) for m in g.modules())

    def count_down(resolution: int) -> int:
        d = build_discriminator(_cfg(arch, d_width=4), resolution, 3)
        kind = nn.Conv2d if arch == "dcgan" else resnet.DBlock
        return sum(isinstance(m, kind) for m in d.modules())

    ups = [count_up(r) for r in (32, 64, 128, 256)]
    downs = [count_down(r) for r in (32, 64, 128, 256)]
    assert ups == [ups[0] + i for i in range(4)]
    assert downs == [downs[0] + i for i in range(4)]
    if arch == "resnet":  # one block per doubling from 4x4
        assert ups[0] == downs[0] == 3


def test_channel_cap() -> None:
    assert dcgan.stage_channels(8, 256) == [64, 64, 64, 32, 16, 8]
    d = build_discriminator(_cfg("resnet", d_width=4), 256, 3)
    assert max(m.out_channels for m in d.modules() if isinstance(m, nn.Conv2d)) == 32


@pytest.mark.parametrize("arch", ["dcgan", "resnet"])
@pytest.mark.parametrize("resolution", [16, 48, 512])
def test_conv_archs_reject_unsupported_resolution(arch: str, resolution: int) -> None:
    with pytest.raises(ValueError, match="power of two"):
        build_generator(_cfg(arch), resolution, 3)
    with pytest.raises(ValueError, match="power of two"):
        build_discriminator(_cfg(arch), resolution, 3)


def _conditional(arch: str, **kw):
    return _cfg(arch, conditional=True, num_classes=5, **kw)


def test_projection_adds_the_class_embedding_dot_features_to_the_unconditional_logit() -> None:
    """Miyato & Koyama's D(x, y) = psi(phi(x)) + <embed(y), phi(x)>, for resnet (pooled features) and dcgan
    (the flattened last feature map its final convolution reads)."""
    torch.manual_seed(0)
    x, y = torch.randn(4, 1, 32, 32), torch.tensor([0, 3, 3, 1])
    d = build_discriminator(_conditional("resnet", d_spectral_norm=False), 32, 1)
    phi = torch.relu(d.blocks(x)).sum(dim=(2, 3))
    expected = d.linear(phi).squeeze(1) + (d.critic.projection.embed.weight[y] * phi).sum(1)
    torch.testing.assert_close(d(x, y), expected)
    d = build_discriminator(_conditional("dcgan", d_norm="none"), 32, 1)
    phi = d.net[:-1](x)
    expected = d.net[-1](phi).view(4) + (d.critic.projection.embed.weight[y] * phi.flatten(1)).sum(1)
    torch.testing.assert_close(d(x, y), expected)
    assert not torch.allclose(d(x, y), d(x, (y + 1) % 5))  # the class changes the verdict


def test_conditional_batchnorm_uses_the_class_scale_and_shift() -> None:
    from gan_dist.models.conditioning import ConditionalBatchNorm

    bn = ConditionalBatchNorm(3, num_classes=4)
    with torch.no_grad():
        bn.scale.weight.copy_(torch.arange(12.0).view(4, 3))
        bn.shift.weight.copy_(-torch.arange(12.0).view(4, 3))
    x, y = torch.randn(6, 3, 2, 2), torch.tensor([0, 1, 2, 3, 2, 1])
    normed = (x - x.mean((0, 2, 3), keepdim=True)) / torch.sqrt(x.var((0, 2, 3), unbiased=False, keepdim=True) + 1e-5)
    expected = normed * bn.scale.weight[y][:, :, None, None] + bn.shift.weight[y][:, :, None, None]
    torch.testing.assert_close(bn(x, y), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["mlp", "dcgan", "resnet", "stylegan2", "r3gan"])
def test_conditional_nets_need_labels_and_use_them(arch: str) -> None:
    torch.manual_seed(0)
    cfg = _conditional(arch)
    g, d = build_generator(cfg, 32, 1).eval(), build_discriminator(cfg, 32, 1)
    z = torch.randn(3, Z_DIM)
    with pytest.raises(ValueError, match="labels"):
        g(z)
    with pytest.raises(ValueError, match="labels"):
        d(torch.randn(3, 1, 32, 32))
    with torch.no_grad():  # at init every class has the same scale and shift; make them differ, as training does
        for p in g.parameters():
            p.add_(0.1 * torch.randn_like(p))
    a, b = torch.tensor([0, 1, 2]), torch.tensor([4, 4, 4])
    assert not torch.allclose(g(z, a), g(z, b))  # the class changes what G draws
    images = g(z, a)
    assert d(images, a).shape == (3,)
    assert not torch.allclose(d(images, a), d(images, b))  # and what D thinks of an image

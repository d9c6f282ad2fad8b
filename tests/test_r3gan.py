"""R3GAN's G and D: the published nets' sizes, shapes at every resolution, the fix-up init, the projection, and
DDP, bf16 autocast, channels_last and torch.compile (tiny, CPU). Label handling is in test_models.py."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from gan_dist.models import build_discriminator, build_generator, model_config
from gan_dist.models.r3gan import Config, Discriminator, Generator, ResidualBlock, Stage

Z = 16
TINY = {"arch": "r3gan", "z_dim": Z, "channel_base": 64, "channel_max": 16, "group_width": 8, "blocks_per_stage": 1}
PUBLISHED = {"z_dim": 64, "blocks_per_stage": 2, "expansion": 2}  # every preset of the official train.py


def _nets(resolution: int = 16, channels: int = 3, num_classes: int = 0) -> tuple[Generator, Discriminator]:
    cfg = model_config({**TINY, "conditional": bool(num_classes), "num_classes": num_classes or None})
    return build_generator(cfg, resolution, channels), build_discriminator(cfg, resolution, channels)


def _trained_like(*nets: nn.Module) -> None:
    """Give every block's zero-initialised last conv (and the zero biases) small random values, as training
    does, so that the residual branches take part in what a test compares."""
    with torch.no_grad():
        for net in nets:
            for block in (m for m in net.modules() if isinstance(m, ResidualBlock)):
                block.project.weight.normal_(0, 0.3 / math.sqrt(block.project.weight[0].numel()))
                block.act1.bias.normal_(0, 0.1)
                block.act2.bias.normal_(0, 0.1)


def _count(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


# Hand count, from the official R3GAN/Networks.py and the presets of train.py (github.com/brownvc/R3GAN; every
# preset: 2 blocks per stage, expansion 2, noise 64; a conditional G embeds the class in 64, a conditional D in its
# 4x4 width). A block of width C and cardinality g: 1x1 C->2C, grouped 3x3 2C->2C (2C/g inputs per group), 1x1
# 2C->C, two biases of 2C: 4C² + 36C²/g + 4C; 2,583,552 at (768, 96), 701,952 at (384, 48), 203,520 at (192, 24),
# 64,896 at (96, 12), 10,328,064 at (1536, 96). Transitions: a bias-free 1x1 conv where the width changes.
# G: basis C·16 + linear (64 [+64])·C + blocks + transitions + to-image C·3 [+ embedding classes·64].
# D: from-image 3·C + blocks + transitions + depthwise 4x4 C·16 + linear C·(1 or C) [+ embedding classes·C].
#   CIFAR-10 (conditional, 10 classes; widths 4x768, cardinality 96): G 8·2,583,552 + 12,288 + 98,304 + 2,304 +
#   640 = 20,781,952; D 2,304 + 20,668,416 + 12,288 + 589,824 + 7,680 = 21,280,512.
#   FFHQ-256 (widths 768x4, 384, 192, 96; cardinality 96x4, 48, 24, 12): blocks 22,609,152, transitions 294,912
#   + 73,728 + 18,432 = 387,072; G + 12,288 + 49,152 + 288 = 23,057,952; D + 288 + 12,288 + 768 = 23,009,568.
#   ImageNet-64 (conditional, 1000 classes; widths 5x1536, cardinality 96): G 10·10,328,064 + 24,576 + 196,608
#   + 4,608 + 64,000 = 103,570,432; D 4,608 + 103,280,640 + 24,576 + 2,359,296 + 1,536,000 = 107,205,120.
PUBLISHED_COUNTS = {
    "cifar10": ({"channel_base": 24576, "channel_max": 768, "group_width": 16, "num_classes": 10}, 32,
                20_781_952, 21_280_512),
    "ffhq256": ({"channel_base": 24576, "channel_max": 768, "group_width": 16}, 256, 23_057_952, 23_009_568),
    "imagenet64": ({"channel_base": 98304, "channel_max": 1536, "group_width": 32, "num_classes": 1000}, 64,
                   103_570_432, 107_205_120),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(PUBLISHED_COUNTS))
def test_published_configurations_have_the_official_parameter_counts(name: str) -> None:
    """The model.* values the docs give for the paper's nets build nets of exactly the official size (counted
    above by hand from the official code and presets), with the official per-stage widths and cardinalities."""
    options, resolution, g_count, d_count = PUBLISHED_COUNTS[name]
    tree = {"arch": "r3gan", **PUBLISHED, **options, "conditional": "num_classes" in options}
    cfg = model_config(tree)
    with torch.device("meta"):  # shapes only: no 200M-parameter init on the CPU
        g, d = build_generator(cfg, resolution, 3), build_discriminator(cfg, resolution, 3)
    assert (_count(g), _count(d)) == (g_count, d_count)
    if name == "ffhq256":
        assert [(s.width, s.cardinality) for s in cfg.stages(256)] == [
            (768, 96), (768, 96), (768, 96), (768, 96), (384, 48), (192, 24), (96, 12)]  # fmt: skip


def test_default_is_a_small_net_narrowing_with_resolution() -> None:
    cfg = model_config({"arch": "r3gan"})
    assert cfg.stages(32) == [Stage(128, 16, 2), Stage(64, 8, 2), Stage(32, 4, 2), Stage(16, 2, 2)]
    total = _count(build_generator(cfg, 32, 1)) + _count(build_discriminator(cfg, 32, 1))
    assert 600_000 < total < 700_000


@pytest.mark.parametrize("resolution", [8, 16, 32, 64, 128, 256, 512, 1024])
def test_shapes_at_every_supported_resolution(resolution: int) -> None:
    torch.manual_seed(0)
    g, d = _nets(resolution)
    assert len(g.stages) == len(d.stages) == int(math.log2(resolution)) - 1  # one per resolution from 4x4
    images = g(torch.randn(1, Z))  # one image: 1024 px is large for a CPU test; the logits stay 1-D
    assert images.shape == (1, 3, resolution, resolution) and images.dtype == torch.float32
    assert images.std() > 0
    logits = d(images)
    assert logits.shape == (1,) and torch.isfinite(logits).all()


@pytest.mark.parametrize("resolution", [4, 48, 2048])
def test_unsupported_resolutions_are_refused(resolution: int) -> None:
    with pytest.raises(ValueError, match="power of two"):
        Config().check_resolution(resolution)


def test_widths_that_do_not_split_into_groups_are_refused() -> None:
    with pytest.raises(ValueError, match="groups of 16"):
        Config(channel_base=20 * 32, channel_max=20).check_resolution(32)  # 40 branch channels: 2.5 groups
    assert Config(channel_base=4 * 32, channel_max=4).stages(32)[-1].cardinality == 1  # narrower than a group: one


def test_blocks_start_as_identity_and_the_init_follows_the_fixup_rule() -> None:
    """Every block is the identity at init (its last conv is zero), so G and D are their nets without blocks;
    the other branch convs are N(0, gain² / fan_in) with gain = sqrt(2 / (1 + 0.2²)) · L^(-1/4), L = 8 blocks."""
    torch.manual_seed(0)
    stages = [Stage(64, 8, 2)] * 4
    g, d = Generator(stages, channels=3, z_dim=Z), Discriminator(stages, channels=3)
    blocks = [m for net in (g, d) for m in net.modules() if isinstance(m, ResidualBlock)]
    assert len(blocks) == 16
    x = torch.randn(2, 64, 8, 8)
    for block in blocks:
        torch.testing.assert_close(block(x), x, rtol=0, atol=0)
        assert (block.project.weight == 0).all() and (block.act1.bias == 0).all()
    gain = math.sqrt(2 / 1.04) * 8 ** -0.25
    expand = torch.cat([b.expand.weight.flatten() for b in blocks])  # fan-in 64
    grouped = torch.cat([b.conv.weight.flatten() for b in blocks])  # fan-in 128 / 8 groups · 3 · 3 = 144
    assert expand.std().item() == pytest.approx(gain / 8, rel=0.02)
    assert grouped.std().item() == pytest.approx(gain / 12, rel=0.02)
    assert g.stages[0][0].linear.weight.std().item() == pytest.approx(1 / 4, rel=0.1)  # the rest: gain 1 (fan-in 16)

    def without_blocks(net: nn.Module) -> list[nn.Module]:
        return [m for stage in net.stages for m in stage if not isinstance(m, ResidualBlock)]

    z, images = torch.randn(2, Z), torch.randn(2, 3, 32, 32)
    h = z
    for layer in without_blocks(g):
        h = layer(h)
    torch.testing.assert_close(g(z), g.to_image(h))
    h = d.from_image(images)
    for layer in without_blocks(d):
        h = layer(h)
    torch.testing.assert_close(d(images), h.squeeze(1))


def test_generator_basis_scales_a_learned_4x4_map_per_channel() -> None:
    g, _ = _nets()
    z = torch.randn(2, Z)
    basis = g.stages[0][0]
    expected = basis.basis[None] * (z @ basis.linear.weight.T)[:, :, None, None]
    torch.testing.assert_close(basis(z), expected)


def test_conditional_discriminator_projects_onto_the_class_embedding() -> None:
    """logit = <embed(y), linear(depthwise4x4(features))>, no unconditional term; an unconditional D's logit is
    the linear layer's single output, and it refuses labels."""
    torch.manual_seed(0)
    _, d = _nets(num_classes=4)
    _trained_like(d)
    images, labels = torch.randn(3, 3, 16, 16), torch.tensor([0, 3, 1])
    features = d.stages[:-1](d.from_image(images))
    *blocks, basis = d.stages[-1]
    for block in blocks:
        features = block(features)
    vectors = basis.linear(basis.basis(features).flatten(1))  # [N, 4x4 width]
    assert vectors.shape == (3, 16)
    torch.testing.assert_close(d(images, labels), (vectors * d.embed.weight[labels]).sum(1))
    g, d = _nets()
    with pytest.raises(ValueError, match="unconditional"):
        d(images, labels)
    with pytest.raises(ValueError, match="unconditional"):
        g(torch.randn(3, Z), labels)


@pytest.fixture
def one_rank_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("num_classes", [0, 3])
def test_ddp_finds_every_parameter_used(one_rank_group, num_classes: int) -> None:
    """DDP without find_unused_parameters (as the trainer wraps G and D) raises at the next forward when a
    parameter got no gradient; two steps of D(G(z)) pass, conditional or not, and reach every parameter."""
    g, d = (DistributedDataParallel(net) for net in _nets(num_classes=num_classes))
    labels = torch.tensor([0, 1, 2, 1]) if num_classes else None
    for _ in range(2):
        d(g(torch.randn(4, Z), labels), labels).sum().backward()
    assert all(p.grad is not None for net in (g, d) for p in net.parameters())


def test_discriminator_supports_the_gradient_penalty_double_backward() -> None:
    """R1/R2 penalise |dD/dx|², whose backward runs through D's backward (in-place lrelus, grouped convs, FIR)."""
    torch.manual_seed(0)
    _, d = _nets(num_classes=3)
    _trained_like(d)
    real = torch.randn(4, 3, 16, 16, requires_grad=True)
    (grad,) = torch.autograd.grad(d(real, torch.tensor([0, 1, 2, 0])).sum(), real, create_graph=True)
    grad.square().sum().backward()
    assert all(p.grad is not None for p in d.parameters())
    # D is piecewise linear in x: its slopes, which the penalty sees, move with every weight but not the biases.
    assert all(p.grad.abs().sum() > 0 for name, p in d.named_parameters() if not name.endswith("bias"))


def test_bf16_autocast_runs_the_convs_in_bf16_with_finite_float32_outputs() -> None:
    torch.manual_seed(0)
    g, d = _nets(num_classes=3)
    _trained_like(g, d)
    z, labels = torch.randn(4, Z), torch.tensor([0, 1, 2, 0])
    images, logits = g(z, labels), d(g(z, labels), labels)
    dtypes = []
    g.stages[-1][-1].conv.register_forward_hook(lambda _m, _i, out: dtypes.append(out.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        images16 = g(z, labels)
        logits16 = d(images16, labels)
    assert dtypes == [torch.bfloat16]
    assert images16.dtype == logits16.dtype == torch.float32
    assert torch.isfinite(images16).all() and torch.isfinite(logits16).all()
    assert ((images16 - images).norm() / images.norm()).item() < 0.05
    assert ((logits16 - logits).norm() / logits.norm()).item() < 0.05


def test_channels_last_matches_contiguous() -> None:
    torch.manual_seed(0)
    g, d = _nets(num_classes=3)
    _trained_like(g, d)
    z, labels = torch.randn(4, Z), torch.tensor([0, 1, 2, 0])
    g_cl = copy.deepcopy(g).to(memory_format=torch.channels_last)
    d_cl = copy.deepcopy(d).to(memory_format=torch.channels_last)
    images = g(z, labels)
    torch.testing.assert_close(g_cl(z, labels), images, rtol=1e-5, atol=1e-5)
    logits_cl = d_cl(images.contiguous(memory_format=torch.channels_last), labels)
    torch.testing.assert_close(logits_cl, d(images, labels), rtol=1e-5, atol=1e-5)


def test_torch_compile_matches_eager_in_one_graph() -> None:
    torch.manual_seed(0)
    g, d = _nets(num_classes=3)
    _trained_like(g, d)
    z, labels = torch.randn(4, Z), torch.tensor([0, 1, 2, 0])
    images = g(z, labels)
    torch.testing.assert_close(torch.compile(g, fullgraph=True)(z, labels), images, rtol=1e-4, atol=1e-4)
    compiled = torch.compile(d, fullgraph=True)(images, labels)
    torch.testing.assert_close(compiled, d(images, labels), rtol=1e-4, atol=1e-4)

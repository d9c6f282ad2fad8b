"""StyleGAN2 layers and networks: the maths against hand computations, shapes, gradients,
truncation, style mixing, determinism, channels_last, bf16 blocks and torch.compile (tiny, CPU)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from gan_dist.models.layers import (
    EqualConv2d,
    EqualLinear,
    MinibatchStd,
    activate,
    demodulation,
    downsample2d,
    fir_filter,
    modulated_conv2d,
    upsample2d,
)
from gan_dist.models.stylegan2 import Generator
from gan_dist.models.stylegan2_d import Discriminator

TINY = {"channel_base": 512, "channel_max": 64}
Z = 32


def _g(resolution: int = 32, channels: int = 3, num_classes: int = 0, seed: int = 0, **kw) -> Generator:
    torch.manual_seed(seed)
    return Generator(Z, Z, resolution, channels, num_classes, mapping_layers=2, **TINY, **kw)


def _d(resolution: int = 32, channels: int = 3, num_classes: int = 0, seed: int = 0, **kw) -> Discriminator:
    torch.manual_seed(seed)
    return Discriminator(resolution, channels, num_classes, **TINY, mapping_layers=2, **kw)


def _fir_1d() -> torch.Tensor:
    return torch.tensor([1.0, 3.0, 3.0, 1.0]) / 8


def _correlate_loops(x: torch.Tensor, k: torch.Tensor, before: int, after: int) -> torch.Tensor:
    """2-D correlation of an [H, W] image with a [kh, kw] kernel after zero padding, pixel by pixel."""
    h, w = x.shape
    padded = torch.zeros(h + before + after, w + before + after)
    padded[before : before + h, before : before + w] = x
    kh, kw = k.shape
    out = torch.zeros(padded.shape[0] - kh + 1, padded.shape[1] - kw + 1)
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            out[i, j] = sum(padded[i + a, j + b] * k[a, b] for a in range(kh) for b in range(kw))
    return out


def _fir_reference(x: torch.Tensor, before: int, after: int, gain: float = 1.0) -> torch.Tensor:
    """The [1,3,3,1] FIR on [N, C, H, W], written directly with F.pad + depthwise F.conv2d."""
    k = torch.outer(_fir_1d(), _fir_1d()) * gain
    c = x.shape[1]
    return F.conv2d(F.pad(x, [before, after, before, after]), k.expand(c, 1, 4, 4), groups=c)


# ---------------------------------------------------------------- layers


def _modulated_weights(weight: torch.Tensor, styles: torch.Tensor, demodulate: bool) -> torch.Tensor:
    """Per-sample weights [N, out, in, k, k], written out: scaled along ``in``, then unit norm per output."""
    w = weight.unsqueeze(0) * styles[:, None, :, None, None]
    if demodulate:
        w = w / (w.square().sum(dim=(2, 3, 4), keepdim=True) + 1e-8).sqrt()
    return w


def test_demodulation_normalises_the_explicit_per_sample_weights() -> None:
    torch.manual_seed(0)
    weight, styles = torch.randn(5, 3, 3, 3), torch.randn(4, 3) * 3
    coefs = demodulation(weight, styles)
    assert coefs.shape == (4, 5)
    plain = _modulated_weights(weight, styles, demodulate=False)
    torch.testing.assert_close(coefs, plain.square().sum(dim=(2, 3, 4)).add(1e-8).rsqrt())
    unit = plain * coefs[:, :, None, None, None]
    torch.testing.assert_close(unit.square().sum(dim=(2, 3, 4)), torch.ones(4, 5))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # float32 inside bf16 blocks
        assert demodulation(weight, styles.bfloat16()).dtype == torch.float32


def test_activate_hand_computed() -> None:
    x, bias = torch.tensor([[[[-1.0]], [[2.0]]]]), torch.tensor([0.5, -1.0])
    pre = torch.tensor([-0.5, 1.0])
    expected = torch.where(pre > 0, pre, 0.2 * pre) * math.sqrt(2)
    torch.testing.assert_close(activate(x, bias, lrelu=True).flatten(), expected)
    torch.testing.assert_close(activate(x, bias, lrelu=True, clamp=1.0).flatten(), expected.clamp(-1, 1))
    torch.testing.assert_close(activate(x, bias, lrelu=False).flatten(), pre)
    torch.testing.assert_close(activate(x, None, lrelu=False), x, rtol=0, atol=0)


def test_equal_linear_runtime_scale_hand_computed() -> None:
    layer = EqualLinear(2, 1, lr_mul=0.5)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 2.0]]))
        layer.bias.copy_(torch.tensor([2.0]))
    torch.testing.assert_close(layer.effective_weight(), torch.tensor([[0.5, 1.0]]) / math.sqrt(2))
    x = torch.tensor([[3.0, 4.0]])
    expected = 0.5 * (1 * 3 + 2 * 4) / math.sqrt(2) + 2.0 * 0.5  # weight·lr_mul/sqrt(fan_in), bias·lr_mul
    torch.testing.assert_close(layer(x), torch.tensor([[expected]]))
    layer.activation = True
    pre = F.linear(-x, layer.effective_weight(), layer.bias * 0.5)
    torch.testing.assert_close(layer(-x), F.leaky_relu(pre, 0.2) * math.sqrt(2))


def test_equal_layers_store_unit_weights_over_lr_mul() -> None:
    torch.manual_seed(0)
    assert EqualLinear(256, 256, lr_mul=0.01).weight.std().item() == pytest.approx(100, rel=0.02)
    assert EqualConv2d(64, 64, 3).weight.std().item() == pytest.approx(1, rel=0.02)


def test_equal_conv2d_runtime_scale() -> None:
    torch.manual_seed(0)
    conv = EqualConv2d(2, 3, 3, lr_mul=0.1, activation=True)
    with torch.no_grad():
        conv.bias.copy_(torch.tensor([1.0, -2.0, 3.0]))
    effective = conv.weight * 0.1 / math.sqrt(2 * 3 * 3)
    torch.testing.assert_close(conv.effective_weight(), effective)
    x = torch.randn(2, 2, 5, 5)
    expected = F.leaky_relu(F.conv2d(x, effective, conv.bias * 0.1, padding=1), 0.2) * math.sqrt(2)
    torch.testing.assert_close(conv(x), expected)
    torch.testing.assert_close(conv(x, gain=0.5), expected * 0.5)  # a residual branch's gain
    conv.conv_clamp = 0.3
    torch.testing.assert_close(conv(x, gain=0.5), expected.clamp(-0.3, 0.3) * 0.5)  # the clamp scales along


def test_fir_filter_is_normalised_outer_product() -> None:
    torch.testing.assert_close(fir_filter(), torch.outer(_fir_1d(), _fir_1d()))


def test_upsample2d_matches_zero_insertion_and_loops() -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 4)
    inserted = torch.zeros(8, 8)
    for i in range(4):
        for j in range(4):
            inserted[2 * i, 2 * j] = x[i, j]
    expected = _correlate_loops(inserted, torch.outer(_fir_1d(), _fir_1d()) * 4, 2, 1)
    torch.testing.assert_close(upsample2d(x[None, None], fir_filter())[0, 0], expected)


def test_downsample2d_matches_loops_then_decimation() -> None:
    torch.manual_seed(0)
    x = torch.randn(6, 6)
    expected = _correlate_loops(x, torch.outer(_fir_1d(), _fir_1d()), 1, 1)[::2, ::2]
    out = downsample2d(x[None, None], fir_filter())[0, 0]
    assert out.shape == (3, 3)
    torch.testing.assert_close(out, expected)


def test_resampling_keeps_a_constant_image_constant() -> None:
    ones = torch.full((1, 2, 8, 8), 3.0)
    up, down = upsample2d(ones, fir_filter()), downsample2d(ones, fir_filter())
    assert up.shape == (1, 2, 16, 16) and down.shape == (1, 2, 4, 4)
    torch.testing.assert_close(up[..., 1:-1, 1:-1], torch.full_like(up[..., 1:-1, 1:-1], 3.0))  # borders see zeros
    torch.testing.assert_close(down[..., 1:-1, 1:-1], torch.full_like(down[..., 1:-1, 1:-1], 3.0))


@pytest.mark.parametrize("demodulate", [True, False])
@pytest.mark.parametrize("kernel", [3, 1])
@pytest.mark.parametrize("mode", ["same", "up", "down"])
def test_modulated_conv2d_matches_explicit_per_sample_weights(mode: str, kernel: int, demodulate: bool) -> None:
    """The conv on style-scaled activations (or the 1x1 batched matmul) equals conv with the per-sample
    modulated, demodulated weights, sample by sample, with the FIR resampling written out."""
    torch.manual_seed(0)
    x, weight, styles = torch.randn(3, 4, 6, 6), torch.randn(5, 4, kernel, kernel), torch.randn(3, 4)
    up, down = mode == "up", mode == "down"
    out = modulated_conv2d(x, weight, styles, demodulate, up=up, down=down, resample_filter=fir_filter())
    p = kernel // 2
    for n, w in enumerate(_modulated_weights(weight, styles, demodulate)):
        xn = x[n : n + 1]
        if mode == "up":  # transposed conv 6 -> 10 + k, then the FIR (gain 4) -> 12
            pad = p + 3 - kernel
            expected = _fir_reference(F.conv_transpose2d(xn, w.transpose(0, 1), stride=2), pad, pad, gain=4)
        elif mode == "down":  # FIR 6 -> 4 + k, then stride-2 conv -> 3
            expected = F.conv2d(_fir_reference(xn, p + 1, p + 1), w, stride=2)
        else:
            expected = F.conv2d(xn, w, padding=p)
        assert out[n : n + 1].shape == expected.shape
        torch.testing.assert_close(out[n : n + 1], expected, rtol=1e-5, atol=1e-5)
    assert out.shape == (3, 5, *[{"same": 6, "up": 12, "down": 3}[mode]] * 2)


def test_minibatch_std_against_hand_computation() -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 4, 2, 2)
    out = MinibatchStd(group_size=2, num_channels=2)(x)
    assert out.shape == (4, 6, 2, 2)
    torch.testing.assert_close(out[:, :4], x)
    for i in range(4):
        group = [j for j in range(4) if j % 2 == i % 2]  # strided groups: n = 2 groups of G = 2
        for f in range(2):
            values = []
            for c in (2 * f, 2 * f + 1):
                for h in range(2):
                    for w in range(2):
                        v = [x[j, c, h, w].item() for j in group]
                        mean = sum(v) / len(v)
                        values.append(math.sqrt(sum((a - mean) ** 2 for a in v) / len(v) + 1e-8))
            expected = sum(values) / len(values)
            torch.testing.assert_close(out[i, 4 + f], torch.full((2, 2), expected))


def test_minibatch_std_keeps_its_group_on_uneven_batches() -> None:
    """A rank of 3 images with group 2 computes the std over 2 images, like a rank of 2 (no group of 1)."""
    x = torch.randn(3, 2, 4, 4)
    out = MinibatchStd(group_size=2)(x)  # k = 1 group: samples 0 and 1; sample 2 is left over
    expected = (x[:2].var(dim=0, unbiased=False) + 1e-8).sqrt().mean()
    for i in range(3):
        torch.testing.assert_close(out[i, 2], torch.full((4, 4), expected.item()))
    assert out[:, 2].std() == 0 and expected > 0.5  # a real spread, not the constant sqrt(1e-8) of a group of 1
    six = torch.randn(6, 2, 4, 4)
    groups = MinibatchStd(group_size=4)(six)  # k = 1 group of 4 (samples 0-3); 4 and 5 take its statistic
    expected = (six[:4].var(dim=0, unbiased=False) + 1e-8).sqrt().mean()
    torch.testing.assert_close(groups[:, 2], torch.full((6, 4, 4), expected.item()))
    assert MinibatchStd(group_size=4)(torch.randn(2, 2, 4, 4)).shape == (2, 3, 4, 4)  # smaller than G: one group


# ---------------------------------------------------------------- networks


@pytest.mark.parametrize("num_classes", [0, 3])
@pytest.mark.parametrize(("resolution", "channels"), [(32, 1), (32, 3), (64, 1), (64, 3)])
def test_shapes_and_every_parameter_gets_a_gradient(resolution: int, channels: int, num_classes: int) -> None:
    g, d = _g(resolution, channels, num_classes), _d(resolution, channels, num_classes)
    assert g.num_ws == 2 * int(math.log2(resolution)) - 2
    labels = torch.tensor([0, 1, 2, 1]) if num_classes else None
    images, ws = g(torch.randn(4, Z), labels, style_mix_prob=0.5, noise_mode="random", return_ws=True)
    assert images.shape == (4, channels, resolution, resolution) and images.dtype == torch.float32
    assert ws.shape == (4, g.num_ws, Z)
    logits = d(images, labels)
    assert logits.shape == (4,) and torch.isfinite(logits).all()
    logits.sum().backward()
    missing = [name for name, p in [*g.named_parameters(), *d.named_parameters()] if p.grad is None]
    assert not missing


def test_labels_required_iff_conditional() -> None:
    g, d, d_cond = _g(num_classes=3), _d(), _d(num_classes=3)
    images = torch.randn(2, 3, 32, 32)
    with pytest.raises(ValueError, match="conditional"):
        g(torch.randn(2, Z))
    with pytest.raises(ValueError, match="conditional"):
        d_cond(images)
    with pytest.raises(ValueError, match="unconditional"):
        d(images, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="class indices"):
        g(torch.randn(2, Z), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="class indices"):
        d_cond(images, torch.tensor([1]))  # one label for two images would broadcast silently


def test_truncation_and_w_avg_update() -> None:
    g = _g()
    z = torch.randn(5, Z)
    g.mapping.update_w_avg(torch.randn(Z), beta=0.0)  # beta 0: w_avg becomes the given mean
    w_avg = g.mapping.w_avg.clone()
    truncated = g.mapping_forward(z, truncation_psi=0.0)
    torch.testing.assert_close(truncated, w_avg.expand(5, g.num_ws, Z), rtol=0, atol=0)
    plain = g.mapping_forward(z)
    torch.testing.assert_close(g.mapping_forward(z, truncation_psi=1.0, truncation_cutoff=3), plain, rtol=0, atol=0)
    half = g.mapping_forward(z, truncation_psi=0.5, truncation_cutoff=3)
    torch.testing.assert_close(half[:, :3], (plain[:, :3] + w_avg) / 2)
    torch.testing.assert_close(half[:, 3:], plain[:, 3:], rtol=0, atol=0)
    torch.testing.assert_close(g.mapping.w_avg, w_avg, rtol=0, atol=0)  # forward never moves w_avg
    mean = torch.randn(Z)
    g.mapping.update_w_avg(mean, beta=0.9)
    torch.testing.assert_close(g.mapping.w_avg, 0.9 * w_avg + 0.1 * mean)


def test_style_mixing_splits_layers_in_two_groups() -> None:
    g = _g()
    z = torch.randn(6, Z)
    _, ws = g(z, style_mix_prob=1.0, noise_mode="none", return_ws=True)
    for sample in ws:
        differs = (sample != sample[0]).any(dim=1)  # layers that are not the first layer's w
        cutoff = int(differs.float().argmax())
        assert 1 <= cutoff < g.num_ws
        assert differs[cutoff:].all() and (sample[cutoff:] == sample[-1]).all()
    _, ws = g(z, style_mix_prob=0.0, noise_mode="none", return_ws=True)
    assert (ws == ws[:, :1]).all()


def test_style_mixing_decides_per_sample() -> None:
    g = _g()
    z = torch.randn(2000, Z)
    with torch.no_grad():
        ws = g.mix_styles(g.mapping_forward(z), z, None, prob=0.3)
    mixed = (ws != ws[:, :1]).any(dim=2)  # [N, num_ws]
    assert not mixed[:, 0].any()
    assert mixed.any(dim=1).float().mean().item() == pytest.approx(0.3, abs=0.05)
    cutoffs = mixed.float().argmax(dim=1)[mixed.any(dim=1)]
    assert set(cutoffs.tolist()) == set(range(1, g.num_ws))  # every cutoff in [1, num_ws) occurs


def test_noise_modes() -> None:
    g = _g()
    with torch.no_grad():
        for name, p in g.named_parameters():
            if name.endswith("noise_strength"):
                p.fill_(0.5)
    z = torch.randn(2, Z)
    torch.testing.assert_close(g(z, noise_mode="const"), g(z, noise_mode="const"), rtol=0, atol=0)
    assert not torch.allclose(g(z, noise_mode="const"), g(z, noise_mode="none"))
    assert not torch.allclose(g(z, noise_mode="random"), g(z, noise_mode="random"))
    torch.manual_seed(3)
    first = g(z)
    torch.manual_seed(3)
    torch.testing.assert_close(g(z), first, rtol=0, atol=0)  # random noise comes from the global RNG
    with pytest.raises(ValueError, match="noise_mode"):
        g(z, noise_mode="fixed")


def test_same_seed_same_networks_and_outputs() -> None:
    outs = []
    for _ in range(2):
        g, d = _g(num_classes=3, seed=7), _d(num_classes=3, seed=8)
        torch.manual_seed(1)
        labels = torch.tensor([0, 2, 1, 1])
        images = g(torch.randn(4, Z), labels, style_mix_prob=0.5)
        outs.append((images, d(images, labels), g.state_dict()))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=0, atol=0)
    torch.testing.assert_close(outs[0][1], outs[1][1], rtol=0, atol=0)
    torch.testing.assert_close(outs[0][2], outs[1][2], rtol=0, atol=0)
    other = _g(num_classes=3, seed=9).state_dict()  # noise_const buffers do not depend on the seed
    assert all(torch.equal(other[k], v) for k, v in outs[0][2].items() if k.endswith("noise_const"))


@pytest.mark.parametrize("style_mix_prob", [0.0, 0.5])
def test_return_ws_supports_the_path_length_double_backward(style_mix_prob: float) -> None:
    g = _g()
    images, ws = g(torch.randn(4, Z), style_mix_prob=style_mix_prob, return_ws=True)
    noise = torch.randn_like(images) / 32
    (grad,) = torch.autograd.grad((images * noise).sum(), ws, create_graph=True)
    assert grad.shape == ws.shape and grad.abs().sum() > 0
    grad.square().sum(dim=2).mean(dim=1).sqrt().mean().backward()
    conv = g.synthesis.blocks[-1].convs[0].conv
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0
    assert g.mapping.layers[0].weight.grad.abs().sum() > 0


def test_discriminator_supports_the_r1_double_backward() -> None:
    d = _d(num_classes=3)
    real = torch.randn(4, 3, 32, 32, requires_grad=True)
    (grad,) = torch.autograd.grad(d(real, torch.tensor([0, 1, 2, 0])).sum(), real, create_graph=True)
    grad.square().sum().backward()  # through the in-place lrelus and the residual sums
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in d.blocks.parameters())


def test_state_dict_layout_is_stable() -> None:
    """Checkpoints store these names and shapes; speed work must not rename or reshape them."""
    g = Generator(8, 8, 8, 3, 0, mapping_layers=1, channel_base=64, channel_max=8)
    d = Discriminator(8, 3, 0, channel_base=64, channel_max=8, mapping_layers=1)
    g_state, d_state = ({k: tuple(v.shape) for k, v in net.state_dict().items()} for net in (g, d))
    assert len(g_state) == 30 and len(d_state) == 13
    layer, torgb = "synthesis.blocks.1.convs.1.", "synthesis.blocks.1.torgb."
    expected = {
        "synthesis.const": (8, 4, 4), "mapping.w_avg": (8,), "mapping.layers.0.weight": (8, 8),
        layer + "conv.weight": (8, 8, 3, 3), layer + "conv.affine.bias": (8,), layer + "noise_const": (8, 8),
        layer + "noise_strength": (), layer + "bias": (8,), torgb + "conv.weight": (3, 8, 1, 1), torgb + "bias": (3,),
        "blocks.0.fromrgb.weight": (8, 3, 1, 1), "blocks.0.conv1.bias": (8,), "blocks.0.skip.weight": (8, 8, 1, 1),
        "epilogue.conv.weight": (8, 9, 3, 3), "epilogue.fc.weight": (8, 128), "epilogue.out.bias": (1,),
    }  # fmt: skip
    assert expected.items() <= (g_state | d_state).items()


def test_channels_last_matches_contiguous() -> None:
    g, d = _g(num_classes=3), _d(num_classes=3)
    z, labels = torch.randn(4, Z), torch.tensor([0, 1, 2, 0])
    g_cl = copy.deepcopy(g).to(memory_format=torch.channels_last)
    d_cl = copy.deepcopy(d).to(memory_format=torch.channels_last)
    images = g(z, labels, noise_mode="const")
    torch.testing.assert_close(g_cl(z, labels, noise_mode="const"), images, rtol=1e-5, atol=1e-5)
    logits_cl = d_cl(images.contiguous(memory_format=torch.channels_last), labels)
    torch.testing.assert_close(logits_cl, d(images, labels), rtol=1e-5, atol=1e-5)


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_bf16_blocks_run_on_cpu_close_to_fp32() -> None:
    g, g16 = _g(), _g(bf16_resolutions=2)
    d, d16 = _d(), _d(bf16_resolutions=2)
    assert [b.bf16 for b in g16.synthesis.blocks] == [False, False, True, True]
    assert [b.bf16 for b in d16.blocks] == [True, True, False]
    dtypes: list[torch.dtype] = []

    def record(_module, _inputs, out) -> None:
        dtypes.extend(o.dtype for o in (out if isinstance(out, tuple) else [out]))

    for block in [*g16.synthesis.blocks, *d16.blocks]:
        block.register_forward_hook(record)
    z = torch.randn(4, Z)
    images, images16 = g(z, noise_mode="const"), g16(z, noise_mode="const")
    assert images16.dtype == torch.float32 and torch.isfinite(images16).all()
    assert _relative_error(images16, images) < 0.03
    logits16 = d16(images)
    assert logits16.dtype == torch.float32 and torch.isfinite(logits16).all()
    assert _relative_error(logits16, d(images)) < 0.03
    assert dtypes and set(dtypes) == {torch.float32}  # every block hands float32 on


def test_torch_compile_matches_eager() -> None:
    g, d = _g(num_classes=3), _d(num_classes=3)
    z, labels = torch.randn(4, Z), torch.tensor([0, 1, 2, 0])
    images = g(z, labels, noise_mode="const")
    compiled = torch.compile(g)(z, labels, noise_mode="const")
    torch.testing.assert_close(compiled, images, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.compile(d)(images, labels), d(images, labels), rtol=1e-4, atol=1e-4)

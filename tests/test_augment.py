"""DiffAugment, the ADA pipeline and its p controller: hand-computed p steps, a real 2-process all-reduce,
exact identity at p = 0, geometric and colour maths on small images, gradients, seeding and state dicts."""

from __future__ import annotations

import os
import socket
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from gan_dist.augment import AdaController, AugmentPipe, DiffAugment, build_augment
from gan_dist.augment.ada import COLOR, GEOMETRIC

STEP = 64 * 4 / 500_000  # one update's move of p for batch 64, interval 4, speed 500 kimg


def _images(n: int = 8, channels: int = 3, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, channels, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _pipe(channels: int = 3, p: float = 1.0, only: str | None = None, multiplier: float = 1.0) -> AugmentPipe:
    """A pipe with p set and every transform on, or only ``only`` (at ``multiplier``)."""
    strengths = {} if only is None else {**{k: 0 for k in GEOMETRIC + COLOR}, only: multiplier}
    pipe = AugmentPipe(channels, **strengths)
    pipe.p.fill_(p)
    return pipe


def _logits(positive: int, negative: int) -> torch.Tensor:
    return torch.tensor([1.5] * positive + [-0.5] * negative)


def _shifted(img: torch.Tensor, dy: int, dx: int, border: str) -> torch.Tensor:
    """out[y, x] = img[y - dy, x - dx]; outside the image 0 ("zero") or the mirrored pixel ("reflect")."""
    h, w = img.shape[-2:]
    rows, cols = torch.arange(h) - dy, torch.arange(w) - dx
    if border == "zero":
        inside = ((rows >= 0) & (rows < h))[:, None] & ((cols >= 0) & (cols < w))[None, :]
        return img[..., rows.clamp(0, h - 1)[:, None], cols.clamp(0, w - 1)[None, :]] * inside
    # Reflection about the pixel edges, as grid_sample with align_corners=False: -1 -> 0, h -> h - 1.
    rows = torch.where(rows < 0, -rows - 1, torch.where(rows >= h, 2 * h - 1 - rows, rows))
    cols = torch.where(cols < 0, -cols - 1, torch.where(cols >= w, 2 * w - 1 - cols, cols))
    return img[..., rows[:, None], cols[None, :]]


def _matching_shift(out: torch.Tensor, img: torch.Tensor, border: str, max_shift: int) -> tuple[int, int] | None:
    """The (dy, dx) with |dy|, |dx| <= max_shift for which ``out`` is ``img`` shifted, if any."""
    span = range(-max_shift, max_shift + 1)
    shifts = [(dy, dx) for dy in span for dx in span]
    return next((s for s in shifts if torch.allclose(out, _shifted(img, *s, border), atol=1e-5)), None)


# AdaController


def _run_intervals(ada: AdaController, pipe: AugmentPipe, batches: list[torch.Tensor], done: int = 0) -> list[dict]:
    """Feed ``batches`` one per D step, after ``done`` steps so far, updating every ``interval`` steps."""
    reports = []
    for i, logits in enumerate(batches, start=done + 1):
        ada.accumulate(logits)
        if i % ada.interval == 0:
            reports.append(ada.update(pipe))
    return reports


def test_p_rises_by_one_step_per_update_when_rt_is_above_target():
    pipe, ada = AugmentPipe(3), AdaController(target=0.6, interval=4, speed_kimg=500, batch_size=64)
    assert ada.step_size == pytest.approx(0.000512)
    reports = _run_intervals(ada, pipe, [_logits(9, 1)] * 12)  # r_t = (9 - 1) / 10 = 0.8 each interval
    assert [r["augment/rt"] for r in reports] == pytest.approx([0.8] * 3)
    assert [r["augment/p"] for r in reports] == pytest.approx([STEP, 2 * STEP, 3 * STEP], abs=1e-7)
    assert pipe.p.item() == reports[-1]["augment/p"]
    assert ada.updates == 3


def test_p_falls_and_clamps_at_zero_and_one():
    pipe, ada = AugmentPipe(1), AdaController(target=0.6, interval=4, speed_kimg=500, batch_size=64)
    pipe.p.fill_(0.0007)
    reports = _run_intervals(ada, pipe, [_logits(3, 2)] * 12)  # r_t = 0.2
    assert [r["augment/p"] for r in reports] == pytest.approx([0.0007 - STEP, 0.0, 0.0], abs=1e-7)
    pipe.p.fill_(1 - STEP / 2)
    assert ada.update(pipe)["augment/p"] == pytest.approx(1 - STEP / 2)  # nothing accumulated: p stays
    assert _run_intervals(ada, pipe, [_logits(1, 0)] * 4)[0]["augment/p"] == 1.0


def test_several_updates_follow_the_sign_of_rt_minus_target():
    pipe, ada = AugmentPipe(3), AdaController(target=0.6, interval=2, speed_kimg=1, batch_size=100)
    # step = 100 * 2 / 1000 = 0.2; per interval r_t = 1, 0.6 (no move), -1, 0.8, 0.8 (2 logits at 0 count as 0)
    batches = [_logits(4, 0), _logits(2, 0)] + [_logits(4, 1)] * 2 + [_logits(0, 3)] * 2
    batches += [_logits(9, 1)] * 2 + [_logits(4, 0), torch.zeros(1)]
    reports = _run_intervals(ada, pipe, batches)
    assert [r["augment/rt"] for r in reports] == pytest.approx([1.0, 0.6, -1.0, 0.8, 0.8])
    assert [r["augment/p"] for r in reports] == pytest.approx([0.2, 0.2, 0.0, 0.2, 0.4], abs=1e-6)


def test_accumulate_detaches_and_keeps_no_graph():
    ada = AdaController(batch_size=8)
    logits = torch.randn(8, requires_grad=True)
    ada.accumulate(logits * 2)
    totals = ada.state_dict()["totals"]
    assert not totals.requires_grad and totals[1].item() == 8


def _ddp_worker(rank: int, port: int, batches: list[list[torch.Tensor]], out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=60))
    try:
        pipe, ada = AugmentPipe(3), AdaController(interval=2, speed_kimg=0.1, batch_size=22)
        pipe.p.fill_(0.5)
        torch.save(_run_intervals(ada, pipe, batches[rank]), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_all_reduce_gives_every_rank_the_p_of_the_pooled_logits(tmp_path):
    # Rank 0 sees 2 logits with r_t = 1, rank 1 sees 20 with r_t = 0.4: the pooled r_t is 10/22 < 0.6 (p
    # falls) although the mean of the two ranks' r_t is 0.7. The second interval swaps the direction.
    rank0 = [_logits(1, 0), _logits(1, 0), _logits(0, 1), _logits(0, 1)]
    rank1 = [_logits(7, 3), _logits(7, 3), _logits(10, 0), _logits(10, 0)]
    torch.multiprocessing.spawn(_ddp_worker, args=(_free_port(), [rank0, rank1], str(tmp_path)), nprocs=2)
    per_rank = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert per_rank[0] == per_rank[1]

    pipe, ada = AugmentPipe(3), AdaController(interval=2, speed_kimg=0.1, batch_size=22)
    pipe.p.fill_(0.5)
    single = _run_intervals(ada, pipe, [torch.cat(pair) for pair in zip(rank0, rank1, strict=True)])
    assert per_rank[0] == single
    assert [r["augment/rt"] for r in single] == pytest.approx([10 / 22, 18 / 22])
    step = 22 * 2 / 100
    assert [r["augment/p"] for r in single] == pytest.approx([0.5 - step, 0.5], abs=1e-6)


# Identity, shapes, dtypes, gradients, seeding


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_pipe_is_exact_identity_at_p0_and_keeps_shape_and_dtype_at_p1(channels, dtype):
    x = _images(channels=channels).to(dtype)
    pipe = AugmentPipe(channels)
    out = pipe(x)
    assert out.dtype == dtype and torch.equal(out, x)
    pipe.p.fill_(1.0)
    out = pipe(x)
    assert out.shape == x.shape and out.dtype == dtype
    assert out.isfinite().all() and not torch.equal(out, x)


@pytest.mark.parametrize("channels", [1, 3])
def test_pipe_computes_in_float32_under_bf16_autocast(channels):
    """Under bf16 autocast (train.precision=bf16) the matrices and resampling stay float32: the same output as
    without autocast (before: mean error 0.06, max 1.3 on a [-1, 1] image at p = 1)."""
    x, pipe = _images(channels=channels), AugmentPipe(channels)
    pipe.p.fill_(1.0)
    plain = pipe(x, generator=torch.Generator().manual_seed(3))
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        autocast = pipe(x, generator=torch.Generator().manual_seed(3))
    assert autocast.dtype == torch.float32
    torch.testing.assert_close(autocast, plain, rtol=0, atol=1e-5)


def test_grey_images_ignore_lumaflip_hue_and_saturation():
    pipe = AugmentPipe(1, **{name: 0 for name in GEOMETRIC + ("brightness", "contrast")})
    pipe.p.fill_(1.0)
    x = _images(channels=1)
    assert torch.equal(pipe(x), x)


@pytest.mark.parametrize("policy", ["color", "translation", "cutout", "color,translation,cutout"])
@pytest.mark.parametrize("channels", [1, 3])
def test_diffaugment_changes_images_and_keeps_shape(policy, channels):
    x = _images(channels=channels)
    out = DiffAugment(policy)(x, generator=torch.Generator().manual_seed(1))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert not torch.equal(out, x)


_MODULES = {
    **{f"diffaug-{op}": (lambda op=op: DiffAugment(op)) for op in ("color", "translation", "cutout")},
    "diffaug-all": DiffAugment,
    **{f"ada-{name}": (lambda name=name: _pipe(only=name)) for name in GEOMETRIC + COLOR},
    "ada-all": _pipe,
}


@pytest.mark.parametrize("name", sorted(_MODULES))
def test_gradients_reach_the_input(name):
    x = _images().requires_grad_(True)
    weights = torch.rand(x.shape, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(0)
    (grad,) = torch.autograd.grad((_MODULES[name]()(x) * weights).sum(), x)
    assert grad.isfinite().all() and grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["diffaug-all", "ada-all"])
def test_same_seed_same_augmentation(name):
    module, x = _MODULES[name](), _images()

    def seeded(seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        return module(x)

    def generated(seed: int) -> torch.Tensor:
        return module(x, generator=torch.Generator().manual_seed(seed))

    for run in (seeded, generated):
        assert torch.equal(run(3), run(3))
        assert not torch.equal(run(3), run(4))
    torch.manual_seed(5)
    state = torch.get_rng_state()
    generated(6)
    assert torch.equal(torch.get_rng_state(), state)  # an explicit generator leaves the global RNG alone


# ADA maths on hand-checkable cases (p = 1, one transform on)


def _pairs(pipe: AugmentPipe, x: torch.Tensor, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(zip(pipe(x, generator=torch.Generator().manual_seed(seed)), x, strict=True))


def test_xflip_mirrors_some_samples_and_leaves_the_others():
    flipped = []
    for out, img in _pairs(_pipe(only="xflip"), _images()):
        flipped.append(torch.allclose(out, img.flip(-1), atol=1e-5))
        assert flipped[-1] or torch.equal(out, img)
    assert any(flipped) and not all(flipped)


def test_rotate90_gives_one_of_the_four_rot90_images():
    turns = set()
    for out, img in _pairs(_pipe(only="rotate90"), _images()):
        matches = [k for k in range(4) if torch.allclose(out, torch.rot90(img, k, dims=(1, 2)), atol=1e-5)]
        assert len(matches) == 1
        turns.add(matches[0])
    assert len(turns) > 1


def test_integer_translation_shifts_whole_pixels_with_reflected_border():
    shifts = [_matching_shift(out, img, "reflect", 2) for out, img in _pairs(_pipe(only="xint"), _images())]
    assert None not in shifts  # |shift| <= round(0.125 * 16) = 2 on each axis
    assert any(shift != (0, 0) for shift in shifts)


@pytest.mark.parametrize("channels", [1, 3])
def test_brightness_adds_one_constant_per_sample(channels):
    x = _images(channels=channels)
    delta = (_pipe(channels, only="brightness")(x) - x).flatten(1)
    assert torch.allclose(delta, delta[:, :1].expand_as(delta), atol=1e-6)
    assert (delta[:, 0] != 0).any()


@pytest.mark.parametrize("channels", [1, 3])
def test_contrast_scales_about_mid_grey(channels):
    x = _images(channels=channels)
    out = _pipe(channels, only="contrast")(x)
    factor = (out * x).flatten(1).sum(1) / x.square().flatten(1).sum(1)  # least squares out = c * x
    assert torch.allclose(out, factor[:, None, None, None] * x, atol=1e-5)
    assert (factor > 0).all() and (factor != 1).any()


def _luma_chroma(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    luma = x.mean(dim=1, keepdim=True)
    return luma, x - luma


def test_lumaflip_negates_luma_or_leaves_it_and_keeps_chroma():
    x = _images()
    (luma, chroma), (out_luma, out_chroma) = _luma_chroma(x), _luma_chroma(_pipe(only="lumaflip")(x))
    assert torch.allclose(out_chroma, chroma, atol=1e-5)
    flipped = [torch.allclose(o, -i, atol=1e-5) for o, i in zip(out_luma, luma, strict=True)]
    assert all(f or torch.allclose(o, i, atol=1e-5) for f, o, i in zip(flipped, out_luma, luma, strict=True))
    assert any(flipped) and not all(flipped)


def test_hue_rotates_chroma_about_the_luma_axis():
    x = _images()
    (luma, chroma), (out_luma, out_chroma) = _luma_chroma(x), _luma_chroma(_pipe(only="hue")(x))
    assert torch.allclose(out_luma, luma, atol=1e-5)
    assert torch.allclose(out_chroma.norm(dim=1), chroma.norm(dim=1), atol=1e-5)
    assert not torch.allclose(out_chroma, chroma, atol=1e-3)


def test_saturation_scales_chroma_per_sample():
    x = _images()
    (luma, chroma), (out_luma, out_chroma) = _luma_chroma(x), _luma_chroma(_pipe(only="saturation")(x))
    assert torch.allclose(out_luma, luma, atol=1e-5)
    factor = out_chroma.flatten(1).norm(dim=1) / chroma.flatten(1).norm(dim=1)
    assert torch.allclose(out_chroma, factor[:, None, None, None] * chroma, atol=1e-5)
    assert (factor != 1).any()


@pytest.mark.parametrize(
    ("name", "multiplier", "p", "untouched"),
    [
        ("rotate", 1, 0.5, 0.5),
        ("brightness", 1, 0.3, 0.7),
        ("brightness", 0.5, 0.8, 0.6),
        ("saturation", 1, 0.4, 0.6),
        ("xflip", 1, 0.5, 0.75),
    ],
)
def test_each_sample_is_transformed_with_probability_p_times_multiplier(name, multiplier, p, untouched):
    # Untouched samples stay bit for bit. rotate: pre and post each with 1 - sqrt(1 - p), so neither with
    # probability 1 - p; a gated x-flip flips half the time.
    x = _images(n=4000, size=4)
    out = _pipe(3, p, name, multiplier)(x, generator=torch.Generator().manual_seed(0))
    same = (out == x).flatten(1).all(dim=1).float().mean().item()
    assert same == pytest.approx(untouched, abs=0.03)  # about 4 standard deviations


# DiffAugment maths


@pytest.mark.parametrize("channels", [1, 3])
def test_diffaugment_color_shifts_the_mean_and_scales_luma_and_chroma(channels):
    x = _images(channels=channels)
    out = DiffAugment("color")(x, generator=torch.Generator().manual_seed(0))
    shift = out.mean(dim=(1, 2, 3)) - x.mean(dim=(1, 2, 3))  # brightness; saturation and contrast keep the mean
    assert (shift.abs() <= 0.5).all()
    (luma, chroma), (out_luma, out_chroma) = _luma_chroma(x), _luma_chroma(out)
    centred = luma - luma.mean(dim=(2, 3), keepdim=True)
    out_centred = out_luma - out_luma.mean(dim=(2, 3), keepdim=True)
    contrast = out_centred.flatten(1).norm(dim=1) / centred.flatten(1).norm(dim=1)
    assert torch.allclose(out_centred, contrast[:, None, None, None] * centred, atol=1e-5)
    assert ((contrast >= 0.5) & (contrast <= 1.5)).all()
    if channels == 3:  # saturation times contrast on the chroma
        chroma_scale = out_chroma.flatten(1).norm(dim=1) / chroma.flatten(1).norm(dim=1)
        assert torch.allclose(out_chroma, chroma_scale[:, None, None, None] * chroma, atol=1e-5)
        assert (chroma_scale <= 3).all()


def test_diffaugment_translation_shifts_with_zero_fill():
    x = _images()
    out = DiffAugment("translation")(x, generator=torch.Generator().manual_seed(0))
    shifts = [_matching_shift(o, i, "zero", 2) for o, i in zip(out, x, strict=True)]
    assert None not in shifts and any(shift != (0, 0) for shift in shifts)


def test_diffaugment_cutout_zeroes_one_square_of_half_the_side():
    x = _images() * 0.5 + 0.75  # in [0.25, 1.25]: no pixel is 0 before the cut
    out = DiffAugment("cutout")(x, generator=torch.Generator().manual_seed(0))
    for o, i in zip(out, x, strict=True):
        cut = o != i
        assert (o[cut] == 0).all() and (cut == cut[0]).all()  # zeroed, the same pixels in every channel
        rows, cols = cut[0].any(dim=1).nonzero().flatten(), cut[0].any(dim=0).nonzero().flatten()
        height, width = rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1
        assert cut[0].sum() == height * width  # a filled rectangle
        assert 4 <= height <= 8 and 4 <= width <= 8  # 8 x 8, clipped to at least half at the border


# State dicts, factory, errors


def test_pipe_p_is_a_buffer_that_round_trips():
    pipe = AugmentPipe(3)
    assert pipe.p.shape == () and pipe.p.item() == 0.0
    pipe.p.fill_(0.37)
    fresh = AugmentPipe(3)
    fresh.load_state_dict(pipe.state_dict())
    assert torch.equal(fresh.p, pipe.p) and "p" in dict(fresh.named_buffers())


def test_controller_resumed_mid_interval_continues_bit_identically():
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(16, generator=gen) + 0.9 for _ in range(20)]  # r_t about 0.63

    def fresh() -> tuple[AugmentPipe, AdaController]:
        return AugmentPipe(3), AdaController(target=0.6, interval=4, speed_kimg=1, batch_size=16)

    pipe, ada = fresh()
    straight = _run_intervals(ada, pipe, batches)

    pipe, ada = fresh()
    first = _run_intervals(ada, pipe, batches[:10])  # two updates, then half an interval accumulated
    pipe_state, ada_state = pipe.state_dict(), ada.state_dict()
    assert ada_state["updates"] == 2 and ada_state["totals"][1].item() == 32
    pipe, ada = fresh()
    pipe.load_state_dict(pipe_state)
    ada.load_state_dict(ada_state)
    resumed = first + _run_intervals(ada, pipe, batches[10:], done=10)
    assert len({r["augment/p"] for r in straight}) > 2  # p moved
    assert resumed == straight
    assert ada.updates == 5


def test_build_augment():
    assert build_augment("none", 3) is None
    assert build_augment("diffaug", 3, policy="color").policy == ("color",)
    pipe = build_augment("ada", 1, xflip=0.5)
    assert isinstance(pipe, AugmentPipe) and pipe.channels == 1 and pipe.strengths["xflip"] == 0.5
    with pytest.raises(ValueError, match="unknown augment"):
        build_augment("mixup", 3)


def test_invalid_arguments_raise():
    with pytest.raises(ValueError, match="zoom"):
        DiffAugment("color,zoom")
    with pytest.raises(ValueError, match="1 or 3 channels"):
        AugmentPipe(2)
    with pytest.raises(ValueError, match="expected images"):
        AugmentPipe(3)(_images(channels=1))
    with pytest.raises(ValueError, match="interval"):
        AdaController(interval=0, batch_size=8)

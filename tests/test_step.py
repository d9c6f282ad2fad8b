"""The train step: EMA maths, and every loss and regularizer under a real 2-process gloo DDP group compared
with one process doing the same work on the whole batch (same initial weights, same inputs)."""

from __future__ import annotations

import os
import socket
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from gan_dist.config import build_config
from gan_dist.data.plan import rank_batch
from gan_dist.train.checkpoint import capture_rng, seed_rank_streams
from gan_dist.train.modules import bare, build_modules, parameter_digest
from gan_dist.train.phases import all_gather
from gan_dist.train.step import (
    DiscriminatorBatch,
    GeneratorBatch,
    discriminator_step,
    ema_beta,
    ema_decay_at,
    generator_step,
    standing_statistics,
    update_ema,
)

BATCH = 8
TINY = ["model.g_width=8", "model.d_width=8", "model.z_dim=16", f"train.batch_size={BATCH}"]
NO_BATCHNORM = ["model.g_batchnorm=false", "model.d_norm=none"]  # per-rank BN statistics differ by design
R3GAN_TINY = ["model.arch=r3gan", "model.z_dim=16", "model.channel_base=128", "model.channel_max=16",
              "model.group_width=8", f"train.batch_size={BATCH}"]  # fmt: skip


def test_ema_update_rule_by_hand():
    ema, model = nn.Linear(2, 1), nn.Linear(2, 1)
    with torch.no_grad():
        ema.weight.copy_(torch.tensor([[1.0, 2.0]]))
        model.weight.copy_(torch.tensor([[3.0, -2.0]]))
    update_ema(ema, model, decay=0.75)
    # 0.75 * [1, 2] + 0.25 * [3, -2] = [1.5, 1.0]
    assert torch.allclose(ema.weight, torch.tensor([[1.5, 1.0]]))


def test_ema_keeps_its_own_batchnorm_statistics_and_copies_other_buffers():
    ema, model = nn.Sequential(nn.BatchNorm1d(3)), nn.Sequential(nn.BatchNorm1d(3))
    model[0].running_mean.fill_(4.0)
    model.register_buffer("w_avg", torch.full((2,), 7.0))
    ema.register_buffer("w_avg", torch.zeros(2))
    update_ema(ema, model, decay=0.9)
    assert torch.equal(ema[0].running_mean, torch.zeros(3))  # not G's: recomputed for EMA-G's own weights
    assert torch.equal(ema.w_avg, model.w_avg)


def test_standing_statistics_match_the_generators_own_outputs():
    torch.manual_seed(0)
    g = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)).eval()
    g[1].running_mean.fill_(100.0)  # stale statistics from other weights
    standing_statistics(g, z_dim=4, batch_size=16, batches=3, seed=5)
    noise = torch.Generator().manual_seed(5)
    with torch.no_grad():
        outputs = torch.stack([g[0](torch.randn(16, 4, generator=noise)) for _ in range(3)])
    assert torch.allclose(g[1].running_mean, outputs.mean((0, 1)), atol=1e-6)
    assert torch.allclose(g[1].running_var, outputs.var(1, unbiased=True).mean(0), atol=1e-6)
    assert not g.training and g[1].momentum == 0.1


def test_ema_decay_warms_up_then_caps():
    assert ema_decay_at(0, 0.999) == pytest.approx(0.1)
    assert ema_decay_at(90, 0.999) == pytest.approx(91 / 100)
    assert ema_decay_at(10**6, 0.999) == 0.999


def test_ema_half_life_in_images_with_rampup():
    cfg = build_config({"data": {"url": "/unused"}}, ["train.batch_size=64", "train.ema_kimg=10"])
    assert ema_beta(cfg, 0) == pytest.approx(0.5 ** (64 / 10_000))  # half-life of 10k images
    ramped = build_config({"data": {"url": "/unused"}}, ["train.batch_size=64", "train.ema_kimg=10", "train.ema_rampup=0.05"])
    assert ema_beta(ramped, 0) == pytest.approx(0.5 ** (64 / (64 * 0.05)))  # 1 step seen: 3.2 images
    assert ema_beta(ramped, 10**6) == ema_beta(cfg, 10**6)


def test_lazy_regularization_scales_adam_like_stylegan2_ada():
    """With optim.lazy_reg_scaling, R1 every 16 D steps and path length every 4 G steps: D's lr x 16/17 and
    betas ^ 16/17, G's x 4/5 (StyleGAN2-ADA's mb_ratio); off by default, and for a non-style-based arch."""
    options = ["model.arch=stylegan2", "model.channel_base=256", "model.channel_max=16", "model.z_dim=16",
               "model.w_dim=16", "model.mapping_layers=2", "loss.r1_gamma=1", "loss.r1_every=16", "loss.pl_every=4",
               "optim.g_lr=0.0025", "optim.d_lr=0.002", "optim.betas=[0.0, 0.99]"]  # fmt: skip
    m = build_modules(build_config({"data": {"url": "/unused"}}, options + ["optim.lazy_reg_scaling=true"]), torch.device("cpu"))
    d, g = m.opt_d.param_groups[0], m.opt_g.param_groups[0]
    assert d["lr"] == pytest.approx(0.002 * 16 / 17) and d["betas"] == pytest.approx((0.0, 0.99 ** (16 / 17)))
    assert g["lr"] == pytest.approx(0.0025 * 4 / 5) and g["betas"] == pytest.approx((0.0, 0.99 ** (4 / 5)))
    plain = build_modules(build_config({"data": {"url": "/unused"}}, options), torch.device("cpu"))
    assert plain.opt_d.param_groups[0]["lr"] == 0.002 and plain.opt_g.param_groups[0]["betas"] == (0.0, 0.99)
    dcgan = build_modules(build_config({"data": {"url": "/unused"}}, TINY + NO_BATCHNORM + ["loss.r1_gamma=1", "loss.r1_every=16",
                                                                     "optim.lazy_reg_scaling=true"]), torch.device("cpu"))  # fmt: skip
    assert dcgan.opt_d.param_groups[0]["lr"] == 2e-4


def test_resumed_streams_are_each_ranks_own_even_from_a_checkpoint_that_shared_one():
    """A checkpoint of per-rank streams comes back exactly; one written before ranks had streams of their own
    (every rank's global stream the same) gets new, different streams instead of the shared one again."""
    noise = torch.Generator()
    torch.manual_seed(5)
    first = capture_rng(noise)
    torch.manual_seed(6)
    own = [first, capture_rng(noise)]
    seed_rank_streams(noise, 0, 1, 2, 10, own)
    assert torch.equal(torch.get_rng_state(), own[1]["torch"])
    shared = [first, first]  # as checkpoints written before ranks had streams of their own hold them
    states = []
    for rank in range(2):
        seed_rank_streams(noise, 0, rank, 2, 10, shared)
        states.append(torch.get_rng_state())
    assert not torch.equal(states[0], states[1]) and not torch.equal(states[0], first["torch"])


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _inputs(cfg, steps: int = 1):
    """The whole global batch's inputs for ``steps`` iterations, the same in every process."""
    gen = torch.Generator().manual_seed(1234)
    res, z_dim, n = cfg.data.resolution, cfg.model.z_dim, cfg.train.n_critic
    return [
        {
            "real": torch.rand(n, BATCH, cfg.data.channels, res, res, generator=gen) * 2 - 1,
            "z_d": torch.randn(n, BATCH, z_dim, generator=gen),
            "eps": torch.rand(n, BATCH, generator=gen),
            "z_g": torch.randn(BATCH, z_dim, generator=gen),
            "labels": torch.randint(0, 4, (n, BATCH), generator=gen),
        }
        for _ in range(steps)
    ]


def _train(cfg, rank: int, world: int, steps: int = 1) -> dict:
    """Run ``steps`` iterations on this rank's share of the inputs; return the state to compare."""
    device = torch.device("cpu")
    m = build_modules(cfg, device)
    share = slice(rank * BATCH // world, (rank + 1) * BATCH // world)  # the trainer's rank_batch split
    untouched = True
    for step, x in enumerate(_inputs(cfg, steps)):
        labels = x["labels"][:, share] if cfg.model.conditional else [None] * cfg.train.n_critic
        for k in range(cfg.train.n_critic):
            batch = DiscriminatorBatch(x["real"][k][share], x["z_d"][k][share], x["eps"][k][share], labels[k])
            discriminator_step(m, cfg, batch, step * cfg.train.n_critic + k)
        d_before = [(p.detach().clone(), p.grad.clone()) for p in bare(m.d).parameters()]
        generator_step(m, cfg, batch.then_generator(x["z_g"][share]), step)
        untouched &= all(torch.equal(a, p) and torch.equal(g, p.grad) for (a, g), p in zip(d_before, bare(m.d).parameters()))
    tensors = {f"{name}.{k}": v.detach().clone() for name, net in (("g", bare(m.g)), ("d", bare(m.d)), ("g_ema", m.g_ema))
               for k, v in net.state_dict().items()}  # fmt: skip
    for name, net in (("g", bare(m.g)), ("d", bare(m.d))):
        tensors.update({f"{name}.grad.{i}": p.grad.clone() for i, p in enumerate(net.parameters())})
    for name, opt in (("opt_g", m.opt_g), ("opt_d", m.opt_d)):
        for i, moments in opt.state_dict()["state"].items():
            tensors.update({f"{name}.{i}.{k}": v.clone() for k, v in moments.items() if k != "step"})
    return {"tensors": tensors, "digest": parameter_digest(m), "d_untouched_by_g_step": untouched}


def _ddp_worker(rank, world, port, overrides, steps, result_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        cfg = build_config({"data": {"url": "/unused"}}, overrides + [f"scaling.num_workers={world}"])
        torch.save(_train(cfg, rank, world, steps), os.path.join(result_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


CASES = {
    "minimax": ["loss.name=minimax"],
    "nonsaturating": ["loss.name=nonsaturating"],
    "lsgan": ["loss.name=lsgan"],
    "wgan-clipping": ["loss.name=wgan", "loss.clip=0.01"],
    "wgan-gp": ["loss.name=wgan-gp"],
    "hinge-resnet-sn": ["loss.name=hinge", "model.arch=resnet"],
    "rpgan-r1-r2": ["loss.name=rpgan", "loss.r1_gamma=1.0", "loss.r2_gamma=0.5", "loss.r1_every=1"],
    "r3gan-rpgan-r1-r2-conditional": ["loss.name=rpgan", "loss.r1_gamma=1.0", "loss.r2_gamma=1.0", "loss.r1_every=1",
                                      "model.conditional=true", "model.num_classes=4"],
    "lazy-r1": ["loss.name=nonsaturating", "loss.r1_gamma=2.0", "loss.r1_every=2"],
    "n-critic-2": ["loss.name=wgan-gp", "train.n_critic=2", "loss.r1_gamma=1.0", "loss.r1_every=2"],
    "accumulate-2": ["loss.name=hinge", "train.accumulate=2", "loss.r1_gamma=1.0", "loss.r1_every=1"],
    "conditional-mlp-acgan": ["model.arch=mlp", "model.conditional=true", "model.num_classes=4", "loss.ac_weight=1"],
    "three-uneven-ranks-micro-batches": ["loss.name=hinge", "scaling.num_workers=3", "train.micro_batch=2",
                                         "loss.r1_gamma=1.0", "loss.r1_every=1"],  # shares 2, 3, 3; micro 2+1
    "clip-and-schedule": ["optim.d_clip_norm=0.01", "optim.g_clip_norm=0.01", "optim.g_schedule.warmup_steps=3",
                          "optim.d_schedule.kind=cosine"],
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_two_ranks_equal_one_process_on_the_whole_batch(tmp_path, case):
    """One (or two, for EMA and Adam's second moments) D+G iterations on 2 gloo ranks with B/2 each equal
    the same iterations in one process with batch B: gradients, parameters, Adam moments, EMA-G."""
    overrides = (R3GAN_TINY if case.startswith("r3gan") else TINY + NO_BATCHNORM) + CASES[case]
    steps, world = 2, 3 if "scaling.num_workers=3" in overrides else 2
    mp.spawn(_ddp_worker, args=(world, _free_port(), overrides, steps, str(tmp_path)), nprocs=world, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)]
    single = ["scaling.num_workers=1", "train.accumulate=1", "train.micro_batch=null"]
    single_cfg = build_config({"data": {"url": "/unused"}}, overrides + single)
    reference = _train(single_cfg, rank=0, world=1, steps=steps)

    assert all(r["d_untouched_by_g_step"] for r in ranks + [reference]), "the G step changed D's weights or gradients"
    assert len({r["digest"] for r in ranks}) == 1, "replicas diverged"
    got, want = ranks[0]["tensors"], reference["tensors"]
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=5e-4, atol=1e-5, msg=lambda m: f"{case}: {key}: {m}")


STYLEGAN2 = ["model.arch=stylegan2", "model.channel_base=256", "model.channel_max=16", "model.z_dim=16",
             "model.w_dim=16", "model.mapping_layers=2", "train.batch_size=8", "loss.r1_gamma=1", "loss.r1_every=1",
             "loss.pl_every=1", "augment.kind=ada", "augment.interval=1", "augment.target=0.1"]  # fmt: skip


def _spawn(worker, world: int, *args) -> list[dict]:
    """Run ``worker(rank, world, port, result_dir, *args)`` on ``world`` gloo ranks; their saved records."""
    with tempfile.TemporaryDirectory() as result_dir:
        mp.spawn(worker, args=(world, _free_port(), result_dir, *args), nprocs=world, join=True)
        return [torch.load(os.path.join(result_dir, f"rank{r}.pt"), weights_only=True) for r in range(world)]


def _init(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)


@torch.no_grad()
def _draws(m) -> dict[str, torch.Tensor]:
    """What the global RNG decides in a StyleGAN2 + ADA step, made visible on fixed inputs: ADA's transforms
    of fixed images (p = 1), G's noise inputs (an image from a fixed z, noise strength raised from its
    initial 0, no mixing) and style mixing (the styles of a fixed z with mixing always on)."""
    fixed = torch.Generator().manual_seed(7)
    images, z = torch.rand(4, 1, 32, 32, generator=fixed) * 2 - 1, torch.randn(4, 16, generator=fixed)
    g, p = bare(m.g), m.augment.p.clone()
    m.augment.p.fill_(1.0)
    strengths = [layer.noise_strength for layer in g.modules() if hasattr(layer, "noise_strength")]
    for strength in strengths:
        strength.fill_(1.0)
    out = {"augmented": m.augment(images), "noise_inputs": g(z), "mixed_styles": g(z, style_mix_prob=1.0, return_ws=True)[1]}
    for strength in strengths:
        strength.fill_(0.0)
    m.augment.p.copy_(p)
    return out


def _stylegan2_worker(rank, world, port, result_dir):
    _init(rank, world, port)
    try:
        cfg = build_config({"data": {"url": "/unused"}}, STYLEGAN2 + [f"scaling.num_workers={world}"])
        m = build_modules(cfg, torch.device("cpu"))
        noise = torch.Generator()
        seed_rank_streams(noise, cfg.train.seed, rank, world, 0, None)  # what every rank does on a fresh start
        saved = all_gather(capture_rng(noise), world)  # what a checkpoint keeps
        first = _draws(m)
        seed_rank_streams(noise, cfg.train.seed, rank, world, 0, saved)  # what a resume at the same world does
        again = _draws(m)
        terms = {}
        for step in range(3):
            real = torch.rand(4, 1, 32, 32, generator=noise) * 2 - 1
            terms.update(discriminator_step(m, cfg, DiscriminatorBatch(real, torch.randn(4, 16, generator=noise)), step))
            m.ada.update(m.augment)
            terms.update(generator_step(m, cfg, GeneratorBatch(torch.randn(4, 16, generator=noise)), step))
        record = {"digest": parameter_digest(m), "pl_mean": m.pl_mean.clone(), "p": m.augment.p.clone(),
                  "w_avg": bare(m.g).mapping.w_avg.clone(), "terms": sorted(terms), "draws": first, "again": again}  # fmt: skip
        torch.save(record, os.path.join(result_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_stylegan2_ranks_draw_their_own_noise_augmentation_and_mixing_and_stay_in_sync():
    """With each rank's streams set as the trainer sets them (nothing seeded per rank here): two ranks'
    ADA transforms, noise inputs and style mixing differ at the same step, the same streams restored draw the
    same again, and the state every rank must share stays bit-identical: weights, EMA-G, the mean style, the
    running path length, ADA's p (every parameter gets a gradient: DDP would raise on an unused one)."""
    ranks = _spawn(_stylegan2_worker, 2)
    for key in ("augmented", "noise_inputs", "mixed_styles"):
        assert not torch.allclose(ranks[0]["draws"][key], ranks[1]["draws"][key]), f"both ranks drew the same {key}"
        for r in ranks:
            assert torch.equal(r["draws"][key], r["again"][key]), f"a resumed rank drew other {key}"
    assert ranks[0]["digest"] == ranks[1]["digest"]
    for key in ("pl_mean", "p", "w_avg"):
        assert torch.equal(ranks[0][key], ranks[1][key]), key
    assert ranks[0]["pl_mean"] > 0 and ranks[0]["w_avg"].abs().sum() > 0 and ranks[0]["p"] > 0
    assert {"losses/d_r1", "losses/g_pl", "regularizers/pl_mean"} <= set(ranks[0]["terms"])


# Noise inputs start at strength 0 and mixing is off, and a group of 1 makes minibatch-stddev per sample: the
# D step (with R1) and the mean style are then deterministic, so they can be compared with one process.
UNEVEN = STYLEGAN2 + ["model.style_mixing=0", "model.mbstd_group_size=1", "augment.kind=none", "loss.pl_batch_shrink=1"]


def _uneven_worker(rank, world, port, result_dir, overrides):
    _init(rank, world, port)
    try:
        result = _stylegan2_step(overrides + [f"scaling.num_workers={world}"], rank, world)
        torch.save(result, os.path.join(result_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _stylegan2_step(overrides: list[str], rank: int, world: int) -> dict:
    """One D and one G step of StyleGAN2 with R1 and path length due, on this rank's share of fixed inputs,
    recording every collective the step issues."""
    cfg = build_config({"data": {"url": "/unused"}}, UNEVEN + overrides)
    m = build_modules(cfg, torch.device("cpu"))
    seed_rank_streams(torch.Generator(), cfg.train.seed, rank, world, 0, None)
    gen = torch.Generator().manual_seed(99)
    real, z_d, z_g = torch.rand(8, 1, 32, 32, generator=gen) * 2 - 1, torch.randn(8, 16, generator=gen), torch.randn(8, 16, generator=gen)
    start = sum(rank_batch(8, world, r) for r in range(rank))
    share = slice(start, start + rank_batch(8, world, rank))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        discriminator_step(m, cfg, DiscriminatorBatch(real[share], z_d[share]), 0)
        d_params = [p.detach().clone() for p in bare(m.d).parameters()]
        generator_step(m, cfg, GeneratorBatch(z_g[share]), 0)
    return {"collectives": [e.name for e in prof.events() if e.name.startswith("gloo:")], "pl_mean": m.pl_mean.clone(),
            "w_avg": bare(m.g).mapping.w_avg.clone(), "d_params": d_params, "digest": parameter_digest(m)}  # fmt: skip


def test_three_uneven_ranks_with_micro_batches_and_path_length_agree_with_one_process():
    """Shares of 2, 3 and 3 images in micro-batches of at most 2: every rank runs 2 micro-batches (the same
    collectives; before, 1 vs 2 hung in the path-length all-reduce), ends with the same running path length,
    and the step's deterministic parts equal one process on the whole batch."""
    ranks = _spawn(_uneven_worker, 3, ["train.micro_batch=2"])
    reference = _stylegan2_step(["scaling.num_workers=1"], rank=0, world=1)
    assert len({r["digest"] for r in ranks}) == 1, "replicas diverged"
    assert all(torch.equal(r["pl_mean"], ranks[0]["pl_mean"]) for r in ranks) and ranks[0]["pl_mean"] > 0
    assert all(r["collectives"] == ranks[0]["collectives"] for r in ranks)
    for got, want in zip(ranks[0]["d_params"], reference["d_params"]):
        torch.testing.assert_close(got, want, rtol=5e-4, atol=1e-5)
    torch.testing.assert_close(ranks[0]["w_avg"], reference["w_avg"], rtol=1e-5, atol=1e-6)
    # pl_mean moved once, from every rank's lengths: the same order of size as one process's (its draws differ)
    assert 0.5 < float(ranks[0]["pl_mean"] / reference["pl_mean"]) < 2.0


ARCH_CASES = {
    "mlp": TINY + NO_BATCHNORM + ["model.arch=mlp"],
    "dcgan": TINY + NO_BATCHNORM + ["model.arch=dcgan"],
    "resnet-sn": TINY + NO_BATCHNORM + ["model.arch=resnet", "model.d_spectral_norm=true"],
    "stylegan2": UNEVEN,
    "r3gan": ["model.arch=r3gan", "model.z_dim=16", "model.channel_base=128", "model.channel_max=16",
              "model.group_width=8"],
}


def _collectives_worker(rank, world, port, result_dir):
    _init(rank, world, port)
    try:
        records = {}
        for arch, options in ARCH_CASES.items():
            overrides = options + [f"scaling.num_workers={world}", "train.micro_batch=2", "loss.r1_gamma=1",
                                   "loss.r1_every=1", "train.batch_size=8"]  # fmt: skip
            cfg = build_config({"data": {"url": "/unused"}}, overrides)
            m = build_modules(cfg, torch.device("cpu"))
            seed_rank_streams(torch.Generator(), cfg.train.seed, rank, world, 0, None)
            share = rank_batch(8, world, rank)
            real, z = torch.rand(share, 1, 32, 32) * 2 - 1, torch.randn(share, cfg.model.z_dim)
            for step in range(3):  # DDP rebuilds its buckets after the first step (a broadcast in the second)
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                    discriminator_step(m, cfg, DiscriminatorBatch(real, z), step)
                    generator_step(m, cfg, GeneratorBatch(z), step)
            buckets = [len(net._get_ddp_logging_data()["bucket_sizes"].split(",")) for net in (m.d, m.g)]
            records[arch] = {"collectives": [e.name for e in prof.events() if e.name.startswith("gloo:")], "buckets": buckets}
        torch.save(records, os.path.join(result_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_collectives_of_one_step_per_arch():
    """One training step (D with R1, then G; path length for stylegan2) on 3 uneven ranks in micro-batches,
    for every arch: every rank issues the same collectives; they are DDP's gradient buckets of D and of G (one
    reduction per step, however many micro-batches), plus one all-reduce for a style-based G's mean style and
    path lengths; no buffer broadcasts."""
    ranks = _spawn(_collectives_worker, 3)
    for arch in ARCH_CASES:
        got = [r[arch]["collectives"] for r in ranks]
        assert all(c == got[0] for c in got), f"{arch}: ranks issued different collectives: {got}"
        d_buckets, g_buckets = ranks[0][arch]["buckets"]
        expected = d_buckets + g_buckets + (1 if arch == "stylegan2" else 0)
        assert got[0] == ["gloo:all_reduce"] * expected, f"{arch}: {got[0]}"

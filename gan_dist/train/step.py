"""One discriminator step and one generator step, correct under DDP, and the EMA generator that follows G.

DDP all-reduces gradients of every parameter used in a DDP forward. So each step runs only the network it
trains through its DDP wrapper and calls the other one's bare module:

- D step: fakes come from the bare G under ``no_grad`` (no G graph, no G all-reduce); D runs through DDP.
- G step: D's parameters are frozen and D is called bare, so D gets no gradient, no all-reduce and no
  update; only G's gradients are averaged across ranks. A relativistic loss (rpgan) also shows D the D step's
  real images there, each fake judged against one.

A step may run as micro-batches (``train.accumulate``, ``train.micro_batch``): gradients of every micro-batch
add up (each loss weighted by its share) and DDP reduces once, on the last (``no_sync`` on the others), so
accumulating k x B/k equals one step of B. Every rank runs the same number of micro-batches, even when the
global batch splits unevenly, so every rank issues the same collectives in the same order: per step, DDP's
gradient buckets for the network trained, plus (G step of a style-based G) one all-reduce that carries both
the mean style and the path lengths. Penalties (WGAN-GP, R1, R2, path length) are computed in float32 outside
autocast and go through the same ``backward()`` as the adversarial loss. Every returned term is a detached
tensor: nothing here waits for the device.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parallel import DistributedDataParallel

from gan_dist.config import GanConfig
from gan_dist.losses import RELATIVISTIC, discriminator_loss, generator_loss, gradient_penalty, path_lengths
from gan_dist.losses import zero_centred_penalty
from gan_dist.train.modules import GanModules, bare

# Losses whose D output is a logit of "real": report D(x) as a probability, as the seeds do.
PROBABILITY_LOSSES = ("minimax", "nonsaturating")
W_AVG_BETA = 0.995  # StyleGAN2's tracking of the mean style, for truncation

Terms = dict[str, Tensor | tuple[Tensor, Tensor]]  # a term, or (value, weight) for a weighted window mean

# Schedules count iterations, including the fp16 steps the GradScaler skips (so they stay aligned with the
# step count across resumes); torch warns about exactly that once.
warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before `optimizer\.step\(\)`")


@dataclass
class DiscriminatorBatch:
    """One D step's inputs on this rank: real images, latents for the fakes, (WGAN-GP) mixing weights, and for
    a conditional model the real images' labels (the fakes are drawn for the same labels)."""

    real: Tensor
    z: Tensor
    gp_eps: Tensor | None = None
    labels: Tensor | None = None

    def split(self, parts: int) -> list[DiscriminatorBatch]:
        return _split(self, parts)

    def then_generator(self, z: Tensor) -> GeneratorBatch:
        """The G step after this D step: latents ``z`` for this batch's classes, judged (with a relativistic
        loss) against this batch's real images."""
        return GeneratorBatch(z, self.labels, self.real)


@dataclass
class GeneratorBatch:
    z: Tensor
    labels: Tensor | None = None  # the classes to draw (a conditional model)
    real: Tensor | None = None  # a relativistic loss pairs each fake with one of these (as many as z)

    def split(self, parts: int) -> list[GeneratorBatch]:
        return _split(self, parts)


def _split(batch: DiscriminatorBatch | GeneratorBatch, parts: int) -> list:
    """``parts`` micro-batches whose sizes differ by at most one."""
    chunks = {f.name: v.tensor_split(parts) if (v := getattr(batch, f.name)) is not None else [None] * parts
              for f in fields(batch)}  # fmt: skip
    return [type(batch)(**{name: c[i] for name, c in chunks.items()}) for i in range(parts)]


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _loss_weights(parts: list, total: int, global_batch: int) -> list[tuple[float, float]]:
    """Per micro-batch: (its share of this rank's batch, the factor its mean loss is scaled by before the
    backward). DDP averages gradients over W ranks; scaling a micro-batch of n images by n * W / G makes
    that average the gradient of the mean over all G images, whatever the split (uneven rank shares in
    elastic runs, uneven micro-batches)."""
    sizes = [len(p.z) for p in parts]
    return [(n / total, n * _world() / global_batch) for n in sizes]


def autocast_context(cfg: GanConfig, device: torch.device) -> contextlib.AbstractContextManager:
    if cfg.train.precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def _sync_on_last(module: nn.Module, last: bool) -> contextlib.AbstractContextManager:
    """DDP reduces gradients on the last micro-batch only."""
    return module.no_sync() if isinstance(module, DistributedDataParallel) and not last else contextlib.nullcontext()


def _through_augment(m: GanModules, d: nn.Module) -> Callable[[Tensor, Tensor | None], Tensor | tuple[Tensor, Tensor]]:
    """D as the step sees it: every image it judges, real or fake, augmented first."""
    if m.augment is None:
        return lambda images, labels: d(images, labels) if labels is not None else d(images)
    return lambda images, labels: d(m.augment(images), labels) if labels is not None else d(m.augment(images))


def _logits(out: Tensor | tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor | None]:
    """D's logit [N] and, with the AC-GAN head, its class logits [N, classes]."""
    return out if isinstance(out, tuple) else (out, None)


def _classification(class_logits: Tensor | None, labels: Tensor | None) -> Tensor | None:
    return None if class_logits is None else F.cross_entropy(class_logits.float(), labels)


def _score_mean(logits: Tensor, loss_name: str) -> Tensor:
    scores = torch.sigmoid(logits) if loss_name in PROBABILITY_LOSSES else logits
    return scores.detach().float().mean()


def discriminator_step(m: GanModules, cfg: GanConfig, batch: DiscriminatorBatch, index: int) -> Terms:
    """One D update (``index``: D steps so far, for lazy R1). Returns detached terms (no host sync)."""
    device, loss = batch.real.device, cfg.loss
    lazy_due = index % loss.r1_every == 0  # R1 and R2 share the lazy interval
    judge, penalized = _through_augment(m, m.d_fast), _through_augment(m, m.d)
    parts = batch.split(cfg.micro_batches(_world()))
    weights = _loss_weights(parts, len(batch.z), cfg.train.batch_size)
    terms: dict[str, Tensor] = {}
    m.opt_d.zero_grad(set_to_none=True)
    for i, (part, (share, scale)) in enumerate(zip(parts, weights)):
        labels = part.labels
        with _sync_on_last(m.d, i == len(parts) - 1):
            with torch.no_grad(), autocast_context(cfg, device):
                fake, _ = _generate(bare(m.g), part.z, labels, cfg)
            with autocast_context(cfg, device):
                real_logits, real_classes = _logits(judge(part.real, labels))
                fake_logits, fake_classes = _logits(judge(fake, labels))
                adv = discriminator_loss(loss.name, real_logits.float(), fake_logits.float())
            total = adv
            if real_classes is not None:  # AC-GAN: D also names the class of reals and of fakes
                ac = _classification(real_classes, labels) + _classification(fake_classes, labels)
                total = total + loss.ac_weight * ac
                _add(terms, "losses/d_ac", ac, share)
            critic = lambda images: _logits(penalized(images, labels))[0]  # noqa: E731  (penalties: the logit)
            if loss.name == "wgan-gp":
                gp = gradient_penalty(critic, part.real, fake.float(), part.gp_eps)
                total = total + loss.gp_weight * gp
                _add(terms, "losses/d_gp", gp, share)
            for key, gamma, images in (("d_r1", loss.r1_gamma, part.real), ("d_r2", loss.r2_gamma, fake)):
                if gamma and lazy_due:  # lazy (StyleGAN2): every k D steps, weight scaled by k
                    penalty = zero_centred_penalty(critic, images)
                    total = total + (gamma / 2) * loss.r1_every * penalty
                    _add(terms, f"losses/{key}", penalty, share)
            m.scaler_d.scale(total * scale).backward()
        _add(terms, "losses/d_adv", adv, share)
        _add(terms, "losses/d", total, share)
        _add(terms, "discriminator/real", _score_mean(real_logits, loss.name), share)
        if m.ada is not None:
            m.ada.accumulate(real_logits)
        _add(terms, "discriminator/fake", _score_mean(fake_logits, loss.name), share)
    out: Terms = dict(terms)
    out.update(_apply(m.d, m.opt_d, m.sched_d, m.scaler_d, cfg.optim.d_clip_norm, "d"))
    if loss.name == "wgan":
        with torch.no_grad():
            for p in bare(m.d).parameters():
                p.clamp_(-loss.clip, loss.clip)
    return out


def generator_step(m: GanModules, cfg: GanConfig, batch: GeneratorBatch, step: int) -> Terms:
    """One G update through a frozen, bare D; then the EMA generator (and the mean style) follow."""
    device, loss = batch.z.device, cfg.loss
    relativistic = loss.name in RELATIVISTIC
    if relativistic and (batch.real is None or len(batch.real) != len(batch.z)):
        raise ValueError(f"loss '{loss.name}' judges each fake against a real image: the G step needs as many real "
                         "images as latents (DiscriminatorBatch.then_generator)")
    pl_due = m.pl_mean is not None and step % loss.pl_every == 0
    d_bare = bare(m.d)
    judge = _through_augment(m, d_bare)
    parts = batch.split(cfg.micro_batches(_world()))
    weights = _loss_weights(parts, len(batch.z), cfg.train.batch_size)
    terms: dict[str, Tensor] = {}
    sums: dict[str, tuple[Tensor, int]] = {}  # the step's mean style and path lengths, summed over micro-batches
    d_bare.requires_grad_(False)
    try:
        m.opt_g.zero_grad(set_to_none=True)
        for i, (part, (share, scale)) in enumerate(zip(parts, weights)):
            with _sync_on_last(m.g, i == len(parts) - 1):
                with autocast_context(cfg, device):
                    images, ws = _generate(m.g_fast, part.z, part.labels, cfg)
                    fake_logits, fake_classes = _logits(judge(images, part.labels))
                    # a relativistic loss: D's (frozen) verdict on this step's reals, the fakes' pairs
                    real_logits = _logits(judge(part.real, part.labels))[0] if relativistic else None
                    adv = generator_loss(loss.name, fake_logits, real_logits)
                total = adv
                if fake_classes is not None:
                    ac = _classification(fake_classes, part.labels)
                    total = total + loss.ac_weight * ac
                    _add(terms, "losses/g_ac", ac, share)
                if pl_due:
                    pl, lengths = _path_length_penalty(m, cfg, part.z, part.labels)
                    total = total + loss.pl_weight * loss.pl_every * pl
                    _add(terms, "losses/g_pl", pl, share)
                    _accumulate(sums, "pl", lengths.detach().sum(), len(lengths))
                m.scaler_g.scale(total * scale).backward()
            _add(terms, "losses/g", adv, share)
            if ws is not None:
                _accumulate(sums, "w", ws[:, 0].detach().float().sum(0), len(ws))
    finally:
        d_bare.requires_grad_(True)
    out: Terms = dict(terms)
    out.update(_apply(m.g, m.opt_g, m.sched_g, m.scaler_g, cfg.optim.g_clip_norm, "g"))
    means = _means_across_ranks(sums)  # one all-reduce for both, the same on every rank
    if "w" in means:  # the mean style of this step's fakes over all ranks
        bare(m.g).mapping.update_w_avg(means["w"], W_AVG_BETA)
    if "pl" in means:  # once per step, from every rank's lengths: the same decay whatever the split
        m.pl_mean.copy_(m.pl_mean.lerp(means["pl"], cfg.loss.pl_decay))
    update_ema(m.g_ema, bare(m.g), ema_beta(cfg, step))
    if m.pl_mean is not None:
        out["regularizers/pl_mean"] = m.pl_mean.detach().clone()
    return out


def _generate(g: nn.Module, z: Tensor, labels: Tensor | None, cfg: GanConfig) -> tuple[Tensor, Tensor | None]:
    """G's images for ``z`` (and ``labels``) and, for a style-based G, the styles they came from (with style
    mixing)."""
    if hasattr(bare(getattr(g, "_orig_mod", g)), "mapping"):  # a compiled module keeps the original inside
        return g(z, labels, style_mix_prob=cfg.model.style_mixing, return_ws=True)
    return (g(z, labels) if labels is not None else g(z)), None


def _path_length_penalty(m: GanModules, cfg: GanConfig, z: Tensor, labels: Tensor | None) -> tuple[Tensor, Tensor]:
    """StyleGAN2's lazy path-length regularizer on a smaller batch, in float32: the penalty against the running
    mean ``pl_mean`` as the step found it, and the lengths (the step moves ``pl_mean`` once, after its last
    micro-batch, with every rank's lengths)."""
    keep = max(1, z.shape[0] // cfg.loss.pl_batch_shrink)
    with torch.autocast(device_type=z.device.type, enabled=False):
        kept = labels[:keep] if labels is not None else None
        images, ws = m.g(z[:keep], kept, style_mix_prob=cfg.model.style_mixing, return_ws=True)
        lengths = path_lengths(images, ws)
    return (lengths - m.pl_mean).square().mean(), lengths


def _accumulate(sums: dict[str, tuple[Tensor, int]], key: str, total: Tensor, count: int) -> None:
    previous, seen = sums.get(key, (0, 0))
    sums[key] = (previous + total, seen + count)


def _means_across_ranks(sums: dict[str, tuple[Tensor, int]]) -> dict[str, Tensor]:
    """Each key's mean over every rank's items, from this rank's (sum, count) per key (ranks' counts may
    differ), in one all-reduce. Every rank has the same keys (they depend on the step and the config only)."""
    if not sums:
        return {}
    keys = sorted(sums)
    totals = [sums[k][0].reshape(-1).float() for k in keys]
    counts = torch.tensor([float(sums[k][1]) for k in keys], device=totals[0].device)
    packed = torch.cat([*totals, counts])
    if _world() > 1:
        dist.all_reduce(packed)
    values = packed[: -len(keys)].split([t.numel() for t in totals])
    return {k: (v / packed[-len(keys) + i]).reshape(sums[k][0].shape) for i, (k, v) in enumerate(zip(keys, values))}


def _add(terms: dict[str, Tensor], key: str, value: Tensor, share: float) -> None:
    """A micro-batch's term, weighted by its share of the rank's batch (the sum is the rank's mean)."""
    terms[key] = terms.get(key, 0) + value.detach().float() * share


def _apply(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    clip_norm: float | None,
    name: str,
) -> Terms:
    """Unscale, measure (and clip) the gradient, step optimizer and schedule. A step the fp16 GradScaler
    skips for overflow is counted, and its (infinite) norm left out of the window's mean."""
    scaler.unscale_(optimizer)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if clip_norm is not None:
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
    else:
        norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=_device(model))
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()
    finite = torch.isfinite(norm)
    terms: Terms = {f"optim/{name}_grad_norm": (torch.where(finite, norm, 0.0).detach(), finite.float())}
    if scaler.is_enabled():
        terms[f"optim/{name}_amp_skipped"] = (~finite).float()
    return terms


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def ema_beta(cfg: GanConfig, step: int) -> float:
    """The EMA decay at ``step``: a half-life of ``train.ema_kimg`` thousand images (optionally ramped up
    with the images seen, StyleGAN2-ADA), else ``train.ema_decay`` with a warm-up."""
    if cfg.train.ema_kimg is None:
        return ema_decay_at(step, cfg.train.ema_decay)
    half_life = cfg.train.ema_kimg * 1000
    if cfg.train.ema_rampup is not None:
        half_life = min(half_life, (step + 1) * cfg.train.batch_size * cfg.train.ema_rampup)
    return 0.5 ** (cfg.train.batch_size / max(half_life, 1e-8))


def ema_decay_at(step: int, decay: float) -> float:
    """EMA decay with warm-up: early on the average follows G closely instead of lagging its random init."""
    return min(decay, (1.0 + step) / (10.0 + step))


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model for parameters; other buffers (the mean style, constant
    noise) are copied. BatchNorm statistics are not: they belong to the weights that produced them, so the
    EMA generator's are recomputed before it is used (``standing_statistics``)."""
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1.0 - decay)
    per_run = {id(b) for mod in model.modules() if isinstance(mod, _BatchNorm) for b in mod.buffers(recurse=False)}
    for e, b in zip(ema.buffers(), model.buffers(), strict=True):
        if id(b) not in per_run:
            e.copy_(b)


@torch.no_grad()
def standing_statistics(g: nn.Module, z_dim: int, batch_size: int, batches: int, seed: int, num_classes: int = 0) -> None:
    """BigGAN's standing statistics: the BatchNorm statistics of ``g`` recomputed as the average over
    ``batches`` batches of its own outputs from seeded noise, so they match its weights and are the same on
    every rank (a conditional G: for uniformly drawn classes). A generator without BatchNorm is left as it is.
    Leaves ``g`` in eval mode."""
    norms = [mod for mod in g.modules() if isinstance(mod, _BatchNorm)]
    if not norms:
        return
    momenta = [bn.momentum for bn in norms]
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum = None  # a cumulative average over the batches below
    noise = torch.Generator().manual_seed(seed)
    g.train()
    try:
        for _ in range(batches):
            z = torch.randn(batch_size, z_dim, generator=noise).to(_device(g))
            if num_classes:
                g(z, torch.randint(num_classes, (batch_size,), generator=noise).to(z.device))
            else:
                g(z)
    finally:
        g.eval()
        for bn, momentum in zip(norms, momenta):
            bn.momentum = momentum

"""Typed, validated job configuration: YAML file + repeatable ``--set section.key=value`` overrides.

Every mistake a user can make in a config is caught here, before Ray starts, and reported as one
``ConfigError`` that names the offending key.
"""

from __future__ import annotations

import copy
import os
import secrets
import time
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from gan_dist.augment import AUGMENTS
from gan_dist.losses import LOSSES
from gan_dist.models import ARCHITECTURES
from gan_dist.ramps import SchedulesConfig
from gan_dist.checks import check_combinations
from gan_dist.schema import COMBINATION, Section
from gan_dist.storage import StorageConfig

# ``model`` is one of the registered architectures' sections, chosen by its ``arch`` key (default dcgan).
ModelConfig = Annotated[Union[tuple(a.config for a in ARCHITECTURES.values())], Field(discriminator="arch")]
DEFAULT_ARCH = "dcgan"


class ConfigError(ValueError):
    """A config problem, with the dotted key it concerns."""

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        super().__init__(f"{key}: {message}" if key else message)


def _registered(name: str, registry: tuple[str, ...], what: str) -> str:
    """``name`` if the registry has it; the error lists the valid names."""
    if name not in registry:
        raise ValueError(f"unknown {what} '{name}'; valid names: {', '.join(registry)}")
    return name


class DataConfig(Section):
    url: str = Field(description="Shard directory, brace pattern (shard-{000000..000009}.tar) or URL")
    resolution: int = Field(32, ge=8, le=1024)
    channels: Literal[1, 3] = 1
    loader_workers: int = Field(1, ge=0, le=64, description="DataLoader worker processes per rank")
    shuffle_buffer: int = Field(512, ge=0, description="Samples shuffled in memory per loader worker")
    decode_cache_mb: float = Field(
        0,
        ge=0,
        description="Keep up to this many MB of decoded images per loader worker, so later epochs skip "
        "decoding (datasets that fit in memory: MNIST, CIFAR); 0 = decode every time",
    )
    random_flip: bool = False
    mode: Literal["exact", "resampled"] = Field(
        "exact",
        description="exact: each epoch reads every sample at most once (all but fewer than one global batch "
        "exactly once), split across ranks x loader workers; resampled: shards drawn with replacement",
    )
    class_balance: bool = Field(
        False, description="Draw each epoch's samples so that every class is equally frequent (labelled data)"
    )
    audit: bool = Field(
        False, description="Record which samples each rank trained on at each step (audit/ next to the checkpoints)"
    )


class LossConfig(Section):
    name: str = Field("nonsaturating", description=f"One of {', '.join(LOSSES)}")
    gp_weight: float = Field(10.0, ge=0, description="WGAN-GP gradient-penalty weight (lambda)")
    r1_gamma: float | None = Field(
        None, ge=0, description="R1 penalty weight; 0 disables it; unset: stylegan2 0.0002*R^2/batch, else 0"
    )
    r1_every: int = Field(16, ge=1, description="Lazy R1 (and R2): apply every k D steps, scaled by k")
    r2_gamma: float = Field(
        0.0, ge=0, description="R2 penalty weight: the zero-centred gradient penalty on fakes (R3GAN pairs it with R1)"
    )
    clip: float = Field(0.01, gt=0, description="WGAN weight-clipping bound")
    pl_weight: float | None = Field(None, ge=0, description="Path-length penalty weight; unset: stylegan2 2, else 0")
    pl_every: int = Field(4, ge=1, description="Lazy path length: every k G steps, scaled by k")
    pl_decay: float = Field(0.01, gt=0, le=1, description="Decay of the running path length pl_mean")
    pl_batch_shrink: int = Field(2, ge=1, description="The path-length batch is the per-rank batch / this")
    ac_weight: float = Field(0.0, ge=0, description="AC-GAN auxiliary classification loss weight (conditional)")

    @field_validator("name")
    @classmethod
    def _known_loss(cls, name: str) -> str:
        return _registered(name, LOSSES, "loss")


class ScheduleConfig(Section):
    """A learning-rate schedule over optimizer steps (PyTorch's schedulers)."""

    kind: Literal["constant", "step", "cosine"] = "constant"
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up over this many steps first")
    step_every: int = Field(10_000, ge=1, description="step: multiply the rate by gamma every this many steps")
    gamma: float = Field(0.5, gt=0, le=1, description="step: the factor")
    min_ratio: float = Field(0.0, ge=0, le=1, description="cosine: the final rate, as a fraction of the base rate")


class OptimConfig(Section):
    g_lr: float = Field(2e-4, gt=0)
    d_lr: float = Field(2e-4, gt=0, description="Set apart from g_lr for TTUR")
    betas: tuple[float, float] = (0.5, 0.999)
    eps: float = Field(1e-8, gt=0, description="Adam epsilon")
    g_schedule: ScheduleConfig = ScheduleConfig()
    d_schedule: ScheduleConfig = ScheduleConfig()
    g_clip_norm: float | None = Field(None, gt=0, description="Clip G's gradient norm to this (unset: no clipping)")
    d_clip_norm: float | None = Field(None, gt=0, description="Clip D's gradient norm to this (unset: no clipping)")
    lazy_reg_scaling: bool = Field(
        False,
        description="stylegan2 with lazy R1 / path length every k > 1 steps: Adam lr x k/(k+1) and betas^(k/(k+1)) "
        "for the regularized net, StyleGAN2-ADA's hyper-parameters verbatim. Off: gan_dist adds a due penalty to "
        "that step's loss (k optimizer steps per k minibatches, where StyleGAN2-ADA's separate penalty steps make "
        "k+1, which its scaling offsets), so the configured rates already are the per-minibatch rates",
    )


class AugmentConfig(Section):
    """Differentiable augmentation of every image D sees (real and fake, D and G steps)."""

    kind: str = Field("none", description=f"One of {', '.join(AUGMENTS)}")
    policy: str = Field("color,translation,cutout", description="diffaug: the transforms, comma-separated")
    target: float = Field(0.6, gt=0, lt=1, description="ada: target of r_t = E[sign(D(real))]")
    p: float | None = Field(None, ge=0, le=1, description="ada: a fixed probability instead of adapting it")
    interval: int = Field(4, ge=1, description="ada: D steps between adjustments of p")
    speed_kimg: float = Field(500, gt=0, description="ada: thousands of images for p to go from 0 to 1")

    @field_validator("kind")
    @classmethod
    def _known_kind(cls, kind: str) -> str:
        return _registered(kind, AUGMENTS, "augment")


class TrainConfig(Section):
    batch_size: int = Field(64, ge=1, description="Global batch, split across workers (shares differ by at most one)")
    steps: int = Field(1000, ge=1, description="Generator steps")
    seed: int = 0
    n_critic: int = Field(1, ge=1, description="D steps per G step")
    accumulate: int = Field(1, ge=1, description="Micro-batches per step on each rank (gradient accumulation)")
    micro_batch: int | None = Field(
        None, ge=1, description="At most this many images per forward on a rank: more micro-batches when fewer "
        "workers carry the global batch (elastic runs); unset: train.accumulate as given"
    )
    preempt_grace_s: float = Field(
        60.0, gt=0, description="After SIGTERM or a preemption notice: seconds to finish the step and checkpoint"
    )
    ema_decay: float = Field(0.999, ge=0, lt=1, description="EMA-G decay per step (with warm-up)")
    ema_kimg: float | None = Field(
        None, gt=0, description="EMA-G half-life in thousands of images (StyleGAN2-ADA); overrides ema_decay"
    )
    ema_rampup: float | None = Field(None, gt=0, description="With ema_kimg: half-life at most this x images seen")
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    channels_last: bool = Field(False, description="NHWC memory format for G, D and the image batches (GPU)")
    compile: bool = Field(False, description="torch.compile the adversarial passes of G and D (not the penalties)")
    sync_batchnorm: bool = False
    log_every: int = Field(50, ge=1)
    sample_every: int = Field(500, ge=1, description="Steps between fixed-noise sample grids")
    sample_grid: int = Field(64, ge=1, le=1024, description="Images in the sample grid")
    nan_action: Literal["stop", "rollback"] = Field(
        "stop", description="On a non-finite loss: stop with an error, or roll back to the last checkpoint"
    )
    max_rollbacks: int = Field(3, ge=0, description="Cap on NaN rollbacks per run attempt")
    max_failures: int = Field(2, ge=0, description="Times the worker group is restarted from the latest checkpoint after a failure")


class ScalingConfig(Section):
    num_workers: int | tuple[int, int] = Field(
        2, description="Ray workers (one per GPU): a count, or [min, max] to train on whatever fits (elastic)"
    )
    resize_check_s: float = Field(60.0, gt=0, description="Elastic: seconds between checks whether more workers fit")
    use_gpu: bool = False
    cpus_per_worker: float = Field(1, gt=0)

    @field_validator("num_workers")
    @classmethod
    def _positive(cls, value: int | tuple[int, int]) -> int | tuple[int, int]:
        low, high = (value, value) if isinstance(value, int) else value
        if not 1 <= low <= high:
            raise ValueError(f"needs 1 <= min <= max workers, got {value}")
        return value

    @property
    def elastic(self) -> bool:
        return isinstance(self.num_workers, tuple)

    @property
    def min_workers(self) -> int:
        return self.num_workers[0] if isinstance(self.num_workers, tuple) else self.num_workers

    @property
    def max_workers(self) -> int:
        return self.num_workers[1] if isinstance(self.num_workers, tuple) else self.num_workers


class CheckpointConfig(Section):
    storage: str = Field("./gan_dist_runs", description="Local path or URI (s3://...) for Ray Train storage")
    every: int = Field(500, ge=1)
    num_to_keep: int | None = Field(3, ge=1)
    keep_every: int | None = Field(None, ge=1, description="Also keep every checkpoint whose step is a multiple")
    async_upload: bool = Field(True, description="Upload checkpoints in the background while training goes on")
    resume_from: str | None = Field(None, description="Start from this checkpoint URI (e.g. to fine-tune)")
    resume_mode: Literal["finetune", "continue"] = Field(
        "finetune",
        description="finetune: take G, D and EMA-G weights, start at step 0 on a fresh data stream; "
        "continue: take the whole state (step, data position, optimizers, RNG)",
    )


class EvalConfig(Section):
    every: int = Field(0, ge=0, description="Steps between FID/KID evaluations; 0 disables")
    num_images: int = Field(2000, ge=2, description="Real and generated images per evaluation")
    extractor: Literal["inception", "classifier"] = "inception"
    per_class: int = Field(10, ge=0, description="Conditional models: intra-FID for up to this many classes")
    extractor_path: str | None = Field(None, description="Feature-network weights (path/URL); see README")
    mode_classifier: str | None = Field(
        None, description="Classifier file (train_classifier) naming each fake's class for quality/modes and "
        "quality/mode_kl; unset: a classifier extractor does (docs/evaluation.md)")
    batch_size: int = Field(100, ge=1)


class TrackingConfig(Section):
    uri: str = Field("sqlite:///gan_dist_mlflow.db", description="MLflow tracking URI")
    experiment: str = "gan_dist"
    system_metrics: bool = Field(False, description="Log CPU/GPU/memory system metrics")
    register_model: str | None = Field(None, description="Register the final generator under this model name")
    run_name: str | None = Field(
        None, description="The MLflow run this run logs to, by name (unset: run.name); a sweep's trial keeps its own "
        "when it continues from another trial's checkpoint (PBT)"
    )
    parent_run_id: str | None = Field(None, description="Nest the MLflow run under this run (a sweep's parent run)")


class RunConfig(Section):
    name: str = Field(default_factory=lambda: time.strftime("gan-%Y%m%d-%H%M%S-") + secrets.token_hex(3))


class GanConfig(Section):
    data: DataConfig
    model: ModelConfig = Field(default_factory=lambda: ARCHITECTURES[DEFAULT_ARCH].config())
    storage: StorageConfig = StorageConfig()
    loss: LossConfig = LossConfig()
    optim: OptimConfig = OptimConfig()
    augment: AugmentConfig = AugmentConfig()
    train: TrainConfig = TrainConfig()
    schedules: SchedulesConfig = SchedulesConfig()
    scaling: ScalingConfig = ScalingConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    eval: EvalConfig = EvalConfig()
    tracking: TrackingConfig = TrackingConfig()
    run: RunConfig = Field(default_factory=RunConfig)

    @model_validator(mode="before")
    @classmethod
    def _default_arch(cls, tree: Any) -> Any:
        model = tree.get("model") if isinstance(tree, dict) else None
        if isinstance(model, dict) and "arch" not in model:
            return {**tree, "model": {"arch": DEFAULT_ARCH, **model}}
        return tree

    @model_validator(mode="after")
    def _combinations(self) -> GanConfig:
        self._resolve_arch_defaults()
        check_combinations(self)
        return self

    def _resolve_arch_defaults(self) -> None:
        """Fill the keys whose default depends on the architecture, so the saved config says what ran."""
        style_based = hasattr(self.model, "mapping_layers")
        if self.loss.r1_gamma is None:  # StyleGAN2-ADA's heuristic: 0.0002 * resolution^2 / batch
            r1 = 0.0002 * self.data.resolution**2 / self.train.batch_size if style_based else 0.0
            object.__setattr__(self.loss, "r1_gamma", r1)  # no re-validation of the section mid-check
        if self.loss.pl_weight is None:
            object.__setattr__(self.loss, "pl_weight", 2.0 if style_based else 0.0)

    def micro_batches(self, world: int) -> int:
        """How many micro-batches every rank of a ``world``-rank group splits its share of a step into: the same
        on every rank (so every rank runs the same passes and collectives), enough for the largest share."""
        if self.train.micro_batch is None:
            return self.train.accumulate
        largest_share = -(-self.train.batch_size // world)
        return max(self.train.accumulate, -(-largest_share // self.train.micro_batch))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``tree["a"]["b"] = value`` for ``dotted`` "a.b", making the sections on the way."""
    *parents, leaf = dotted.split(".")
    node = tree
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(dotted, f"'{part}' is a value, not a section")
        node = child
    node[leaf] = value


def parse_override(item: str) -> tuple[str, Any]:
    """``a.b=v`` -> ("a.b", v) with v typed by YAML (numbers, booleans, lists, null)."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key or "." not in key:
        raise ConfigError(key or item, f"override must look like section.key=value, got '{item}'")
    try:
        return key, yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(key, f"value '{raw}' is not valid YAML: {exc}") from None


def _absolute_local(uri: str) -> str:
    """Relative local paths become absolute: Ray workers do not run in the driver's cwd."""
    if "://" in uri:
        return uri
    return str(Path(uri).expanduser().resolve())


def _absolute_sqlite(uri: str) -> str:
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + str(Path(uri[len(prefix) :]).resolve())
    return uri


def format_validation_error(exc: ValidationError) -> ConfigError:
    """pydantic's first error as one ConfigError that names its dotted key."""
    err = exc.errors()[0]
    msg = str(err["msg"])
    loc = list(err["loc"])
    arch = loc.pop(1) if loc[:1] == ["model"] and len(loc) > 1 and loc[1] in ARCHITECTURES else None
    key = ".".join(str(p) for p in loc)
    if err["type"] == COMBINATION:  # our cross-key checks name the key to blame
        key, msg = err["ctx"]["key"], err["ctx"]["message"]
    elif err["type"] == "union_tag_invalid":
        key, msg = "model.arch", f"unknown arch {err['input'].get('arch')!r}; choose one of {sorted(ARCHITECTURES)}"
    elif err["type"] == "extra_forbidden":
        msg = f"unknown key for model.arch={arch}" if arch else "unknown key"
    elif err["type"] == "value_error":  # our own validators' messages say what was wrong
        msg = msg.removeprefix("Value error, ")
    elif err["type"] == "missing":
        msg = "required key is missing"
    else:
        msg = f"{msg} (got {err.get('input')!r})"
    return ConfigError(key, msg)


def with_values(tree: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """A copy of the config tree ``tree`` with dotted ``values`` set (the caller's dict is left as it was)."""
    tree = copy.deepcopy(tree)
    for key, value in values.items():
        set_dotted(tree, key, value)
    return tree


def build_config(tree: dict[str, Any], overrides: list[str] | tuple[str, ...] = ()) -> GanConfig:
    """Validate a config tree plus overrides; relative local paths are made absolute."""
    tree = with_values(tree, dict(parse_override(item) for item in overrides))
    try:
        cfg = GanConfig.model_validate(tree)
    except ValidationError as exc:
        raise format_validation_error(exc) from None
    if "://" not in cfg.data.url:
        cfg.data.url = _absolute_local(cfg.data.url)
    cfg.checkpoint.storage = _absolute_local(cfg.checkpoint.storage)
    cfg.tracking.uri = _absolute_sqlite(cfg.tracking.uri)
    return cfg


def load_config(path: str | os.PathLike[str] | None, overrides: list[str] | tuple[str, ...] = ()) -> GanConfig:
    """Load YAML (or start empty) and apply ``section.key=value`` overrides."""
    tree: dict[str, Any] = {}
    if path is not None:
        loaded = read_yaml(path, "config file")
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError("", f"{path} must hold a mapping of sections, got {type(loaded).__name__}")
        tree = loaded or {}
    return build_config(tree, overrides)


def read_yaml(path: str | os.PathLike[str], what: str) -> Any:
    """The YAML document in ``path`` (a ``what``: named in the ConfigError if it is missing or not YAML)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError("", f"{what} not found: {p}")
    try:
        return yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError("", f"{p} is not valid YAML: {exc}") from None

"""A sweep's SPACE file: which job-config keys to search over and their domains, the metric to optimise and the
search (random, grid, ASHA early stopping or population-based training). Validated with pydantic; every key and
the ends of every domain are also checked against the job config (``check_against``) before Ray starts, so a bad
key or value fails naming it, as a bad ``--set`` does.

    params:
      loss.r1_gamma: {loguniform: [0.01, 10]}
      optim.g_lr: {choice: [1.0e-4, 2.0e-4, 4.0e-4]}
    metric: {name: quality/fid, mode: min}
    search: {kind: asha, num_samples: 8, max_concurrent: 2, asha: {grace_period: 500}}
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

from gan_dist.config import ConfigError, build_config, format_validation_error, read_yaml, with_values
from gan_dist.ramps import REPLACED_KEYS
from gan_dist.schema import Section, combination_error

# Keys a sweep sets itself in each trial (where it stores, logs, what it is called, how it uploads).
RESERVED = ("run.", "checkpoint.storage", "checkpoint.resume_from", "checkpoint.resume_mode", "checkpoint.async_upload",
            "tracking.")


class Domain(Section):
    """Exactly one of: a list to choose from, [lo, hi] sampled uniformly or log-uniformly, or a grid (every
    value tried, times ``search.num_samples``)."""

    choice: list[Any] | None = Field(None, min_length=1)
    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None
    grid: list[Any] | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _one_kind(self) -> Domain:
        given = [k for k in ("choice", "uniform", "loguniform", "grid") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of choice, uniform, loguniform, grid (got {given or 'none'})")
        if self.bounds is not None and not self.bounds[0] < self.bounds[1]:
            raise ValueError(f"{self.kind}: needs lo < hi, got {list(self.bounds)}")
        if self.loguniform is not None and self.loguniform[0] <= 0:
            raise ValueError(f"loguniform: needs lo > 0, got {self.loguniform[0]}")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in ("choice", "uniform", "loguniform", "grid") if getattr(self, k) is not None)

    @property
    def bounds(self) -> tuple[float, float] | None:
        return self.uniform or self.loguniform

    def probes(self) -> list[Any]:
        """Values that must be valid for every sample to be: each listed value, or both ends of a range and a
        fraction inside it (a range samples floats: an integer key needs choice or grid)."""
        if self.bounds is None:
            return list(getattr(self, self.kind))
        low, high = self.bounds
        return [low, high, low + (high - low) / math.e]

    def to_tune(self) -> Any:
        from ray import tune

        if self.choice is not None:
            return tune.choice(self.choice)
        if self.grid is not None:
            return tune.grid_search(self.grid)
        return tune.uniform(*self.uniform) if self.uniform is not None else tune.loguniform(*self.loguniform)

    def clip(self, value: Any) -> Any:
        """PBT's explore multiplies a sampled value by 0.8 or 1.2: keep it inside the range."""
        return min(max(value, self.bounds[0]), self.bounds[1]) if self.bounds else value


class Metric(Section):
    name: str = Field(min_length=1, description="A metric the trials log, e.g. quality/fid or losses/g")
    mode: Literal["min", "max"] = "min"

    def better(self, a: float, b: float) -> bool:
        """Whether ``a`` beats ``b`` (NaN never does)."""
        if math.isnan(a):
            return False
        return math.isnan(b) or (a < b if self.mode == "min" else a > b)


class AshaOptions(Section):
    grace_period: int = Field(ge=1, description="Steps every trial trains before it can be stopped")
    reduction_factor: float = Field(2.0, gt=1, description="Each rung keeps 1/this of the trials")


class PbtOptions(Section):
    perturbation_interval: int = Field(ge=1, description="Steps between exploit/explore decisions of a trial")
    quantile: float = Field(0.25, gt=0, le=0.5, description="The bottom share copies a top-share trial's state")
    resample_probability: float = Field(0.25, ge=0, le=1, description="Explore: resample instead of perturbing")
    synch: bool = Field(False, description="Every trial waits for the others at each interval (stopped and restarted "
                        "there): decisions on a whole population at the same step, at the price of restarts")


class Search(Section):
    kind: Literal["random", "grid", "asha", "pbt"] = "random"
    num_samples: int = Field(4, ge=1, description="Trials (grid: repeats of the whole grid)")
    max_concurrent: int | None = Field(None, ge=1, description="Trials at once; unset: as many as the cluster fits")
    seed: int = Field(0, description="Seeds the sampling of trial configs (and PBT's explore)")
    asha: AshaOptions | None = None
    pbt: PbtOptions | None = None


class SweepSpace(Section):
    params: dict[str, Domain] = Field(min_length=1)
    metric: Metric
    search: Search = Search()

    @model_validator(mode="after")
    def _combinations(self) -> SweepSpace:
        kind = self.search.kind
        for option in ("asha", "pbt"):
            if kind == option and getattr(self.search, option) is None:
                raise combination_error(f"search.{option}", f"search.kind={option} needs its options here")
            if kind != option and getattr(self.search, option) is not None:
                raise combination_error(f"search.{option}", f"only with search.kind={option}")
        pbt, search = self.search.pbt, self.search
        if pbt is not None and pbt.synch and (search.max_concurrent or 0) < search.num_samples:
            raise combination_error("search.pbt.synch", "synchronous PBT needs every trial running at once: "
                                    "search.max_concurrent at least search.num_samples")  # fmt: skip
        for key, domain in self.params.items():
            if key.startswith(RESERVED) or any(reserved.startswith(f"{key}.") for reserved in RESERVED):
                raise combination_error(f"params.{key}", "set by the sweep itself for each trial")
            if kind == "grid" and domain.grid is None:
                raise combination_error(f"params.{key}", "search.kind=grid needs a grid of values for every key")
            if kind == "pbt" and domain.grid is not None:
                raise combination_error(f"params.{key}", "PBT samples and perturbs values: use choice or a range")
        return self

    def check_against(self, base: dict[str, Any]) -> None:
        """Every key of ``params`` at the ends of its domain, and the search's step counts, valid for the job
        ``base`` (a config tree); ConfigError names the key."""
        cfg = build_config(base)
        for key, domain in self.params.items():
            ramp = REPLACED_KEYS.get(key)
            if ramp is not None and getattr(cfg.schedules, ramp) is not None:
                raise ConfigError(f"params.{key}", f"the job's schedules.{ramp} sets it at every step, so "
                                  f"trials would not differ: sweep schedules.{ramp}.start or .end instead")  # fmt: skip
            for value in domain.probes():
                build_config(with_values(base, {key: value}))
        steps, every = cfg.train.steps, cfg.checkpoint.every
        quality = self.metric.name.startswith("quality/")
        if quality and not cfg.eval.every:
            raise ConfigError("eval.every", f"the sweep's metric {self.metric.name} needs evaluation during training")
        logged_every = cfg.eval.every if quality else cfg.train.log_every
        if every % logged_every:  # trials report at their checkpoints: each must carry a fresh metric
            raise ConfigError("checkpoint.every", f"{every} must be a multiple of {'eval.every' if quality else 'train.log_every'} "
                              f"({logged_every}): trials report {self.metric.name} at their checkpoints")  # fmt: skip
        interval = self.search.pbt.perturbation_interval if self.search.pbt else None
        if interval is not None and interval % every:
            raise ConfigError("search.pbt.perturbation_interval", f"{interval} must be a multiple of checkpoint.every "
                              f"({every}): PBT copies a trial's state at its checkpoints")  # fmt: skip
        if self.search.asha is not None and self.search.asha.grace_period >= steps:
            raise ConfigError("search.asha.grace_period", f"must be below train.steps ({steps})")


def load_space(path: str | Path) -> SweepSpace:
    """Read and validate a SPACE file (ConfigError naming the key on a mistake)."""
    tree = read_yaml(path, "sweep space file")
    try:
        return SweepSpace.model_validate(tree)
    except ValidationError as exc:
        raise format_validation_error(exc) from None

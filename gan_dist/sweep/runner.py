"""The sweep's driver: checks the job and its SPACE, starts (or joins) Ray, runs the trials through Ray Tune and
sums up: the best trial, its job file (``<storage>/<sweep>/best.yaml`` and the parent run's ``best_config.yaml``),
the parent MLflow run.

Everything of a sweep lives under ``<checkpoint.storage>/<sweep>/``: each trial's Train runs (``<sweep>-t000``,
and ``<sweep>-t000-1``... after a PBT takeover), Tune's experiment (``tune/``), the real statistics every trial
shares (``eval-cache/``) and ``best.yaml``. Run the same command with the same ``run.name`` again and an
interrupted sweep resumes: finished trials stay finished, unfinished ones continue from their checkpoints.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import yaml
from ray import tune

from gan_dist import storage
from gan_dist.config import GanConfig, load_config, parse_override, read_yaml, with_values
from gan_dist.driver import check_reachable, connect, preflight, prepare_run
from gan_dist.storage import pyarrow_filesystem
from gan_dist.sweep.parent import ParentRun, TrialRow, best_job
from gan_dist.sweep.space import Metric, SweepSpace, load_space
from gan_dist.sweep.trial import GanTrial, trial_run_name
from gan_dist.tracking.redact import check_no_secrets

TUNE_DIR = "tune"
BEST_FILE = "best.yaml"
TUNE_CHECKPOINTS_KEPT = 4  # a PBT donor's checkpoint must outlive the takeover (Tune warns below 3)
TRIAL_ACTOR_MEMORY = 64 * 2**20  # bytes Ray reserves for a trial's actor (it holds no model)


@dataclass
class SweepOutcome:
    name: str
    rows: list[TrialRow]
    best: TrialRow | None
    best_config: str | None  # where the best trial's job file was written
    parent_run_id: str
    complete: bool  # False: stopped (Ctrl-C) before every trial ended; the same command continues it


def prepare_sweep(config_path: str | Path, overrides: list[str], space_path: str | Path) -> tuple[GanConfig, dict, SweepSpace]:
    """The base job (validated, and as a tree with its paths made absolute: trials run elsewhere) and the SPACE,
    checked against each other; ConfigError names the key. A credential in the job is refused: Tune keeps every
    trial's config in its experiment state, on storage."""
    cfg = load_config(config_path, overrides)
    space = load_space(space_path)
    check_no_secrets(cfg, Path(config_path))
    tree = read_yaml(config_path, "config file") or {}
    base = with_values(tree, dict(parse_override(item) for item in overrides))
    paths = {"data.url": cfg.data.url, "checkpoint.storage": cfg.checkpoint.storage, "tracking.uri": cfg.tracking.uri}
    if cfg.eval.extractor_path and "://" not in cfg.eval.extractor_path:
        paths["eval.extractor_path"] = str(Path(cfg.eval.extractor_path).expanduser().resolve())
    base = with_values(base, paths)
    base.pop("run", None)  # the sweep's name; each trial gets its own
    space.check_against(base)
    return cfg, base, space


def run_sweep(cfg: GanConfig, base: dict[str, Any], space: SweepSpace, address: str | None = None) -> SweepOutcome:
    """Run (or resume) the sweep named ``cfg.run.name``; one line per trial event on stdout."""
    preflight(cfg, address)
    if "://" not in cfg.checkpoint.storage:
        os.makedirs(cfg.checkpoint.storage, exist_ok=True)
    check_reachable(cfg, address)
    prepare_run(cfg)  # the tracking store answers (a RunError with a hint if not); a new sqlite one made quietly
    connect(address)
    name, root = cfg.run.name, storage.join(cfg.checkpoint.storage, cfg.run.name)
    parent = ParentRun(cfg, name, space, base)
    plan = {"name": name, "root": root, "parent_run_id": parent.run_id, "metric": space.metric.name, "base": base}
    results = _tuner(cfg, space, plan).fit()
    rows = [_row(result, space.metric.name, cfg.train.steps) for result in results]
    rows.sort(key=lambda r: r.name)
    best = None
    for row in rows:
        if space.metric.better(row.value, best.value if best else math.nan):
            best = row
    job, where = (best_job(base, best.params), storage.join(root, BEST_FILE)) if best else (None, None)
    if job is not None:
        storage.write_bytes(where, yaml.safe_dump(job, sort_keys=False).encode(), cfg.storage)
    complete = all(r.state != "interrupted" for r in rows) and len(rows) >= _planned(space)
    parent.finish(space, rows, best, job, complete)
    return SweepOutcome(name, rows, best, where, parent.run_id, complete)


def _planned(space: SweepSpace) -> int:
    grids = [len(d.grid) for d in space.params.values() if d.grid is not None]
    return space.search.num_samples * math.prod(grids)


def _tuner(cfg: GanConfig, space: SweepSpace, plan: dict[str, Any]) -> tune.Tuner:
    """A new Tune experiment under the sweep's root, or the interrupted one restored."""
    fs, root = pyarrow_filesystem(plan["root"], cfg.storage)
    path = f"{root.rstrip('/')}/{TUNE_DIR}"
    # A trial only drives its run (its workers hold the CPUs); Tune wants some resource in a request: memory.
    trainable = tune.with_resources(GanTrial, {"CPU": 0, "memory": TRIAL_ACTOR_MEMORY})
    param_space = {"params": {key: domain.to_tune() for key, domain in space.params.items()}, "sweep": plan}
    if tune.Tuner.can_restore(path, storage_filesystem=fs):
        print(f"resuming sweep {plan['name']} from {path}", flush=True)
        return tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True,
                                  param_space=param_space, storage_filesystem=fs)  # fmt: skip
    search = space.search
    name_trial = functools.partial(_trial_name, plan["name"])
    tune_config = tune.TuneConfig(
        metric=space.metric.name, mode=space.metric.mode, num_samples=search.num_samples,
        # No reuse: Tune calls stop() (GanTrial.cleanup: the run stops now) only on an actor it does not keep.
        scheduler=_scheduler(space, cfg), reuse_actors=False,
        search_alg=tune.search.BasicVariantGenerator(random_state=search.seed,
                                                     max_concurrent=search.max_concurrent or _fitting_trials(cfg)),
        trial_name_creator=name_trial, trial_dirname_creator=name_trial,
    )  # fmt: skip
    run_config = tune.RunConfig(
        name=TUNE_DIR, storage_path=root, storage_filesystem=fs, verbose=0,
        callbacks=[SweepLines(plan["name"], space.metric, cfg.train.steps)],
        # A trial whose actor dies (its node went) restarts and its run continues from its latest checkpoint.
        failure_config=tune.FailureConfig(max_failures=cfg.train.max_failures),
        # Tune checkpoints only where PBT asks for one: each is a copy of a Train checkpoint.
        checkpoint_config=tune.CheckpointConfig(num_to_keep=TUNE_CHECKPOINTS_KEPT, checkpoint_at_end=False),
    )  # fmt: skip
    return tune.Tuner(trainable, param_space=param_space, tune_config=tune_config, run_config=run_config)


def _trial_name(sweep: str, trial: Any) -> str:
    return trial_run_name(sweep, trial.trial_id)


def _fitting_trials(cfg: GanConfig) -> int:
    """How many trials of the job's size the cluster holds at once (at least one)."""
    total = ray.cluster_resources()
    workers = cfg.scaling.min_workers
    need = {"CPU": workers * cfg.scaling.cpus_per_worker, **({"GPU": workers} if cfg.scaling.use_gpu else {})}
    return max(1, min(int(total.get(kind, 0) // amount) for kind, amount in need.items()))


def _scheduler(space: SweepSpace, cfg: GanConfig) -> Any:
    """Random and grid search run every trial to the end; ASHA stops the weak ones at its rungs (in steps); PBT
    makes the bottom quantile take over a top trial's state and perturbs its keys, every interval of steps."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining

    search = space.search
    if search.asha is not None:
        return ASHAScheduler(time_attr="step", max_t=cfg.train.steps, grace_period=search.asha.grace_period,
                             reduction_factor=search.asha.reduction_factor)  # fmt: skip
    if search.pbt is not None:
        return PopulationBasedTraining(
            time_attr="step", perturbation_interval=search.pbt.perturbation_interval,
            hyperparam_mutations={"params": {key: domain.to_tune() for key, domain in space.params.items()}},
            quantile_fraction=search.pbt.quantile, resample_probability=search.pbt.resample_probability,
            custom_explore_fn=functools.partial(_clip, space), synch=search.pbt.synch,
        )  # fmt: skip
    return FIFOScheduler()


def _clip(space: SweepSpace, config: dict[str, Any]) -> dict[str, Any]:
    config["params"] = {key: space.params[key].clip(value) for key, value in config["params"].items()}
    return config


def _row(result: Any, metric: str, steps: int) -> TrialRow:
    """A trial as Tune's result holds it (its directory is named after the trial)."""
    last = result.metrics or {}
    history = result.metrics_dataframe
    points, took_over = [], []
    if history is not None and metric in history:
        points = [(int(s), float(v)) for s, v in zip(history["step"], history[metric])]
        changes = history[history["segment"] != history["segment"].shift()]
        took_over = [f"{d} at step {s}" for d, s in zip(changes["took_over"], changes["start_step"]) if d]
    step = int(last.get("step", 0))
    if result.error is not None:
        state = "failed"
    elif last.get("done"):
        state = "finished" if step >= steps else "stopped early"
    else:
        state = "interrupted"
    value = float(last.get(metric, math.nan))
    return TrialRow(Path(result.path).name, dict(result.config["params"]), state, step, value, points, took_over)


class SweepLines(tune.Callback):
    """The console: one line per trial event (started with its keys, each report with the best so far, a PBT
    takeover, finished, stopped early, failed). Plain lines: the same in a terminal, a log and ``--follow``."""

    def __init__(self, sweep: str, metric: Metric, steps: int) -> None:
        self.sweep, self.metric, self.steps = sweep, metric, steps
        self.best: tuple[str, float] | None = None
        self.segments: dict[str, str] = {}

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        keys = " ".join(f"{k}={_short(v)}" for k, v in trial.config["params"].items())
        _say(f"{trial_run_name(self.sweep, trial.trial_id)}  started   {keys}")

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        name, value = result["trial"], float(result[self.metric.name])
        if result["took_over"] and self.segments.get(name) != result["segment"]:
            keys = " ".join(f"{k}={_short(v)}" for k, v in trial.config["params"].items())
            _say(f"{name}  took over {result['took_over']} at step {result['start_step']} (PBT), now {keys}")
        self.segments[name] = result["segment"]
        if self.metric.better(value, self.best[1] if self.best else math.nan):
            self.best = (name, value)
        _say(f"{name}  step {result['step']}/{self.steps}  {self.metric.name} {value:.4g}   "
             f"best {self.best[0]} {self.best[1]:.4g}")  # fmt: skip

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        step = int((trial.last_result or {}).get("step", 0))
        _say(f"{trial_run_name(self.sweep, trial.trial_id)}  {'finished' if step >= self.steps else 'stopped early'}"
             f" at step {step}")  # fmt: skip

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        _say(f"{trial_run_name(self.sweep, trial.trial_id)}  failed: {trial.error_file or 'see Ray logs'}")


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _say(line: str) -> None:
    print(f"  {line}", flush=True)  # print: Tune pickles its callbacks with the experiment

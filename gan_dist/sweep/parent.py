"""The sweep's MLflow parent run: what was searched and how (params, ``sweep/space.yaml``, the base job), and once it
ends the best trial, its job file (``best_config.yaml``), a table of every trial and two plots: the metric against
each swept key, and every trial's metric over its steps. Each trial's own run is nested under it
(``tracking.parent_run_id``, MLflow's ``mlflow.parentRunId`` tag): the normal run page of a training run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import mlflow
from mlflow.entities import Param
from mlflow.utils.mlflow_tags import MLFLOW_RUN_NOTE

from gan_dist.config import GanConfig, with_values
from gan_dist.sweep.space import SweepSpace
from gan_dist.tracking.info import RUN_NAME_TAG
from gan_dist.tracking.redact import redact
from gan_dist.tracking.experiment import experiment_id

SWEEP_TAG = "gan_dist.sweep"  # "parent" on a sweep's own run
BEST_TRIAL_TAG = "gan_dist.sweep.best_trial"


@dataclass
class TrialRow:
    """One trial as the sweep ends: its keys, state, last step and metric, and the metric's history."""

    name: str
    params: dict[str, Any]
    state: str  # finished, stopped early, interrupted, failed
    step: int
    value: float
    history: list[tuple[int, float]] = field(default_factory=list)
    took_over: list[str] = field(default_factory=list)  # PBT: "<donor> at step N", in order


class ParentRun:
    """The sweep's run: found by the sweep's name (a resumed sweep continues it), else created."""

    def __init__(self, cfg: GanConfig, name: str, space: SweepSpace, base: dict[str, Any]) -> None:
        self.client = mlflow.MlflowClient(cfg.tracking.uri)
        exp = self.experiment_id = experiment_id(self.client, cfg)
        query = f"tags.`{RUN_NAME_TAG}` = '{name}' and tags.`{SWEEP_TAG}` = 'parent'"
        found = self.client.search_runs([exp], filter_string=query, max_results=1)
        if found:
            self.run_id = found[0].info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
            return
        search = space.search
        note = (f"Sweep: {search.kind} search over {', '.join(space.params)} ({search.num_samples} samples), "
                f"{space.metric.mode} {space.metric.name}; each trial's run is nested under this one.")
        tags = {RUN_NAME_TAG: name, SWEEP_TAG: "parent", MLFLOW_RUN_NOTE: note}
        self.run_id = self.client.create_run(exp, run_name=name, tags=tags).info.run_id
        params = {"search.kind": search.kind, "search.num_samples": search.num_samples, "metric.name": space.metric.name,
                  "metric.mode": space.metric.mode, "params": ", ".join(space.params)}  # fmt: skip
        options = search.asha or search.pbt
        params.update({f"search.{search.kind}.{k}": v for k, v in (options.model_dump() if options else {}).items()})
        self.client.log_batch(self.run_id, params=[Param(k, str(v)) for k, v in params.items()])
        self.client.log_dict(self.run_id, space.model_dump(mode="json", exclude_none=True), "sweep/space.yaml")
        self.client.log_dict(self.run_id, redact(base), "sweep/base_config.yaml")

    def finish(self, space: SweepSpace, rows: list[TrialRow], best: TrialRow | None, best_job: dict[str, Any] | None,
               complete: bool) -> None:  # fmt: skip
        """The outcome: best trial and job file, the trials table, the plots; FINISHED, or KILLED when stopped."""
        metric = space.metric.name
        if best is not None:
            self.client.set_tag(self.run_id, BEST_TRIAL_TAG, best.name)
            self.client.log_metric(self.run_id, f"best/{metric}", best.value, step=best.step)
            self.client.log_dict(self.run_id, best_job, "best_config.yaml")
        table = {"trial": [r.name for r in rows], "state": [r.state for r in rows], "step": [r.step for r in rows],
                 metric: [r.value for r in rows], **{k: [r.params.get(k) for r in rows] for k in space.params},
                 "took_over": ["; ".join(r.took_over) for r in rows]}  # fmt: skip
        self.client.log_dict(self.run_id, table, "sweep/trials.json")  # log_table would append to a resumed sweep's
        if rows:
            from matplotlib import pyplot as plt

            for figure, name in ((metric_against_keys(space, rows), "metric_vs_keys"),
                                 (metric_over_steps(metric, rows), "metric_over_steps")):  # fmt: skip
                self.client.log_figure(self.run_id, figure, f"sweep/{name}.png")
                plt.close(figure)
        self._end_trial_runs_left_running()
        self.client.set_terminated(self.run_id, "FINISHED" if complete else "KILLED")

    def _end_trial_runs_left_running(self) -> None:
        """Once Tune is done no trial runs; a trial's run still RUNNING lost its actor before it could end it (Tune
        kills a trial still stopping 10 s after the sweep's end): KILLED, as a stopped trial's run is."""
        query = f"tags.`mlflow.parentRunId` = '{self.run_id}' and attributes.status = 'RUNNING'"
        for run in self.client.search_runs([self.experiment_id], filter_string=query):
            self.client.set_terminated(run.info.run_id, "KILLED")


def metric_against_keys(space: SweepSpace, rows: list[TrialRow]) -> Any:
    """One panel per swept key: each trial's last metric against its value of the key (log axis for a
    log-uniform key; a categorical axis for non-numbers)."""
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    from matplotlib import pyplot as plt

    keys = list(space.params)
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2), squeeze=False)
    for ax, key in zip(axes[0], keys):
        xs = [r.params.get(key) for r in rows]
        labels = xs if all(isinstance(x, (int, float)) for x in xs) else [str(x) for x in xs]
        ax.scatter(labels, [r.value for r in rows], c=["tab:red" if r.state == "stopped early" else "tab:blue" for r in rows])
        for x, r in zip(labels, rows):
            ax.annotate(r.name.rsplit("-", 1)[-1], (x, r.value), fontsize=7, alpha=0.7)
        if space.params[key].loguniform is not None:
            ax.set_xscale("log")
        ax.set_xlabel(key)
        ax.set_ylabel(space.metric.name)
    fig.suptitle("last value per trial (red: stopped early)", fontsize=9)
    fig.tight_layout()
    return fig


def metric_over_steps(metric: str, rows: list[TrialRow]) -> Any:
    """Every trial's reported metric against its steps (a PBT trial's line jumps where it took over another's)."""
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in rows:
        points = [(s, v) for s, v in r.history if not math.isnan(v)]
        if points:
            ax.plot(*zip(*points), marker=".", label=r.name.rsplit("-", 1)[-1])
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig


def best_job(base: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """The best trial's job: the sweep's base job with the trial's keys, to train with ``gan-dist train``."""
    return with_values(base, params)  # no run name (prepare_sweep took it out): one is chosen when it is trained

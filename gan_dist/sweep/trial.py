"""One trial of a sweep: a normal gan_dist training run (its own config, TorchTrainer, worker group, checkpoints and
MLflow child run) that Ray Tune drives as a class trainable.

The trial starts its run's progress hub (``gan_dist.train.progress``), as ``gan-dist train``'s console does: rank 0
posts its progress there instead of printing it, and Ray Train's controller posts each checkpoint's report there
too (``TrialReports``); the trial hands Tune the step and the sweep's metric, the latest value rank 0 logged
(``Tracker.latest``). Tune's own checkpoints exist only where a scheduler asks for one (PBT, for a trial in its top
quantile): ``save_checkpoint`` copies the trial's newest Ray Train checkpoint, plus ``sweep.json``
(whose it is, at what step).

Where a trial starts from a Tune checkpoint (``load_checkpoint``):

- its own (a sweep resumed after an interruption): the Train run that wrote it continues from its own latest
  checkpoint, as a rerun of ``gan-dist train`` with the same run name does;
- another trial's (PBT's exploit): the trial trains on as a new Train run ("segment") ``<trial>-<k>``, started from
  that state whole (``checkpoint.resume_mode=continue``: G, D, EMA, optimizers, ADA, step, data position, RNG),
  with its own perturbed keys, logging into its own MLflow run (``tracking.run_name``). The segment's first
  checkpoint is the state it took over, at the donor's step.

Tune stops a trial (ASHA, a PBT exploit, Ctrl-C) by ending its actor: ``cleanup`` first asks rank 0, as Ctrl-C on
``gan-dist train`` does, to checkpoint the step it is at and end the run (MLflow status KILLED).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections import deque
from concurrent.futures import wait
from pathlib import Path
from typing import Any

import pyarrow.fs
import ray
from ray import tune
from ray.train.v2.api.callback import UserCallback

from gan_dist import storage
from gan_dist.config import GanConfig, build_config, with_values
from gan_dist.driver import build_trainer, in_background, preflight, prepare_run, training_outcome
from gan_dist.models.io import STATE_FILE
from gan_dist.storage import pyarrow_filesystem
from gan_dist.train.progress import HUB_NAMESPACE, ProgressHub, hub_name

SWEEP_FILE = "sweep.json"  # in a Tune checkpoint: the trial, Train run (segment) and step it was taken from
START = "start"  # in a segment's run directory: the state it took over
POLL_S = 0.5
COPY_ATTEMPTS = 3  # save_checkpoint: a newer checkpoint each time the one it copied was deleted meanwhile
REPORT = "sweep-report"  # the kind of a checkpoint's report among the hub's events
STOP_MARGIN_S = 30.0  # beyond train.preempt_grace_s, for the stop checkpoint's upload and MLflow's last calls


def trial_run_name(sweep: str, trial_id: str) -> str:
    """``<sweep>-t007`` for Tune's trial ``abcde_00007`` (Tune numbers trials in the order it creates them)."""
    return f"{sweep}-t{int(trial_id.rsplit('_', 1)[-1]):03d}"


def trial_config(plan: dict[str, Any], params: dict[str, Any], trial: str, segment: str, start: str | None) -> GanConfig:
    """The job config of one trial's Train run: the sweep's base job, the trial's keys, and where it stores and
    logs (the sweep's root, the trial's own MLflow run nested under the sweep's)."""
    # Uploads in step with training: a report reaches Tune when its checkpoint is taken, not after a backlog of
    # uploads, and a stopped trial ends within the 10 s Tune gives the last ones at the sweep's end before it kills
    # them (a killed trial's run would stay RUNNING in MLflow).
    values = {**params, "run.name": segment, "checkpoint.storage": plan["root"], "tracking.run_name": trial,
              "tracking.parent_run_id": plan["parent_run_id"], "checkpoint.async_upload": False}  # fmt: skip
    if start is not None:
        values.update({"checkpoint.resume_from": start, "checkpoint.resume_mode": "continue"})
    return build_config(with_values(plan["base"], values))


class TrialReports(UserCallback):
    """In Ray Train's controller: each checkpoint's report (rank 0's metrics, the checkpoint's path) to the hub,
    before the run can end (so the trial finds every report there once ``fit()`` returned)."""

    def __init__(self, hub: Any, metric: str) -> None:
        self.hub, self.metric = hub, metric

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        first = metrics[0]
        report = {"kind": REPORT, "step": int(first["step"]), "value": first.get(self.metric),
                  "mlflow_run_id": first.get("mlflow_run_id"), "checkpoint": checkpoint.path if checkpoint else None}
        ray.get(self.hub.publish.remote(report))


class GanTrial(tune.Trainable):
    """Tune's view of a trial; ``config`` is ``{"params": {dotted key: value}, "sweep": plan}``."""

    def setup(self, config: dict[str, Any]) -> None:
        self.plan, self.params = config["sweep"], config["params"]
        self.name = trial_run_name(self.plan["name"], self.trial_id)
        self.segment, self.start, self.took_over, self.start_step = self.name, None, None, None
        self.cfg: GanConfig | None = None
        self.fitting = None  # the Future of trainer.fit(), once the first step() launched it
        self.last: dict[str, Any] | None = None  # the report behind the latest result Tune has
        self.reports: deque[dict[str, Any]] = deque()  # taken from the hub, not yet handed to Tune

    def load_checkpoint(self, checkpoint_dir: str) -> None:
        source = json.loads((Path(checkpoint_dir) / SWEEP_FILE).read_text())
        self.start_step = source["step"]
        if source["trial"] == self.name:  # its own: that Train run resumes from its own latest checkpoint
            self.segment = source["segment"]
            return
        root, storage_cfg = self.plan["root"], build_config(self.plan["base"]).storage
        k = 1
        while storage.exists(storage.join(root, f"{self.name}-{k}/{START}/config.yaml"), storage_cfg):
            k += 1
        self.segment, self.took_over = f"{self.name}-{k}", source["trial"]
        self.start = storage.join(storage.join(root, self.segment), START)
        fs, path = pyarrow_filesystem(self.start, storage_cfg)
        fs = fs or pyarrow.fs.LocalFileSystem()
        fs.create_dir(path, recursive=True)
        pyarrow.fs.copy_files(checkpoint_dir, path, destination_filesystem=fs)

    def save_checkpoint(self, checkpoint_dir: str) -> str:
        """The Train checkpoint of the result Tune judged, and whose it is (at what step). The run trains on while
        Tune decides, and Ray Train may delete that checkpoint meanwhile (``checkpoint.num_to_keep``): then the
        trial's newest one short of its last step (a state with steps left to train)."""
        if self.last is None or not self.last["checkpoint"]:  # no result yet: nothing to hand over
            return checkpoint_dir
        fs, _ = pyarrow_filesystem(self.cfg.checkpoint.storage, self.cfg.storage)
        chosen, problem = self.last, ""
        for attempt in range(COPY_ATTEMPTS):
            shutil.rmtree(checkpoint_dir, ignore_errors=True)  # nothing left of an attempt that lost the race
            os.makedirs(checkpoint_dir)
            try:
                pyarrow.fs.copy_files(chosen["checkpoint"], checkpoint_dir, source_filesystem=fs)
                if (Path(checkpoint_dir) / STATE_FILE).is_file():
                    break
                problem = f"no {STATE_FILE} in it"
            except OSError as exc:  # FileNotFoundError among them: deleted under num_to_keep since it was reported
                problem = str(exc)
            if attempt == COPY_ATTEMPTS - 1:
                raise RuntimeError(f"trial {self.name}: no checkpoint could be copied for PBT (the last tried: "
                                   f"{chosen['checkpoint']}: {problem}); keep more with checkpoint.num_to_keep")  # fmt: skip
            time.sleep(POLL_S)
            self._take_reports()
            later = [r for r in self.reports if r["checkpoint"] and r["step"] < self.cfg.train.steps]
            chosen = later[-1] if later else chosen
        source = {"trial": self.name, "segment": self.segment, "step": chosen["step"]}
        (Path(checkpoint_dir) / SWEEP_FILE).write_text(json.dumps(source))
        return checkpoint_dir

    def step(self) -> dict[str, Any]:
        if self.fitting is None:
            self._launch()
        while (report := self._next_report()) is not None:
            if report["value"] is None:  # a stop or takeover checkpoint, before the metric was logged again
                continue
            self.last = report
            if report["step"] < self.cfg.train.steps:
                return self._result(report)
            break
        outcome = training_outcome(self.cfg, self.fitting.result(), self.marker)  # raises if the run failed
        if self.last is None:
            raise ValueError(f"trial {self.name} never logged the sweep's metric {self.plan['metric']} "
                             f"(its run ended at step {outcome.final_step}): is it a metric gan_dist logs?")
        return {**self._result(self.last), "done": True}

    def cleanup(self) -> None:
        """Tune ends this trial: the run checkpoints the step it is at and ends, within its grace period."""
        if self.fitting is None:
            return
        if not self.fitting.done():
            self.hub.request_stop.remote("stopped by the sweep")
            wait([self.fitting], timeout=self.cfg.train.preempt_grace_s + STOP_MARGIN_S)  # else it ends with the actor
        ray.kill(self.hub)
        self.fitting = None

    def _launch(self) -> None:
        self.cfg = trial_config(self.plan, self.params, self.name, self.segment, self.start)
        preflight(self.cfg)  # a conditional model takes its class count from the data here too
        self.marker = prepare_run(self.cfg)
        self.hub = ray.remote(num_cpus=0)(ProgressHub).options(
            name=hub_name(self.segment), namespace=HUB_NAMESPACE, get_if_exists=True).remote()  # fmt: skip
        trainer = build_trainer(self.cfg, "WARNING", callbacks=[TrialReports(self.hub, self.plan["metric"])])
        self.fitting = in_background(trainer.fit)

    def _next_report(self) -> dict[str, Any] | None:
        """The next checkpoint's report; None once the run has ended and every report was taken."""
        while not self.reports:
            ended = self.fitting.done()  # before the drain: every report is in the hub by the time fit() returns
            self._take_reports()
            if not self.reports:
                if ended:
                    return None
                wait([self.fitting], timeout=POLL_S)
        return self.reports.popleft()

    def _take_reports(self) -> None:
        """The reports the hub holds, queued (rank 0's progress lines go unread: the sweep's console shows these)."""
        self.reports.extend(e for e in ray.get(self.hub.drain.remote()) if e["kind"] == REPORT)

    def _result(self, report: dict[str, Any]) -> dict[str, Any]:
        return {"step": report["step"], self.plan["metric"]: report["value"], "trial": self.name,
                "segment": self.segment, "took_over": self.took_over or "", "start_step": self.start_step or 0,
                "mlflow_run_id": report["mlflow_run_id"] or ""}  # fmt: skip

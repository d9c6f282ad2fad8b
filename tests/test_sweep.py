"""``gan-dist sweep`` on the local Ray instance with tiny models: random search stopped with Ctrl-C and resumed,
ASHA's early stops, PBT's takeover of a donor's whole state; and SPACE mistakes refused before Ray starts.

The sweeps optimise ``optim/lr_g`` (the generator's learning rate, logged at every log step): a metric whose
ranking of the trials is known in advance, so which trial is best, which ones ASHA stops and which one PBT
makes take over another's state do not depend on how well a 20-step GAN happens to train.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import threading
from pathlib import Path

import mlflow
import pytest
import torch
import yaml

from gan_dist.config import ConfigError, load_config
from gan_dist.models.io import read_state
from gan_dist.sweep.runner import prepare_sweep, run_sweep
from gan_dist.tracking.info import RUN_NAME_TAG


def _job(digits_shards: Path, tmp_path: Path, steps: int, every: int, **extra: dict) -> Path:
    """A tiny DCGAN job on the digits, one worker per trial (two trials share the session's 2 CPUs)."""
    job = {
        "data": {"url": str(digits_shards), "resolution": 32, "channels": 1, "loader_workers": 0},
        "model": {"arch": "dcgan", "g_width": 8, "d_width": 8, "z_dim": 16},
        "train": {"batch_size": 16, "steps": steps, "log_every": 2, "sample_every": 1000, "sample_grid": 16},
        "scaling": {"num_workers": 1},
        "checkpoint": {"storage": str(tmp_path / "runs"), "every": every},
        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "sweeps"},
    }
    for section, values in extra.items():
        job.setdefault(section, {}).update(values)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def _space(tmp_path: Path, params: dict, search: dict) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump({"params": params, "metric": {"name": "optim/lr_g", "mode": "max"}, "search": search}))
    return path


def _child_runs(tracking_uri: str, parent_run_id: str) -> dict[str, mlflow.entities.Run]:
    client = mlflow.MlflowClient(tracking_uri)
    experiment = client.get_run(parent_run_id).info.experiment_id
    runs = client.search_runs([experiment], filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'")
    return {run.data.tags[RUN_NAME_TAG]: run for run in runs}


def _steps(tracking_uri: str, run_id: str, key: str = "losses/d") -> list[int]:
    return [m.step for m in mlflow.MlflowClient(tracking_uri).get_metric_history(run_id, key)]


def _interrupt_once(ready) -> threading.Event:
    """Ctrl-C to this process (where Tune runs the sweep) once ``ready()``; never once the returned event is set
    (the sweep ended without it: the test then fails on its states, not with a stray Ctrl-C)."""
    over = threading.Event()

    def watch() -> None:
        while not over.wait(0.2):
            if ready():
                os.kill(os.getpid(), signal.SIGINT)
                return

    threading.Thread(target=watch, daemon=True).start()
    return over


@pytest.mark.ray
def test_random_sweep_stopped_and_resumed_runs_each_trial_once_under_one_parent(ray_session, digits_shards, tmp_path):
    job = _job(digits_shards, tmp_path, steps=200, every=20)
    space = _space(tmp_path, {"optim.g_lr": {"loguniform": [1e-4, 1e-2]}, "train.ema_decay": {"choice": [0.99, 0.999]}},
                   {"kind": "random", "num_samples": 4, "max_concurrent": 2, "seed": 3})  # fmt: skip
    cfg, base, plan = prepare_sweep(job, ["run.name=rs"], space)
    root = tmp_path / "runs" / "rs"
    # t002 and t003 start once t000 and t001 have ended: stop the sweep while the last two train.
    over = _interrupt_once(lambda: all((root / f"rs-t00{i}" / "step-000000020").is_dir() for i in (2, 3)))
    first = run_sweep(cfg, base, plan)
    over.set()
    states = {row.name: row.state for row in first.rows}
    assert not first.complete
    assert states == {"rs-t000": "finished", "rs-t001": "finished", "rs-t002": "interrupted", "rs-t003": "interrupted"}
    uri = cfg.tracking.uri
    before = _child_runs(uri, first.parent_run_id)
    done = {name: (before[name].info.end_time, _steps(uri, before[name].info.run_id)) for name in ("rs-t000", "rs-t001")}
    checkpoints = {name: sorted(p.name for p in (root / name).glob("step-*")) for name in done}

    second = run_sweep(cfg, base, plan)  # the same command again: resumes
    assert second.complete and second.parent_run_id == first.parent_run_id
    assert [(row.name, row.state, row.step) for row in second.rows] == [(f"rs-t00{i}", "finished", 200) for i in range(4)]
    runs = _child_runs(uri, second.parent_run_id)
    assert sorted(runs) == ["rs-t000", "rs-t001", "rs-t002", "rs-t003"]  # one MLflow run per trial, nested
    assert all(run.info.status == "FINISHED" for run in runs.values())
    for name, (end_time, steps) in done.items():  # finished trials are not run again
        assert runs[name].info.end_time == end_time and _steps(uri, runs[name].info.run_id) == steps
        assert sorted(p.name for p in (root / name).glob("step-*")) == checkpoints[name]
    for name in ("rs-t002", "rs-t003"):  # continued from the checkpoint of the step they were stopped at
        assert runs[name].info.run_id == before[name].info.run_id
        steps = _steps(uri, runs[name].info.run_id)
        assert steps == sorted(set(steps)) and steps[-1] == 200

    # The best trial (highest G learning rate) and its job file, which trains as it is.
    lrs = {row.name: row.params["optim.g_lr"] for row in second.rows}
    assert second.best.name == max(lrs, key=lrs.get)
    best = load_config(second.best_config)
    assert best.optim.g_lr == lrs[second.best.name] and best.train.ema_decay == second.best.params["train.ema_decay"]
    client = mlflow.MlflowClient(uri)
    parent = client.get_run(second.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["gan_dist.sweep.best_trial"] == second.best.name
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)} | {
        a.path for a in client.list_artifacts(parent.info.run_id, "sweep")}  # fmt: skip
    assert {"best_config.yaml", "sweep/space.yaml", "sweep/trials.json", "sweep/metric_vs_keys.png",
            "sweep/metric_over_steps.png"} <= artifacts  # fmt: skip


@pytest.mark.ray
def test_asha_stops_the_weak_trials_at_its_first_rung(ray_session, digits_shards, tmp_path):
    # 200 steps: a trial stopped at step 10 ends well before the others' last step even though it trains on for
    # the moment the stop takes to reach it.
    job = _job(digits_shards, tmp_path, steps=200, every=10)
    # A grid, best first: by the time t002 and t003 reach the rung at step 10, t000 and t001 have been there, and
    # both are below the median of the rates recorded at it.
    space = _space(tmp_path, {"optim.g_lr": {"grid": [8e-4, 4e-4, 2e-4, 1e-4]}},
                   {"kind": "asha", "num_samples": 1, "max_concurrent": 2, "asha": {"grace_period": 10}})  # fmt: skip
    cfg, base, plan = prepare_sweep(job, ["run.name=asha"], space)
    outcome = run_sweep(cfg, base, plan)
    rows = {row.name: row for row in outcome.rows}
    assert outcome.complete and rows["asha-t000"].state == "finished" and rows["asha-t000"].step == 200
    for name in ("asha-t002", "asha-t003"):
        assert (rows[name].state, rows[name].step) == ("stopped early", 10)
    runs = _child_runs(cfg.tracking.uri, outcome.parent_run_id)
    for name in ("asha-t002", "asha-t003"):  # their runs were stopped (and checkpointed) at the step they were at
        assert runs[name].info.status == "KILLED" and max(_steps(cfg.tracking.uri, runs[name].info.run_id)) < 200
    assert outcome.best.name == "asha-t000"


def _state_digest(state: dict) -> str:
    """G, D and EMA-G, the optimizers' moments and step counts, and ADA's augmentation state (its p)."""
    h = hashlib.sha256()

    def feed(value) -> None:
        if isinstance(value, torch.Tensor):
            h.update(value.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(value, dict):
            for key in sorted(value, key=str):
                h.update(str(key).encode())
                feed(value[key])
        else:
            h.update(repr(value).encode())

    for part in (state["g"], state["d"], state["g_ema"], state["opt_g"]["state"], state["opt_d"]["state"],
                 state["augment"]):  # fmt: skip
        feed(part)
    return h.hexdigest()


@pytest.mark.ray
def test_pbt_takeover_restores_the_donors_whole_state_and_logs_to_the_receivers_run(ray_session, digits_shards, tmp_path):
    # Synchronous PBT: both trials wait for each other at step 40, where the one with the lower rate takes over the
    # other's state (tiny runs started side by side need not overlap in time otherwise). Every checkpoint kept:
    # the donor's, at the step it was taken, stays to compare.
    job = _job(digits_shards, tmp_path, steps=80, every=20, checkpoint={"num_to_keep": None},
               augment={"kind": "ada", "speed_kimg": 2, "interval": 1})  # fmt: skip
    space = _space(tmp_path, {"optim.g_lr": {"loguniform": [1e-4, 1e-2]}},
                   {"kind": "pbt", "num_samples": 2, "max_concurrent": 2, "seed": 1,
                    "pbt": {"perturbation_interval": 40, "quantile": 0.5, "resample_probability": 0.0, "synch": True}})  # fmt: skip
    cfg, base, plan = prepare_sweep(job, ["run.name=pbt"], space)
    outcome = run_sweep(cfg, base, plan)
    assert outcome.complete
    root = tmp_path / "runs" / "pbt"
    segments = sorted(p for p in root.glob("pbt-t00?-*") if (p / "start").is_dir())
    assert segments, f"no trial took over another's state: {[(r.name, r.took_over) for r in outcome.rows]}"
    runs = _child_runs(cfg.tracking.uri, outcome.parent_run_id)
    assert sorted(runs) == ["pbt-t000", "pbt-t001"]  # a takeover opens no MLflow run of its own
    client = mlflow.MlflowClient(cfg.tracking.uri)
    for segment in segments:
        receiver = segment.name.rsplit("-", 1)[0]
        source = json.loads((segment / "start" / "sweep.json").read_text())
        assert source["trial"] != receiver
        step = source["step"]
        donor = read_state(root / source["segment"] / f"step-{step:09d}")  # the donor's own checkpoint then
        taken = read_state(segment / f"step-{step:09d}")  # the receiver's first checkpoint: what its ranks restored
        assert taken["step"] == donor["step"] == step and taken["data_position"] == donor["data_position"]
        assert _state_digest(taken) == _state_digest(donor)
        assert taken["augment"]["p"].item() == donor["augment"]["p"].item()
        # ... under the receiver's own (perturbed) learning rate, logged into the receiver's own MLflow run.
        own_lr = taken["config"]["optim"]["g_lr"]
        assert taken["opt_g"]["param_groups"][0]["lr"] == pytest.approx(own_lr)
        assert own_lr != donor["config"]["optim"]["g_lr"]
        assert taken["config"]["tracking"]["run_name"] == receiver and taken["mlflow_run_id"] == runs[receiver].info.run_id
        logged = client.get_metric_history(runs[receiver].info.run_id, "optim/lr_g")
        assert pytest.approx(own_lr) in [m.value for m in logged if m.step == step + 2]


@pytest.mark.parametrize(
    ("params", "search", "key"),
    [
        ({"optim.g_lrr": {"choice": [1e-4]}}, {}, "optim.g_lrr"),  # not a config key
        ({"loss.r1_gamma": {"uniform": [-1.0, 1.0]}}, {}, "loss.r1_gamma"),  # one end of the range is invalid
        ({"optim.g_lr": {"loguniform": [0.0, 1e-3]}}, {}, "params.optim.g_lr"),
        ({"model.g_width": {"uniform": [8, 32]}}, {}, "model.g_width"),  # draws floats: an int key takes choice
        ({"run.name": {"choice": ["x"]}}, {}, "params.run.name"),  # the sweep names its trials
        ({"tracking": {"choice": [{"uri": "sqlite:///elsewhere.db"}]}}, {}, "params.tracking"),  # a whole section too
        ({"optim.g_lr": {"choice": [1e-4]}}, {"kind": "pbt", "num_samples": 3, "max_concurrent": 2,
                                              "pbt": {"perturbation_interval": 4, "synch": True}}, "search.pbt.synch"),
        ({"optim.g_lr": {"grid": [1e-4, 2e-4]}}, {"kind": "pbt", "pbt": {"perturbation_interval": 4}}, "params.optim.g_lr"),
        ({"optim.g_lr": {"choice": [1e-4]}}, {"kind": "pbt", "pbt": {"perturbation_interval": 3}},
         "search.pbt.perturbation_interval"),  # not at a checkpoint (every 2 steps)
        ({"optim.g_lr": {"choice": [1e-4]}}, {"kind": "asha"}, "search.asha"),
    ],
)
def test_space_mistakes_are_refused_before_ray_starts_naming_the_key(digits_shards, tmp_path, params, search, key):
    job = _job(digits_shards, tmp_path, steps=12, every=2)
    with pytest.raises(ConfigError) as caught:
        prepare_sweep(job, [], _space(tmp_path, params, search))
    assert caught.value.key == key, str(caught.value)


def test_a_key_a_schedule_sets_is_refused_and_the_ramp_can_be_swept_instead(digits_shards, tmp_path):
    ramp = {"start": 1e-3, "end": 1e-4, "kimg": 1}
    job = _job(digits_shards, tmp_path, steps=12, every=2, schedules={"g_lr": ramp})
    with pytest.raises(ConfigError, match="schedules.g_lr") as caught:  # every trial would train at the ramp's rates
        prepare_sweep(job, [], _space(tmp_path, {"optim.g_lr": {"loguniform": [1e-4, 1e-3]}}, {}))
    assert caught.value.key == "params.optim.g_lr"
    _, _, plan = prepare_sweep(job, [], _space(tmp_path, {"schedules.g_lr.start": {"loguniform": [1e-4, 1e-3]},
                                                          "optim.d_lr": {"choice": [1e-4]}}, {}))  # fmt: skip
    assert set(plan.params) == {"schedules.g_lr.start", "optim.d_lr"}


def test_a_trial_run_its_actor_could_not_end_is_killed_when_the_sweep_ends(digits_shards, tmp_path):
    """Tune kills a trial still stopping 10 s after a sweep's end; the sweep then ends that trial's MLflow run."""
    from gan_dist.sweep.parent import ParentRun

    space = _space(tmp_path, {"optim.g_lr": {"choice": [1e-4]}}, {})
    cfg, base, plan = prepare_sweep(_job(digits_shards, tmp_path, steps=12, every=2), ["run.name=ended"], space)
    parent = ParentRun(cfg, "ended", plan, base)
    client = mlflow.MlflowClient(cfg.tracking.uri)
    experiment = client.get_run(parent.run_id).info.experiment_id
    left, done = (client.create_run(experiment, tags={"mlflow.parentRunId": parent.run_id}).info.run_id for _ in "ab")
    client.set_terminated(done, "FINISHED")
    parent.finish(plan, [], None, None, complete=True)
    assert [client.get_run(r).info.status for r in (left, done, parent.run_id)] == ["KILLED", "FINISHED", "FINISHED"]


def test_a_quality_metric_needs_evaluation_at_every_checkpoint(digits_shards, tmp_path):
    job = _job(digits_shards, tmp_path, steps=12, every=2)
    space = tmp_path / "quality.yaml"
    space.write_text(yaml.safe_dump({"params": {"optim.g_lr": {"choice": [1e-4]}}, "metric": {"name": "quality/fid"}}))
    with pytest.raises(ConfigError, match="needs evaluation"):
        prepare_sweep(job, [], space)
    with pytest.raises(ConfigError) as caught:
        prepare_sweep(job, ["eval.every=4"], space)
    assert caught.value.key == "checkpoint.every"


def test_the_shipped_space_fits_the_mnist_job_with_the_overrides_its_header_gives():
    import re

    repo = Path(__file__).resolve().parents[1]
    space = repo / "jobs" / "sweeps" / "mnist_r1_lr.yaml"
    overrides = re.findall(r"--set (\S+)", space.read_text())
    cfg, base, plan = prepare_sweep(repo / "jobs" / "mnist.yaml", overrides, space)
    assert plan.search.kind == "asha" and set(plan.params) == {"loss.r1_gamma", "optim.g_lr", "optim.d_lr"}
    assert cfg.checkpoint.every % cfg.eval.every == 0 and Path(base["eval"]["extractor_path"]).is_absolute()


@pytest.mark.parametrize("kind", ["constant", "step", "cosine"])
def test_a_takeover_continues_the_schedule_at_the_receivers_own_rates(kind):
    """What a PBT takeover's ranks do with the donor's optimizers (``resume_mode: continue`` into another config):
    keep its moments and the schedules' positions (warm-up included), take the receiving config's rates, betas and
    eps. From then on the rate is the one a run of the receiving config has at that step."""
    from gan_dist.config import build_config
    from gan_dist.train.checkpoint import restore_modules, training_state
    from gan_dist.train.loop import _use_configured_rates
    from gan_dist.train.modules import build_modules

    def modules(lr: float, beta1: float, steps: int = 0):
        cfg = build_config({"data": {"url": "unused"}, "model": {"g_width": 8, "d_width": 8, "z_dim": 16},
                            "train": {"steps": 40}, "optim": {"g_lr": lr, "d_lr": 2 * lr, "betas": [beta1, 0.99],
                            "g_schedule": {"kind": kind, "warmup_steps": 5, "step_every": 7}, "d_schedule": {"kind": kind}}})  # fmt: skip
        m = build_modules(cfg, torch.device("cpu"))
        for _ in range(steps):
            m.opt_g.step(), m.sched_g.step(), m.opt_d.step(), m.sched_d.step()
        return m

    donor, receiver, reference = modules(2e-4, 0.5, steps=13), modules(5e-4, 0.0), modules(5e-4, 0.0, steps=13)
    configured = [[{k: g[k] for k in ("initial_lr", "betas", "eps")} for g in o.param_groups]
                  for o in (receiver.opt_g, receiver.opt_d)]  # fmt: skip
    restore_modules(receiver, training_state(donor))
    _use_configured_rates(receiver, configured)
    assert receiver.sched_g.last_epoch == donor.sched_g.last_epoch == 13
    for _ in range(10):
        for m in (receiver, reference):
            m.opt_g.step(), m.sched_g.step(), m.opt_d.step(), m.sched_d.step()
        for a, b in ((receiver.opt_g, reference.opt_g), (receiver.opt_d, reference.opt_d)):
            assert a.param_groups[0]["lr"] == pytest.approx(b.param_groups[0]["lr"], rel=1e-12)
            assert a.param_groups[0]["betas"] == b.param_groups[0]["betas"] == (0.0, 0.99)

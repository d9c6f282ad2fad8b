"""Resume and recovery on a real Ray worker group: a killed worker, NaN losses, fine-tuning, export."""

import json
import math
import time
from pathlib import Path

import mlflow
import pytest
import torch

from gan_dist.config import build_config
from gan_dist.driver import run_training
from gan_dist.models.io import export_generator, load_generator, read_state
from gan_dist.train.phases import NonFiniteLoss
from tests.conftest import TINY_MODEL

pytestmark = pytest.mark.ray

RUN = TINY_MODEL + [
    "train.steps=24",
    "checkpoint.every=5",
    "train.log_every=4",
    "train.sample_every=24",
    "checkpoint.num_to_keep=2",
    "checkpoint.keep_every=10",
    "loss.name=hinge",
    "loss.r1_gamma=0.5",
    "loss.r1_every=3",
    "model.d_norm=none",  # R1 needs per-sample gradients: no BatchNorm in D
]


def _assert_same_weights(a: dict, b: dict, parts=("g", "d", "g_ema", "opt_g", "opt_d")) -> None:
    for part in parts:
        flat_a, flat_b = _tensors(a[part]), _tensors(b[part])
        assert flat_a.keys() == flat_b.keys()
        for key in flat_a:
            assert torch.equal(flat_a[key], flat_b[key]), f"{part}.{key} differs"


def _tensors(tree, prefix=""):
    if torch.is_tensor(tree):
        return {prefix or "value": tree}
    out = {}
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list) else ()
    for k, v in items:
        if torch.is_tensor(v):
            out[f"{prefix}{k}"] = v
        else:
            out.update(_tensors(v, f"{prefix}{k}."))
    return out


def test_killed_worker_resumes_bit_identical_and_exports(ray_session, job_tree, tmp_path):
    reference = run_training(build_config(job_tree, RUN + ["run.name=steady"]))

    # Rank 1 dies (os._exit) after step 12; Ray restarts the group from the step-10 checkpoint.
    ray_session.write_text(json.dumps({"run": "crashy", "rank": 1, "step": 12}))
    crashed = run_training(build_config(job_tree, RUN + ["run.name=crashy", "train.max_failures=1"]))
    assert not ray_session.exists(), "the drill never fired"
    assert crashed.final_step == 24 and crashed.metrics["rank_steps"] == [24, 24]
    assert crashed.mlflow_run_id == crashed.metrics["mlflow_run_id"]

    # Bit-identical to the uninterrupted run: weights, EMA and optimizer state.
    assert crashed.metrics["param_digests"] == reference.metrics["param_digests"]
    _assert_same_weights(read_state(crashed.checkpoint_path), read_state(reference.checkpoint_path))

    # Retention: 2 newest checkpoints kept by Ray, every 10th archived for good.
    run_dir = Path(crashed.checkpoint_path).parent
    assert sorted(p.name for p in run_dir.glob("step-*")) == ["step-000000020", "step-000000024"]
    assert sorted(p.name for p in (run_dir / "archive").iterdir()) == ["step-000000010", "step-000000020"]
    archived = read_state(run_dir / "archive" / "step-000000010")
    assert archived["step"] == 10 and archived["data_batches"] == 10

    # Export: a generator-only file, loadable weights-only, that generates the right images.
    exported = export_generator(crashed.checkpoint_path, tmp_path / "g.pt")
    assert exported.stat().st_size < Path(crashed.checkpoint_path, "state.pt").stat().st_size / 2
    generator, meta = load_generator(exported)
    assert meta["step"] == 24 and meta["run_name"] == "crashy"
    images = generator(torch.randn(5, meta["model"]["z_dim"]))
    assert images.shape == (5, 1, 32, 32) and images.abs().max() <= 1

    # Fine-tune from that checkpoint into a new run name: its weights, but step 0, a fresh data stream and a
    # new MLflow run. resume_mode=continue takes the whole state instead (step 24 on).
    ckpt = f"checkpoint.resume_from={crashed.checkpoint_path}"
    tuned = run_training(build_config(job_tree, RUN + ["run.name=tuned", "train.steps=4", ckpt]))
    assert tuned.final_step == 4 and tuned.mlflow_run_id != crashed.mlflow_run_id
    tuned_state = read_state(tuned.checkpoint_path)
    assert tuned_state["data_batches"] == 4 and tuned_state["samples_seen"] == 4 * 16
    continued = run_training(
        build_config(job_tree, RUN + ["run.name=continued", "train.steps=26", ckpt, "checkpoint.resume_mode=continue"])
    )
    assert continued.final_step == 26 and read_state(continued.checkpoint_path)["data_batches"] == 26


def test_non_finite_parameters_roll_back_and_training_goes_on(ray_session, job_tree):
    # Rank 1's D is poisoned with NaN after step 7; the check at step 8 rolls every rank back to the step-4
    # checkpoint, and the run goes on, with other noise, to its last step.
    ray_session.write_text(json.dumps({"run": "poisoned", "rank": 1, "step": 7, "fault": "nan"}))
    overrides = TINY_MODEL + ["run.name=poisoned", "train.steps=12", "train.log_every=2", "checkpoint.every=4",
                              "train.nan_action=rollback", "train.max_rollbacks=1", "train.max_failures=0"]  # fmt: skip
    cfg = build_config(job_tree, overrides)
    outcome = run_training(cfg)
    assert not ray_session.exists(), "the drill never fired"
    assert outcome.final_step == 12 and outcome.metrics["rank_steps"] == [12, 12]
    client = mlflow.MlflowClient(cfg.tracking.uri)
    rollbacks = client.get_metric_history(outcome.mlflow_run_id, "optim/nan_rollbacks")
    assert [(m.step, m.value) for m in rollbacks][-1] == (12, 1.0)  # one rollback, then on to the end
    losses = {m.step: m.value for m in client.get_metric_history(outcome.mlflow_run_id, "losses/d")}
    assert all(math.isfinite(v) for v in losses.values()) and max(losses) == 12
    final = read_state(outcome.checkpoint_path)
    assert all(torch.isfinite(t).all() for t in final["d"].values() if t.is_floating_point())


def test_non_finite_losses_stop_when_told_to(ray_session, job_tree):
    # An absurd learning rate drives D's logits to inf within a few steps, every time.
    overrides = TINY_MODEL + [
        "run.name=diverging",
        "optim.d_lr=1e30",
        "loss.name=lsgan",
        "train.steps=40",
        "train.log_every=2",
        "checkpoint.every=2",
        "train.nan_action=stop",
        "train.max_failures=0",
    ]
    with pytest.raises(NonFiniteLoss, match="non-finite"):
        run_training(build_config(job_tree, overrides))


@pytest.mark.parametrize("at", [7, 10])  # between two periodic checkpoints (every 5), and on one
def test_sigterm_checkpoints_the_step_it_was_on_and_the_restart_continues_from_it(ray_session, job_tree, at):
    # Rank 1 gets SIGTERM after step `at` (what a Kubernetes eviction sends). On a checkpoint step the periodic
    # checkpoint would be uploaded in the background: the rank must not fail before it is uploaded and reported.
    ray_session.write_text(json.dumps({"run": f"evicted-{at}", "rank": 1, "step": at, "fault": "sigterm"}))
    overrides = TINY_MODEL + [f"run.name=evicted-{at}", "train.steps=12", "train.log_every=2", "checkpoint.every=5",
                              "checkpoint.num_to_keep=5", "train.max_failures=1", "train.preempt_grace_s=120"]  # fmt: skip
    cfg = build_config(job_tree, overrides)
    started = time.monotonic()
    outcome = run_training(cfg)
    assert time.monotonic() - started < 120  # no worker, evicted or finished, waits out the grace to exit
    assert not ray_session.exists(), "the drill never fired"
    assert outcome.final_step == 12 and outcome.metrics["rank_steps"] == [12, 12]
    run_dir = Path(outcome.checkpoint_path).parent
    assert sorted(p.name for p in run_dir.glob("step-*")) == sorted(
        {"step-000000005", f"step-{at:09d}", "step-000000010", "step-000000012"})  # at 7: written on SIGTERM
    assert read_state(run_dir / f"step-{at:09d}")["data_position"]["batches"] == at
    # The restart continued from step `at`, not from the periodic checkpoint before it: no step trained twice.
    client = mlflow.MlflowClient(cfg.tracking.uri)
    logged = [m.step for m in client.get_metric_history(outcome.mlflow_run_id, "losses/d")]
    assert logged == [2, 4, 6, 8, 10, 12]


STYLEGAN2_ADA = [
    "model.arch=stylegan2", "model.channel_base=256", "model.channel_max=16", "model.z_dim=16", "model.w_dim=16",
    "model.mapping_layers=2", "train.batch_size=8", "loss.r1_every=4", "loss.pl_every=2", "augment.kind=ada",
    "augment.interval=2", "augment.target=0.05", "augment.speed_kimg=0.5", "train.steps=16", "checkpoint.every=5",
    "train.log_every=4", "train.sample_every=16",
]  # fmt: skip


def test_stylegan2_ada_killed_worker_resumes_bit_identical(ray_session, job_tree):
    """The drill with StyleGAN2 + ADA: every piece of state that is not a weight — ADA's p and its statistics,
    the mean style w_avg, the running path length pl_mean — comes back exactly, on every rank."""
    reference = run_training(build_config(job_tree, STYLEGAN2_ADA + ["run.name=sg2-steady"]))
    ray_session.write_text(json.dumps({"run": "sg2-crashy", "rank": 1, "step": 8}))
    crashed = run_training(build_config(job_tree, STYLEGAN2_ADA + ["run.name=sg2-crashy", "train.max_failures=1"]))
    assert not ray_session.exists(), "the drill never fired"
    assert crashed.metrics["param_digests"] == reference.metrics["param_digests"]
    a, b = read_state(crashed.checkpoint_path), read_state(reference.checkpoint_path)
    _assert_same_weights(a, b, ("g", "d", "g_ema", "opt_g", "opt_d", "augment", "ada", "pl_mean"))
    assert float(a["augment"]["p"]) > 0 and float(a["pl_mean"]) > 0  # the state moved: the check means something
    assert torch.count_nonzero(a["g"]["mapping.w_avg"]) > 0

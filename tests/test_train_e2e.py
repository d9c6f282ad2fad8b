"""A real 2-worker TorchTrainer job on real shards: checkpoint, MLflow run, and same-name continuation."""

from pathlib import Path

import mlflow
import pytest
import torch

from gan_dist.config import build_config
from gan_dist.driver import run_training
from gan_dist.models.io import read_state
from tests.conftest import TINY_MODEL

pytestmark = pytest.mark.ray


def _history_steps(client, run_id, key):
    return [m.step for m in client.get_metric_history(run_id, key)]


def test_two_workers_train_checkpoint_log_and_continue(ray_session, job_tree, digits_classifier):
    evaluation = ["eval.every=6", "eval.extractor=classifier", f"eval.extractor_path={digits_classifier}",
                  "eval.num_images=128", "eval.batch_size=64", f"eval.mode_classifier={digits_classifier}"]
    cfg = build_config(job_tree, TINY_MODEL + evaluation + ["run.name=e2e-run"])
    first = run_training(cfg)

    # Both ranks ran every step and ended with bitwise-identical G and D.
    assert first.final_step == 6
    assert first.metrics["rank_steps"] == [6, 6]
    digests = first.metrics["param_digests"]
    assert len(digests) == 2 and digests[0] == digests[1]

    # The checkpoint holds the whole state and the effective config.
    state = read_state(first.checkpoint_path)
    assert state["step"] == 6
    assert {"g", "d", "g_ema", "opt_g", "opt_d"} <= set(state)
    # Each rank drew from streams of its own (noise inputs, mixing, augmentations come from the global one).
    streams = state["rng"]
    assert len(streams) == 2
    assert not torch.equal(streams[0]["torch"], streams[1]["torch"]) and not torch.equal(streams[0]["noise"], streams[1]["noise"])
    assert state["config"]["train"]["steps"] == 6 and state["config"]["run"]["name"] == "e2e-run"
    assert "steps: 6" in (Path(first.checkpoint_path) / "config.yaml").read_text()
    assert Path(first.checkpoint_path).parent.name == "e2e-run"

    # The MLflow run has params, the config, loss curves and the sample grid at several steps.
    client = mlflow.MlflowClient(cfg.tracking.uri)
    run = client.get_run(first.mlflow_run_id)
    assert run.data.params["train.steps"] == "6"
    assert run.data.params["model.arch"] == "dcgan"
    for key in ("losses/d", "losses/g", "discriminator/real", "discriminator/fake", "optim/d_grad_norm",
                "optim/g_grad_norm", "optim/lr_g", "throughput/images_per_sec", "throughput/data_wait_fraction",
                "throughput/data_skipped"):
        assert _history_steps(client, run.info.run_id, key) == [2, 4, 6], key
    # FID/KID computed across both workers against cached real statistics, logged at the eval step, and the
    # mode coverage of the ten digit classes as eval.mode_classifier names them.
    for key in ("quality/fid", "quality/kid_mean", "quality/is_mean", "quality/modes", "quality/mode_kl"):
        assert _history_steps(client, run.info.run_id, key) == [6], key
    assert 1 <= client.get_metric_history(run.info.run_id, "quality/modes")[0].value <= 10
    assert client.get_metric_history(run.info.run_id, "quality/fid")[0].value > 0
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "config.yaml" in artifacts
    images = [a.path for a in client.list_artifacts(run.info.run_id, "images")]
    assert sum("samples" in p and p.endswith(".png") for p in images) >= 2
    assert any("real_samples" in p for p in images)
    assert run.data.params["cluster.world_size"] == "2"

    # Same run name again with more steps: continues from step 6 into the same MLflow run.
    cfg2 = build_config(job_tree, TINY_MODEL + evaluation + ["run.name=e2e-run", "train.steps=9"])
    second = run_training(cfg2)
    assert second.final_step == 9
    assert second.mlflow_run_id == first.mlflow_run_id
    assert _history_steps(client, run.info.run_id, "losses/d") == [2, 4, 6, 8, 9]
    assert _history_steps(client, run.info.run_id, "quality/fid") == [6, 9]
    runs = client.search_runs([run.info.experiment_id])
    assert len(runs) == 1


def test_conditional_run_from_shards_to_checkpoint_mlflow_and_resume(ray_session, job_tree, digits_classifier, tmp_path):
    """A conditional DCGAN on the labelled digits: classes from the manifest, class rows in the sample grid,
    class accuracy and intra-FID during training, a checkpoint and exported generator that know their
    classes, and a same-name resume into the same MLflow run."""
    from gan_dist.models.io import export_generator
    from gan_dist.sample import write_samples

    conditional = TINY_MODEL + ["model.conditional=true", "run.name=cond-run", "eval.every=6", "eval.per_class=3",
                                "eval.extractor=classifier", f"eval.extractor_path={digits_classifier}",
                                "eval.num_images=128", "eval.batch_size=64", "train.sample_grid=20"]  # fmt: skip
    cfg = build_config(job_tree, conditional)
    first = run_training(cfg)
    assert first.final_step == 6 and first.metrics["rank_steps"] == [6, 6]
    state = read_state(first.checkpoint_path)
    assert state["config"]["model"]["num_classes"] == 10  # taken from the manifest before Ray started
    assert state["class_names"] == [str(d) for d in range(10)]

    client = mlflow.MlflowClient(cfg.tracking.uri)
    for key in ("quality/fid", "quality/class_accuracy", "quality/intra_fid/0", "quality/intra_fid_mean",
                "quality/modes", "quality/mode_kl"):
        assert _history_steps(client, first.mlflow_run_id, key) == [6], key
    assert 0 <= client.get_metric_history(first.mlflow_run_id, "quality/class_accuracy")[0].value <= 1
    grids = [a.path for a in client.list_artifacts(first.mlflow_run_id, "images") if "samples" in a.path]
    assert grids  # one labelled row per class (checked in the unit tests of the grid)

    second = run_training(build_config(job_tree, conditional + ["train.steps=8"]))
    assert second.final_step == 8 and second.mlflow_run_id == first.mlflow_run_id

    exported = export_generator(second.checkpoint_path, tmp_path / "g.pt")
    written = write_samples(exported, 6, tmp_path / "threes", classes=[3])
    assert (tmp_path / "threes" / "classes.png").exists() and len(written) >= 8


def test_three_workers_uneven_micro_batches_and_path_length_train_to_the_end(ray_session, job_tree):
    """The run that hung (every worker stuck in the path-length all-reduce): StyleGAN2 + ADA on 3 workers,
    8 images as 2/3/3 in micro-batches of at most 2, path length on every step. It trains to the end with the
    ranks in sync."""
    stylegan2 = ["model.arch=stylegan2", "model.channel_base=256", "model.channel_max=16", "model.z_dim=16",
                 "model.w_dim=16", "model.mapping_layers=2", "model.mbstd_group_size=1", "augment.kind=ada",
                 "scaling.num_workers=3", "scaling.cpus_per_worker=0.5", "train.batch_size=8", "train.micro_batch=2",
                 "loss.pl_every=1", "train.steps=3", "checkpoint.every=3", "run.name=uneven-pl"]  # fmt: skip
    result = run_training(build_config(job_tree, stylegan2))
    assert result.final_step == 3 and result.metrics["rank_steps"] == [3, 3, 3]
    assert len(set(result.metrics["param_digests"])) == 1
    assert read_state(result.checkpoint_path)["pl_mean"] > 0


R3GAN_TINY = ["model.arch=r3gan", "model.z_dim=16", "model.channel_base=128", "model.channel_max=16",
              "model.group_width=8", "loss.name=rpgan", "loss.r1_every=1", "optim.betas=[0.0,0.9]",
              "schedules.r1_gamma={start: 1.0, end: 0.1, kimg: 0.08}", "schedules.r2_gamma={start: 1.0, end: 0.1, kimg: 0.08}",
              "schedules.g_lr={start: 2.0e-4, end: 5.0e-5, kimg: 0.08}", "schedules.beta2={start: 0.9, end: 0.99, kimg: 0.08}",
              "schedules.ema_kimg={start: 0, end: 0.5, kimg: 0.08}", "augment.kind=ada",
              "schedules.augment_p={start: 0, end: 0.3, kimg: 0.08}"]  # fmt: skip


def test_conditional_r3gan_with_rpgan_r1_r2_and_schedules_trains_end_to_end(ray_session, job_tree, digits_classifier):
    """R3GAN's recipe on 2 workers: a conditional r3gan (class embedding in G, projection in D), the relativistic
    loss with R1 and R2 every step, every knob on a schedule. Both ranks stay in sync, the penalties and the
    scheduled values reach MLflow (the values at each logged step, moving from start to end), and evaluation
    reports FID and class accuracy for it like for any arch."""
    options = R3GAN_TINY + ["model.conditional=true", "run.name=r3gan-cond", "eval.every=6", "eval.per_class=2",
                            "eval.extractor=classifier", f"eval.extractor_path={digits_classifier}",
                            "eval.num_images=128", "eval.batch_size=64"]  # fmt: skip
    cfg = build_config(job_tree, options)
    result = run_training(cfg)
    assert result.final_step == 6 and result.metrics["rank_steps"] == [6, 6]
    assert len(set(result.metrics["param_digests"])) == 1
    state = read_state(result.checkpoint_path)
    assert state["config"]["model"]["arch"] == "r3gan" and state["config"]["model"]["num_classes"] == 10

    client = mlflow.MlflowClient(cfg.tracking.uri)
    for key in ("losses/d_r1", "losses/d_r2", "losses/g", "schedules/r1_gamma", "schedules/augment_p"):
        assert _history_steps(client, result.mlflow_run_id, key) == [2, 4, 6], key
    gamma = [m.value for m in client.get_metric_history(result.mlflow_run_id, "schedules/r1_gamma")]
    assert gamma == sorted(gamma, reverse=True) and gamma[-1] == pytest.approx(0.1)  # the last step saw 80 images: the end
    lr = client.get_metric_history(result.mlflow_run_id, "optim/lr_g")[-1].value
    assert lr == pytest.approx(5e-5)
    for key in ("quality/fid", "quality/class_accuracy"):
        assert _history_steps(client, result.mlflow_run_id, key) == [6], key

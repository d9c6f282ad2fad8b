"""MLflow tracking: redaction, and against a real ``mlflow server``: one run per run name, secret-free params,
metric and image histories, the logged generator model, and a server outage mid-run (tracker and training)."""

from __future__ import annotations

import importlib.util
import logging
import subprocess
import threading
import time
from importlib.metadata import version
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from gan_dist.config import build_config
from gan_dist.driver import run_training
from gan_dist.models import build_generator
from gan_dist.tracking.redact import redact, redact_uri
from gan_dist.tracking.tracker import DROPPED_TAG, MlflowTracker
from gan_dist.tracking.info import CHECKPOINT_TAG, DATASET_SAMPLES_TAG, RUN_NAME_TAG, flatten
from gan_dist.models.io import export_generator, read_state
from gan_dist.train.checkpoint import save_checkpoint
from tests.conftest import TINY_MODEL

SECRET = "hunter2-do-not-log"
TRACKING_LOG = "gan_dist.tracking.tracker"


def test_flatten():
    assert flatten({"a": {"b": 1, "c": {"d": [2]}}, "e": None}) == {"a.b": 1, "a.c.d": [2], "e": None}


def test_redact_hides_secret_keys_and_uri_credentials():
    params = {
        "storage.secret_key": SECRET,
        "db.password": SECRET,
        "hub.api_token": SECRET,
        "s3.aws_access_key_id": SECRET,
        "storage.region": None,  # not a secret, and an unset secret stays visibly unset
        "checkpoint.storage": f"s3://minio:{SECRET}@bucket/runs",
        "tracking.uri": f"http://alice:{SECRET}@mlflow.internal:5000",
        "odd.uri": f"https://user:p@ss{SECRET}@host/path",
        "data.url": f"https://host/shards/{{000..009}}.tar?X-Amz-Signature={SECRET}&part=1",
        "nested": {"password": SECRET, "urls": [f"s3://k:{SECRET}@b/x"]},
        "model.g_width": 64,
    }
    clean = redact(params)
    assert SECRET not in str(clean)
    assert clean["checkpoint.storage"] == "s3://***@bucket/runs"
    assert clean["tracking.uri"] == "http://***@mlflow.internal:5000"
    assert clean["data.url"] == "https://host/shards/{000..009}.tar?X-Amz-Signature=***&part=1"
    assert clean["db.password"] == "***" and clean["storage.region"] is None and clean["model.g_width"] == 64
    assert clean["nested"]["urls"] == ["s3://***@b/x"]
    assert redact_uri("/plain/local/path") == "/plain/local/path"


def _cfg(job_tree: dict, server_uri: str, name: str, *extra: str):
    return build_config(job_tree, TINY_MODEL + [f"tracking.uri={server_uri}", f"run.name={name}", *extra])


def _image(step: int) -> Image.Image:
    return Image.fromarray(np.full((16, 16, 3), step * 10 % 256, np.uint8))


def _image_steps(client: mlflow.MlflowClient, run_id: str, key: str) -> set[int]:
    """Steps of the ``key`` image history (files images/<key>+step+<n>+timestamp+...)."""
    names = (Path(a.path).name for a in client.list_artifacts(run_id, "images"))
    return {int(n.split("+")[2]) for n in names if n.startswith(f"{key}+step+") and n.endswith(".png")}


def test_same_run_name_continues_one_run_with_secret_free_params(mlflow_server, job_tree, tmp_path):
    port = mlflow_server.uri.rsplit(":", 1)[1]
    cfg = _cfg(
        job_tree,
        f"http://alice:{SECRET}@127.0.0.1:{port}",  # the server ignores the credentials; MLflow must not log them
        "continue-me",
        f"checkpoint.storage=s3://minio:{SECRET}@bucket/runs",
    )
    first = MlflowTracker(cfg)
    first.log_cluster(world_size=2, num_nodes=1, gpus=0)
    for step in (1, 2, 3):
        first.log_metrics({"d_loss": 1.0 / step, "g_loss": float(step)}, step=step)
        first.log_image(_image(step), key="samples", step=step)
    first.finish()

    second = MlflowTracker(cfg)  # a manual resume that lost the run id: found by its run-name tag
    assert second.run_id == first.run_id
    for step in (4, 5):
        second.log_metrics({"d_loss": 1.0 / step, "g_loss": float(step)}, step=step)
    second.log_image(_image(5), key="samples", step=5)
    second.finish()

    client = mlflow.MlflowClient(mlflow_server.uri)
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    runs = client.search_runs([experiment.experiment_id], f"tags.`{RUN_NAME_TAG}` = 'continue-me'")
    assert [r.info.run_id for r in runs] == [first.run_id]
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_name == "continue-me"

    params, tags = run.data.params, run.data.tags
    assert params["train.steps"] == str(cfg.train.steps) and params["model.g_width"] == "8"
    assert params["cluster.world_size"] == "2" and params["cluster.num_nodes"] == "1" and params["cluster.gpus"] == "0"
    # Versions and locations are tags (params: what the run changed; the whole config: config.yaml).
    assert tags["versions.torch"] == version("torch") and tags["versions.mlflow"] == mlflow.__version__
    assert {"versions.ray", "versions.torchvision", "versions.webdataset", "versions.gan_dist"} <= set(tags)
    assert "tracking.uri" not in params and "optim.betas" not in params  # where it logs; a default
    assert params["model.arch"] == "dcgan"  # what the run is, default or not
    assert tags[CHECKPOINT_TAG] == "s3://***@bucket/runs/continue-me"
    assert tags[DATASET_SAMPLES_TAG] == "1797"
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True)
    if head.returncode == 0:
        assert tags["mlflow.source.git.commit"] == head.stdout.strip()
    config = yaml.safe_load(Path(client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path))).read_text())
    manifest = Path(client.download_artifacts(run.info.run_id, "dataset/manifest.json", str(tmp_path))).read_text()
    assert config["checkpoint"]["storage"] == "s3://***@bucket/runs" and '"num_samples": 1797' in manifest
    assert config["tracking"]["uri"] == f"http://***@127.0.0.1:{port}"
    assert SECRET not in str(params) + str(tags) + str(config)

    history = client.get_metric_history(run.info.run_id, "d_loss")
    assert [(m.step, m.value) for m in history] == [(s, 1.0 / s) for s in (1, 2, 3, 4, 5)]
    assert _image_steps(client, run.info.run_id, "samples") == {1, 2, 3, 5}
    assert DROPPED_TAG not in tags


def test_logged_generator_loads_and_generates(mlflow_server, job_tree, tmp_path):
    cfg = _cfg(job_tree, mlflow_server.uri, "model-run", "tracking.register_model=gan-dist-test-generator")
    generator = build_generator(cfg.model, cfg.data.resolution, cfg.data.channels).eval()
    save_checkpoint(
        tmp_path / "ckpt", {"g_ema": generator.state_dict(), "step": 6, "config": cfg.model_dump(mode="json")}
    )
    generator_file = export_generator(tmp_path / "ckpt", tmp_path / "generator.pt")

    tracker = MlflowTracker(cfg)
    model_uri = tracker.log_generator(generator_file, register_as=cfg.tracking.register_model)
    tracker.finish()
    assert model_uri is not None and model_uri.startswith("models:/")

    mlflow.set_tracking_uri(mlflow_server.uri)  # models:/ URIs resolve through the global tracking URI
    z = np.random.default_rng(0).standard_normal((5, cfg.model.z_dim)).astype(np.float32)
    for uri in (model_uri, "models:/gan-dist-test-generator/1"):
        model = mlflow.pyfunc.load_model(uri)
        images = model.predict(z)
        assert images.shape == (5, 1, 32, 32) and np.abs(images).max() <= 1
        with torch.no_grad():
            np.testing.assert_allclose(images, generator(torch.from_numpy(z)).numpy(), atol=1e-6)
    # No pickled code: the only flavor is pyfunc, loaded by gan_dist's weights-only loader.
    assert set(model.metadata.flavors) == {"python_function"}
    assert model.metadata.flavors["python_function"]["loader_module"] == "gan_dist.tracking.model"
    assert model.metadata.metadata["gan_dist"]["step"] == 6
    assert isinstance(model.get_raw_model(), torch.nn.Module)
    client = mlflow.MlflowClient(mlflow_server.uri)
    assert client.get_logged_model(model_uri.split("/")[-1]).source_run_id == tracker.run_id


def test_sqlite_default_artifacts_next_to_db_and_system_metrics_switch(job_tree, tmp_path, caplog, monkeypatch):
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")
    cfg = build_config(job_tree, TINY_MODEL + ["run.name=sysmetrics", "tracking.system_metrics=true"])
    tracker = MlflowTracker(cfg)
    tracker.log_metrics({"d_loss": 0.5}, step=1)
    time.sleep(3)  # a few sampling intervals
    tracker.finish()

    client = mlflow.MlflowClient(cfg.tracking.uri)
    run = client.get_run(tracker.run_id)
    artifact_root = client.get_experiment(run.info.experiment_id).artifact_location
    assert artifact_root == (tmp_path / "mlartifacts").as_uri()  # not the worker's current directory
    assert run.info.status == "FINISHED" and [m.step for m in client.get_metric_history(run.info.run_id, "d_loss")] == [
        1
    ]
    if importlib.util.find_spec("psutil") is None:  # MLflow's monitor needs it: said once, training unharmed
        assert _warnings(caplog, "system metrics not logged")
    else:
        assert any(key.startswith("system/") for key in run.data.metrics)


def _warnings(caplog, text: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == TRACKING_LOG and r.levelno == logging.WARNING and text in r.getMessage()
    ]


def test_server_outage_warns_once_and_catches_up(mlflow_server, job_tree, caplog):
    caplog.set_level(logging.INFO, logger=TRACKING_LOG)
    tracker = MlflowTracker(_cfg(job_tree, mlflow_server.uri, "outage-unit"))
    step = 0

    def train(seconds: float, pause: float) -> None:
        nonlocal step
        end = time.monotonic() + seconds
        while time.monotonic() < end:  # a loop that stalled on logging would not get through its steps
            step += 1
            tracker.log_metrics({"loss": float(step)}, step=step)
            if step % 4 == 0:
                tracker.log_image(_image(step), key="samples", step=step)
            time.sleep(pause)

    try:
        train(1.0, 0.05)
        mlflow_server.stop()
        train(4.0, 0.05)
        assert len(_warnings(caplog, "unreachable")) == 1
    finally:
        mlflow_server.start()
    train(8.0, 0.2)  # longer than the tracker's retry interval: it notices the server is back
    tracker.finish()

    assert len(_warnings(caplog, "unreachable")) == 1
    assert any("works again" in r.getMessage() for r in caplog.records if r.name == TRACKING_LOG)
    client = mlflow.MlflowClient(mlflow_server.uri)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    # Metric points wait out the outage and are sent afterwards: the history has every step.
    assert [m.step for m in client.get_metric_history(tracker.run_id, "loss")] == list(range(1, step + 1))
    # Images logged during the outage are dropped, and the run says how many items were dropped.
    logged = _image_steps(client, tracker.run_id, "samples")
    assert tracker.dropped >= 1 and run.data.tags[DROPPED_TAG] == str(tracker.dropped)
    assert len(logged) + tracker.dropped >= step // 4  # >: an image whose last request failed counts too
    assert max(logged) > step - 8  # images flow again after the outage


@pytest.mark.ray
def test_training_finishes_when_tracking_server_stops_mid_run(ray_session, mlflow_server, job_tree):
    cfg = _cfg(
        job_tree, mlflow_server.uri, "outage-e2e",
        "train.steps=400", "train.log_every=5", "train.sample_every=50", "checkpoint.every=200",
    )  # fmt: skip
    client = mlflow.MlflowClient(mlflow_server.uri)
    stopped = threading.Event()

    def stop_after_first_metrics() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                runs = client.search_runs(
                    [e.experiment_id for e in client.search_experiments()], f"tags.`{RUN_NAME_TAG}` = 'outage-e2e'"
                )
                if runs and client.get_metric_history(runs[0].info.run_id, "losses/d"):
                    mlflow_server.stop()
                    stopped.set()
                    return
            except Exception:
                pass  # not created yet
            time.sleep(0.3)

    watcher = threading.Thread(target=stop_after_first_metrics, daemon=True)
    watcher.start()
    try:
        outcome = run_training(cfg)
    finally:
        watcher.join(timeout=330)
        mlflow_server.start()
    assert stopped.is_set()
    assert outcome.final_step == 400
    assert read_state(outcome.checkpoint_path)["step"] == 400
    history = client.get_metric_history(outcome.mlflow_run_id, "losses/d")
    assert history and history[-1].step < 400  # the server went away while training was logging

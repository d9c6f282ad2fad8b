"""Checkpoints in real S3 (SeaweedFS on loopback): save, list, retention, restore, and an outage mid-save."""

import threading
import time

import pytest
import ray.train

from gan_dist.config import build_config
from gan_dist.driver import run_training
from gan_dist.storage import pyarrow_filesystem
from gan_dist.models.io import read_state
from tests.conftest import TINY_MODEL

pytestmark = pytest.mark.ray


def _checkpoints(s3_server, bucket: str, prefix: str) -> dict[str, set[str]]:
    """{checkpoint dir: file names} under s3://bucket/prefix."""
    found: dict[str, set[str]] = {}
    pages = s3_server.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    for page in pages:
        for obj in page.get("Contents", []):
            *dirs, name = obj["Key"][len(prefix) :].split("/")
            found.setdefault("/".join(dirs), set()).add(name)
    return found


def _restore(cfg, uri: str) -> dict:
    fs, path = pyarrow_filesystem(uri, cfg.storage)
    with ray.train.Checkpoint(path=path, filesystem=fs).as_directory() as local:
        return read_state(local)


def test_s3_checkpoints_save_list_retain_and_restore(ray_session, s3_server, job_tree):
    bucket = s3_server.make_bucket("ckpt")
    overrides = TINY_MODEL + [
        "run.name=s3-run",
        f"checkpoint.storage=s3://{bucket}/runs",
        f"storage.endpoint_url={s3_server.endpoint_url}",
        "train.steps=8",
        "checkpoint.every=2",
        "checkpoint.num_to_keep=2",
        "checkpoint.keep_every=4",
    ]
    cfg = build_config(job_tree, overrides)
    first = run_training(cfg)
    assert first.final_step == 8

    stored = _checkpoints(s3_server, bucket, "runs/s3-run/")
    steps = sorted(d for d in stored if d.startswith("step-"))
    assert steps == ["step-000000006", "step-000000008"]  # num_to_keep=2
    assert {"archive/step-000000004", "archive/step-000000008"} <= set(stored)  # keep_every=4
    for d in steps:
        assert {"state.pt", "config.yaml"} <= stored[d]

    state = _restore(cfg, f"s3://{bucket}/runs/s3-run/step-000000008")
    assert state["step"] == 8 and state["config"]["checkpoint"]["storage"] == f"s3://{bucket}/runs"

    # Same name, more steps: restores from S3 and continues.
    second = run_training(build_config(job_tree, overrides + ["train.steps=10"]))
    assert second.final_step == 10 and second.mlflow_run_id == first.mlflow_run_id


def test_s3_outage_during_saves_keeps_the_last_good_checkpoint(ray_session, s3_server, job_tree):
    bucket = s3_server.make_bucket("outage")
    overrides = TINY_MODEL + [
        "run.name=outage",
        f"checkpoint.storage=s3://{bucket}/runs",
        f"storage.endpoint_url={s3_server.endpoint_url}",
        "storage.retries=1",
        "train.steps=3000",
        "train.log_every=50",
        "checkpoint.every=5",
        "checkpoint.num_to_keep=2",
        "checkpoint.async_upload=false",
        "train.max_failures=0",
    ]
    cfg = build_config(job_tree, overrides)

    def stop_after_first_checkpoint():
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if any("state.pt" in files for files in _checkpoints(s3_server, bucket, "runs/outage/").values()):
                s3_server.stop()
                return
            time.sleep(0.2)

    watcher = threading.Thread(target=stop_after_first_checkpoint)
    watcher.start()
    try:
        with pytest.raises(ray.train.TrainingFailedError):
            run_training(cfg)
    finally:
        watcher.join()
        if not s3_server.running:
            s3_server.start()

    # Every checkpoint that became visible is complete and loads; the run continues from the newest.
    stored = _checkpoints(s3_server, bucket, "runs/outage/")
    complete = sorted(d for d, files in stored.items() if d.startswith("step-") and "state.pt" in files)
    assert complete, "no checkpoint survived"
    last = _restore(cfg, f"s3://{bucket}/runs/outage/{complete[-1]}")
    resumed = run_training(build_config(job_tree, overrides + [f"train.steps={last['step'] + 2}"]))
    assert resumed.final_step == last["step"] + 2

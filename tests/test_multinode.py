"""End to end on a real 2-node Ray cluster (cluster/local.sh: head with 0 CPUs + 2 worker nodes), with real
SeaweedFS S3 and a real mlflow server: shards prepared to S3, jobs submitted through the Job Submission API,
training across both nodes, checkpoints in S3, an MLflow run — and a worker node killed and replaced mid-run."""

import os
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
from ray.job_submission import JobStatus, JobSubmissionClient

from gan_dist.storage import StorageConfig
from gan_dist.data.prepare import prepare
from tests.conftest import TINY_MODEL

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parents[1]
LOCAL_SH = REPO / "cluster/local.sh"
GAN_DIST = str(Path(sys.executable).parent / "gan-dist")


def _cluster(state: Path, *args: str, timeout: int = 600) -> str:
    env = {**os.environ, "RAY": str(Path(sys.executable).parent / "ray"), "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.run(
        ["bash", str(LOCAL_SH), *args, "--state", str(state)], env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


@pytest.fixture(scope="module")
def two_node_cluster(tmp_path_factory):
    state = tmp_path_factory.mktemp("cluster")
    try:
        for attempt in range(3):  # a port picked free can be taken by another process before a node binds it
            try:
                _cluster(state, "start", "--workers", "2", "--cpus-per-worker", "1")
                break
            except AssertionError:
                _cluster(state, "stop")
                if attempt == 2:
                    raise
        yield state, (state / "dashboard").read_text().strip()
    finally:
        _cluster(state, "stop")


@pytest.fixture(scope="module")
def s3_dataset(s3_server):
    bucket = s3_server.make_bucket("multinode")
    storage = StorageConfig(endpoint_url=s3_server.endpoint_url)
    prepare("sklearn:digits", f"s3://{bucket}/digits", resolution=32, channels=1, samples_per_shard=450,
            progress=False, storage=storage)
    return bucket


def _job_args(bucket, s3_server, mlflow_server, name):
    settings = TINY_MODEL + [
        f"run.name={name}",
        f"data.url=s3://{bucket}/digits",
        f"storage.endpoint_url={s3_server.endpoint_url}",
        f"checkpoint.storage=s3://{bucket}/runs",
        f"tracking.uri={mlflow_server.uri}",
        "tracking.experiment=multinode",
        "data.loader_workers=1",
        "train.batch_size=16",
        "train.log_every=5",
        "train.sample_every=10",
        "checkpoint.every=10",
        "scaling.num_workers=2",
    ]
    return [a for s in settings for a in ("--set", s)]


def _checkpoint_steps(s3_server, bucket, name):
    listing = s3_server.client().list_objects_v2(Bucket=bucket, Prefix=f"runs/{name}/")
    return sorted({k["Key"].split("/")[2] for k in listing.get("Contents", []) if k["Key"].endswith("/state.pt")})


def test_submitted_job_trains_across_two_nodes(two_node_cluster, s3_server, s3_dataset, mlflow_server):
    _, dashboard = two_node_cluster
    args = [GAN_DIST, "submit", str(REPO / "jobs/quickstart.yaml"), "--address", dashboard, "--follow"]
    args += _job_args(s3_dataset, s3_server, mlflow_server, "two-nodes") + ["--set", "train.steps=20"]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600, env={**os.environ, "COLUMNS": "200"})
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "SUCCEEDED" in proc.stdout
    assert "step 20/20" in proc.stdout  # rank 0's progress, streamed from the job's logs
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in proc.stdout + proc.stderr


    assert _checkpoint_steps(s3_server, s3_dataset, "two-nodes")[-1] == "step-000000020"
    client = mlflow.MlflowClient(mlflow_server.uri)
    exp = client.get_experiment_by_name("multinode")
    (run,) = client.search_runs([exp.experiment_id], filter_string="tags.`gan_dist.run_name` = 'two-nodes'")
    # The two training workers ran on the two worker nodes (the head has no CPUs): counted from their node ids.
    assert run.data.params["cluster.num_nodes"] == "2" and run.data.params["cluster.world_size"] == "2"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "losses/d")] == [5, 10, 15, 20]
    assert any("samples" in a.path for a in client.list_artifacts(run.info.run_id, "images"))


def test_job_survives_losing_a_worker_node(two_node_cluster, s3_server, s3_dataset, mlflow_server):
    state, dashboard = two_node_cluster
    args = [GAN_DIST, "submit", str(REPO / "jobs/quickstart.yaml"), "--address", dashboard]
    args += _job_args(s3_dataset, s3_server, mlflow_server, "node-loss")
    args += ["--set", "train.steps=400", "--set", "train.max_failures=3", "--set", "checkpoint.async_upload=false"]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    job_id = proc.stdout.split("submitted job ")[1].split()[0]

    deadline = time.monotonic() + 300
    while not _checkpoint_steps(s3_server, s3_dataset, "node-loss"):
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.5)
    _cluster(state, "remove-worker", "2")  # SIGKILL the whole node: raylet, workers, object store
    _cluster(state, "add-worker", "--cpus-per-worker", "1")

    client = JobSubmissionClient(dashboard)
    deadline = time.monotonic() + 600
    while (status := client.get_job_status(job_id)) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
        assert time.monotonic() < deadline, "job did not finish"
        time.sleep(2)
    logs = client.get_job_logs(job_id)
    assert status == JobStatus.SUCCEEDED, logs[-4000:]
    assert "resumed run 'node-loss'" in logs
    assert _checkpoint_steps(s3_server, s3_dataset, "node-loss")[-1] == "step-000000400"

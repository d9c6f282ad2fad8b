"""End to end on a real 2-node Ray cluster (cluster/local.sh: head with 0 CPUs + 2 worker nodes, token auth on), with
real SeaweedFS S3 and a real mlflow server: shards prepared to S3, jobs submitted through the Job Submission API,
training across both nodes, checkpoints in S3, an MLflow run — and a worker node killed and replaced mid-run.

Security (docs/security.md): the nodes get the S3 credentials from their own environment (local.sh starts in this
process's, which holds the session's S3 keys); `gan-dist submit` runs with the same keys in its environment, as users
have them, and the secret must show in none of Ray's job records, actor list, job logs or session files. Without the
cluster's token, or with a wrong one, the cluster refuses jobs."""

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import mlflow
import pytest
import requests
from ray._private.authentication.authentication_constants import (
    AUTHORIZATION_BEARER_PREFIX,
    AUTHORIZATION_HEADER_NAME,
)
from ray.job_submission import JobStatus, JobSubmissionClient

from gan_dist.storage import StorageConfig
from gan_dist.data.prepare import prepare
from tests.conftest import TINY_MODEL

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parents[1]
LOCAL_SH = REPO / "cluster/local.sh"
QUICKSTART = str(REPO / "jobs/quickstart.yaml")
BIN = Path(sys.executable).parent
TERMINAL = (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED)


class LocalCluster(NamedTuple):
    state: Path
    dashboard: str

    @property
    def token_file(self) -> Path:
        return self.state / "auth_token"

    def auth(self, token: str | None = None) -> dict[str, str]:
        """Ray's HTTP auth header with this cluster's token, or with ``token``."""
        return {AUTHORIZATION_HEADER_NAME: AUTHORIZATION_BEARER_PREFIX + (token or self.token_file.read_text())}

    def client(self) -> JobSubmissionClient:
        return JobSubmissionClient(self.dashboard, headers=self.auth())


def _cluster(state: Path, *args: str, timeout: int = 600) -> str:
    # The nodes' environment is this process's: it holds the session's S3 keys (fixtures_s3.pytest_configure).
    env = {**os.environ, "RAY": str(BIN / "ray")}
    proc = subprocess.run(
        ["bash", str(LOCAL_SH), *args, "--state", str(state)], env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def _gan_dist(*args: str, timeout: int = 600, **env: str) -> subprocess.CompletedProcess:
    """`gan-dist ARGS` with no token in its environment unless ``env`` gives one; wide, so errors stay one line."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH_TOKEN")}
    env = {**base, "COLUMNS": "200", **env}
    return subprocess.run([str(BIN / "gan-dist"), *args], capture_output=True, text=True, timeout=timeout, env=env)


def _job_id(proc: subprocess.CompletedProcess) -> str | None:
    found = re.search(r"submitted job (\S+)", proc.stdout)
    return found and found[1]


@pytest.fixture(scope="module")
def two_node_cluster():
    # A short path: Ray puts sockets in STATE/ray/NODE/session_*/sockets, and AF_UNIX paths end at 107 bytes.
    state = Path(tempfile.mkdtemp(prefix="gd-", dir="/tmp"))
    try:
        for attempt in range(3):  # a port picked free can be taken by another process before a node binds it
            try:
                _cluster(state, "start", "--workers", "2", "--cpus-per-worker", "1")
                break
            except AssertionError:
                _cluster(state, "stop")
                if attempt == 2:
                    raise
        yield LocalCluster(state, (state / "dashboard").read_text().strip())
    finally:
        _cluster(state, "stop")
    shutil.rmtree(state)  # kept when the cluster did not start: its logs say why


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


def _wait_until_done(client: JobSubmissionClient, job_id: str, timeout: float) -> JobStatus:
    deadline = time.monotonic() + timeout
    while (status := client.get_job_status(job_id)) not in TERMINAL:
        assert time.monotonic() < deadline, f"job {job_id} did not finish"
        time.sleep(2)
    return status


def _what_ray_shows(cluster: LocalCluster, job_id: str) -> dict[str, str]:
    """Everything Ray returns about a job to an API client holding the token."""
    client = cluster.client()
    actors = subprocess.run(
        [str(BIN / "ray"), "list", "actors", "--detail", "--format", "json", "--address", cluster.dashboard],
        env={**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(cluster.token_file)},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert actors.returncode == 0, actors.stderr
    return {
        "get_job_info": repr(client.get_job_info(job_id)),
        "list_jobs": repr(client.list_jobs()),
        "GET /api/jobs/": requests.get(f"{cluster.dashboard}/api/jobs/", headers=cluster.auth(), timeout=30).text,
        "ray list actors --detail": actors.stdout,
        "job logs": client.get_job_logs(job_id),
    }


def _files_containing(root: Path, text: str) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and text.encode() in p.read_bytes()]


@pytest.fixture(scope="module")
def two_node_job(two_node_cluster, s3_server, s3_dataset, mlflow_server):
    """One job across both worker nodes, submitted as users do: the S3 keys in the submitter's environment."""
    assert os.environ["AWS_SECRET_ACCESS_KEY"]
    args = ["submit", QUICKSTART, "--address", two_node_cluster.dashboard, "--follow"]
    args += ["--token-file", str(two_node_cluster.token_file)]
    proc = _gan_dist(*args, *_job_args(s3_dataset, s3_server, mlflow_server, "two-nodes"), "--set", "train.steps=20")
    return proc, _job_id(proc)


def test_submitted_job_trains_across_two_nodes(two_node_job, s3_server, s3_dataset, mlflow_server):
    proc, _ = two_node_job
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "SUCCEEDED" in proc.stdout
    assert "step 20/20" in proc.stdout  # rank 0's progress, streamed from the job's logs
    assert "AWS_SECRET_ACCESS_KEY" in proc.stderr and "not sent" in proc.stderr  # the notice, naming it
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in proc.stdout + proc.stderr

    assert _checkpoint_steps(s3_server, s3_dataset, "two-nodes")[-1] == "step-000000020"
    client = mlflow.MlflowClient(mlflow_server.uri)
    exp = client.get_experiment_by_name("multinode")
    (run,) = client.search_runs([exp.experiment_id], filter_string="tags.`gan_dist.run_name` = 'two-nodes'")
    # The two training workers ran on the two worker nodes (the head has no CPUs): counted from their node ids.
    assert run.data.params["cluster.num_nodes"] == "2" and run.data.params["cluster.world_size"] == "2"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "losses/d")] == [5, 10, 15, 20]
    assert any("samples" in a.path for a in client.list_artifacts(run.info.run_id, "images"))


def test_the_s3_secret_shows_nowhere(two_node_cluster, two_node_job, s3_server, s3_dataset, mlflow_server):
    cluster, (proc, job_id) = two_node_cluster, two_node_job
    assert proc.returncode == 0, proc.stderr[-2000:]
    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    shown = _what_ray_shows(cluster, job_id)
    assert all(job_id in text for view, text in shown.items() if view != "job logs")
    assert "step 20/20" in shown["job logs"]
    assert cluster.client().get_job_info(job_id).runtime_env["env_vars"]["AWS_REGION"]  # the env a secret would be in
    assert [view for view, text in shown.items() if secret in text] == []
    assert list((cluster.state / "ray").glob("*/session_*/logs/runtime_env_agent.log")), "the session is where we look"
    assert _files_containing(cluster.state, secret) == []  # Ray's session dir (logs, job packages), node logs
    assert _files_containing(mlflow_server.root, secret) == []  # MLflow params, tags, artifacts
    s3 = s3_server.client()
    for obj in s3.list_objects_v2(Bucket=s3_dataset, Prefix="runs/two-nodes/")["Contents"]:  # checkpoints, config
        assert secret.encode() not in s3.get_object(Bucket=s3_dataset, Key=obj["Key"])["Body"].read(), obj["Key"]


def test_the_cluster_refuses_jobs_without_its_token(two_node_cluster, two_node_job, tmp_path):
    cluster, (_, job_id) = two_node_cluster, two_node_job
    job = {"entrypoint": "echo owned"}
    assert requests.post(f"{cluster.dashboard}/api/jobs/", json=job, timeout=30).status_code == 401
    wrong = cluster.auth("not-the-token")
    assert requests.post(f"{cluster.dashboard}/api/jobs/", json=job, headers=wrong, timeout=30).status_code == 403
    assert all(j.entrypoint != "echo owned" for j in cluster.client().list_jobs())

    no_token = {"HOME": str(tmp_path)}  # and no RAY_AUTH_TOKEN*: Ray's lookup finds nothing
    wrong_token = {"RAY_AUTH_TOKEN": "not-the-token"}
    for env, says in [(no_token, "requires a token and none was found"), (wrong_token, "rejected the token")]:
        proc = _gan_dist("submit", QUICKSTART, "--address", cluster.dashboard, **env)
        assert proc.returncode == 2 and says in proc.stderr and "--token-file" in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    # The token where Ray looks for it (RAY_AUTH_TOKEN_PATH) lets the same command in.
    status = _gan_dist("status", job_id, "--address", cluster.dashboard, RAY_AUTH_TOKEN_PATH=str(cluster.token_file))
    assert status.stdout.strip() == "SUCCEEDED", status.stderr


def test_forwarded_credentials_show_where_the_warning_says(two_node_cluster, s3_server, s3_dataset, mlflow_server):
    cluster, canary = two_node_cluster, "canary-" + secrets.token_hex(8)
    # A harmless credential to opt in with (the mlflow server asks for none); the S3 keys stay out of this job.
    env = {"MLFLOW_TRACKING_PASSWORD": canary, "AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": ""}
    args = ["submit", QUICKSTART, "--address", cluster.dashboard, "--token-file", str(cluster.token_file)]
    args += ["--forward-credentials", *_job_args(s3_dataset, s3_server, mlflow_server, "forwarded")]
    proc = _gan_dist(*args, **env)
    assert proc.returncode == 0 and "--forward-credentials sent MLFLOW_TRACKING_PASSWORD" in proc.stderr, proc.stderr
    assert canary not in proc.stdout + proc.stderr
    job_id = _job_id(proc)
    try:
        deadline = time.monotonic() + 120
        agent_logs = "ray/*/session_*/logs/runtime_env_agent*.log"  # STATE/ray/NODE: one temp dir per node
        while not any(canary in log.read_text() for log in cluster.state.glob(agent_logs)):
            assert time.monotonic() < deadline, "runtime_env_agent.log never showed the forwarded value"
            time.sleep(1)
        shown = _what_ray_shows(cluster, job_id)
        warned_of = ("get_job_info", "GET /api/jobs/", "ray list actors --detail")
        assert [view for view in warned_of if canary not in shown[view]] == []
    finally:
        stop = _gan_dist("stop", job_id, "--address", cluster.dashboard, "--token-file", str(cluster.token_file))
        _wait_until_done(cluster.client(), job_id, timeout=120)
    assert stop.returncode == 0 and stop.stdout.strip() in ("stopped", "not running"), stop.stderr


def _world_sizes(mlflow_server, name: str) -> list[int]:
    """The run's world size along its steps, changes only (MLflow's throughput/world_size history). Steps
    redone after a restart were logged twice: the later point is the one the run kept."""
    client = mlflow.MlflowClient(mlflow_server.uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              filter_string=f"tags.`gan_dist.run_name` = '{name}'")  # fmt: skip
    history = client.get_metric_history(runs[0].info.run_id, "throughput/world_size") if runs else []
    kept = {m.step: int(m.value) for m in sorted(history, key=lambda m: (m.step, m.timestamp))}
    sizes = [kept[step] for step in sorted(kept)]
    return [w for i, w in enumerate(sizes) if i == 0 or w != sizes[i - 1]]


def _audited_epochs(s3_server, bucket: str, name: str, steps_per_epoch: int) -> dict[int, list[str]]:
    """The sample keys of the steps the run kept, per epoch, from its data.audit records (a file per attempt,
    rank and checkpoint). A step trained by several attempts (past a checkpoint, then again after the restart
    from it) was kept by the last of them."""
    s3 = s3_server.client()
    listing = s3.list_objects_v2(Bucket=bucket, Prefix=f"runs/{name}/audit/")["Contents"]
    records: dict[int, dict[int, list[str]]] = {}  # step -> attempt -> keys of every rank
    for obj in listing:
        attempt = int(re.search(r"attempt-(\d+)-", obj["Key"])[1])
        for step, keys in json.loads(s3.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()):
            records.setdefault(step, {}).setdefault(attempt, []).extend(keys)
    epochs: dict[int, list[str]] = {}
    for step, by_attempt in records.items():
        epochs.setdefault(step // steps_per_epoch, []).extend(by_attempt[max(by_attempt)])
    return epochs


def test_elastic_job_shrinks_on_node_loss_and_grows_back(two_node_cluster, s3_server, s3_dataset, mlflow_server):
    """Elastic [1, 2] workers: a worker node is killed and not replaced, the job goes on with 1 worker and the
    same global batch from its latest checkpoint; a node is added and the job grows back to 2; it finishes.
    Within each epoch, every sample it trained on was read exactly once, across the changes of world size."""
    cluster, name = two_node_cluster, "elastic"
    args = ["submit", QUICKSTART, "--address", cluster.dashboard]
    args += _job_args(s3_dataset, s3_server, mlflow_server, name)
    args += ["--set", "train.steps=600", "--set", "train.max_failures=5", "--set", "checkpoint.async_upload=false",
             "--set", "scaling.num_workers=[1,2]", "--set", "scaling.resize_check_s=5", "--set", "data.audit=true",
             "--set", "checkpoint.every=20", "--set", "train.log_every=10"]  # fmt: skip
    proc = _gan_dist(*args, timeout=120, RAY_AUTH_TOKEN_PATH=str(cluster.token_file))
    assert proc.returncode == 0, proc.stderr
    job_id = _job_id(proc)
    client = cluster.client()

    def wait_for(what: str, condition, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert client.get_job_status(job_id) not in TERMINAL, client.get_job_logs(job_id)[-4000:]
            assert time.monotonic() < deadline, f"{what}: {client.get_job_logs(job_id)[-4000:]}"
            time.sleep(1)

    wait_for("a checkpoint at 2 workers", lambda: _checkpoint_steps(s3_server, s3_dataset, name))
    _cluster(cluster.state, "remove-worker", "2")  # SIGKILL the node; nothing replaces it
    wait_for("training on 1 worker", lambda: _world_sizes(mlflow_server, name)[-1:] == [1])
    _cluster(cluster.state, "add-worker", "--cpus-per-worker", "1")

    status = _wait_until_done(client, job_id, timeout=900)
    logs = client.get_job_logs(job_id)
    assert status == JobStatus.SUCCEEDED, logs[-4000:]
    assert _world_sizes(mlflow_server, name) == [2, 1, 2]
    assert _checkpoint_steps(s3_server, s3_dataset, name)[-1] == "step-000000600"
    steps_per_epoch, batch = 1797 // 16, 16
    epochs = _audited_epochs(s3_server, s3_dataset, name, steps_per_epoch)
    assert sorted(epochs) == list(range(600 // steps_per_epoch + 1))
    for epoch, keys in epochs.items():
        assert len(keys) == len(set(keys)), f"epoch {epoch}: a sample trained on twice"
        steps = min(steps_per_epoch, 600 - epoch * steps_per_epoch)
        assert len(keys) == steps * batch, f"epoch {epoch}: {len(keys)} samples for {steps} steps of {batch}"


def _doctor(cluster: LocalCluster, *args: str, **env: str) -> subprocess.CompletedProcess:
    """`gan-dist doctor` against the cluster's GCS, with its token where Ray looks for it unless ``env`` says else."""
    address = (cluster.state / "address").read_text().strip()
    env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(cluster.token_file), **env}  # as docs/security.md says
    return _gan_dist("doctor", *args, "--address", address, timeout=300, **env)


def _fix_lines(proc: subprocess.CompletedProcess, check: str) -> list[str]:
    """The failure lines of ``check``: '✗ NODE · CHECK: detail — fix: ...', NODE being 'IP NODE_ID[:8]'."""
    node = r"\S+ [0-9a-f]{8}( \(head\))?"
    return [line for line in proc.stdout.splitlines() if re.match(rf"✗ {node} · {check}:", line)]


def test_doctor_passes_on_the_cluster(two_node_cluster, s3_server, s3_dataset, mlflow_server):
    """Every row passes from every node (head and both workers), with the job's data, S3 checkpoint storage and
    MLflow server reached with each node's own credentials, and a real gloo all_reduce across the job's 2 workers."""
    proc = _doctor(two_node_cluster, QUICKSTART, *_job_args(s3_dataset, s3_server, mlflow_server, "doctor"))
    assert proc.returncode == 0 and "✓ every check passed" in proc.stdout, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert "✗" not in proc.stdout and "Traceback" not in proc.stdout + proc.stderr
    for check in ("checkpoint storage", "tracking server", "data ", "auth token", "gan_dist", "disk: object spilling"):
        assert proc.stdout.count(f"│ {check}") == 3, check  # one row per node: the head and two workers
    assert re.search(r"32 MB all_reduce across 2 workers: \d+\.\d+ GB/s", proc.stdout)
    assert "job vs data" in proc.stdout and "1797 images" in proc.stdout
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in proc.stdout + proc.stderr


def test_doctor_names_each_node_that_cannot_reach_store_or_tracking(two_node_cluster, s3_server, s3_dataset):
    """A store and a tracking server nobody answers at: every node fails both rows, named, with a fix; exit 1."""
    bad = ["storage.endpoint_url=http://127.0.0.1:9", f"checkpoint.storage=s3://{s3_dataset}/runs",
           "tracking.uri=http://127.0.0.1:9", "storage.retries=0"]  # fmt: skip
    proc = _doctor(two_node_cluster, *(a for item in bad for a in ("--set", item)))
    assert proc.returncode == 1 and "Traceback" not in proc.stdout + proc.stderr, proc.stdout[-6000:] + proc.stderr
    for check, fix in [("checkpoint storage", "storage.endpoint_url"), ("tracking server", "tracking.uri")]:
        lines = _fix_lines(proc, check)
        assert len(lines) == 3 and all("fix: " in line and fix in line for line in lines), (check, proc.stdout)
    assert "collective (gloo)" in proc.stdout and "✓ every check passed" not in proc.stdout


def test_doctor_refuses_a_wrong_token_in_one_line(two_node_cluster):
    proc = _doctor(two_node_cluster, RAY_AUTH_TOKEN="not-the-token")
    assert proc.returncode == 2 and "rejected the token" in proc.stderr and "RAY_AUTH_TOKEN_PATH" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr, proc.stderr


def test_doctor_fails_the_node_whose_versions_differ(two_node_cluster, tmp_path, monkeypatch):
    """A node whose Python finds another gan_dist installed (a stale dist-info first on its PYTHONPATH: what pip
    would list there) fails the gan_dist row, named, with the fix; the other nodes pass it. Last in this module: the
    extra node stays until the cluster stops."""
    stale = tmp_path / "gan_dist-0.0.9.dist-info"
    stale.mkdir()
    (stale / "METADATA").write_text("Metadata-Version: 2.1\nName: gan_dist\nVersion: 0.0.9\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))  # the environment local.sh starts the node in
    _cluster(two_node_cluster.state, "add-worker", "--cpus-per-worker", "1")
    monkeypatch.delenv("PYTHONPATH")
    proc = _doctor(two_node_cluster)
    assert proc.returncode == 1 and "Traceback" not in proc.stdout + proc.stderr, proc.stdout[-6000:] + proc.stderr
    (line,) = _fix_lines(proc, "gan_dist")
    assert "gan_dist: 0.0.9 — fix: install the same version on every node" in line and "have 0.1.0" in line
    assert "✗ 1 check(s) failed" in proc.stdout, proc.stdout  # that row only

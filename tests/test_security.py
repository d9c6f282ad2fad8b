"""What `gan-dist submit` guarantees without a cluster (docs/security.md): credentials set here never travel with a
job, a config carrying a secret is refused before anything is sent (by `gan-dist train --address` too), the token is
read only from a private file and never sent in clear text to another host, and cluster errors are one line. Also the
token a local Ray instance makes and the state directory of cluster/local.sh stay private to their user.

The end-to-end checks against a token-auth cluster (the S3 secret appears in none of Ray's job records, actor list,
job logs or session files; no token or a wrong one, no job) are in test_multinode.py, which owns the one local
multi-node cluster of the test session."""

import os
import shutil
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gan_dist import submit as jobs
from gan_dist.config import ConfigError, load_config
from gan_dist.tracking.redact import check_no_secrets

REPO = Path(__file__).resolve().parents[1]
GAN_DIST = str(Path(sys.executable).parent / "gan-dist")
QUICKSTART = REPO / "jobs/quickstart.yaml"
LOCAL_SH = REPO / "cluster/local.sh"
LEAKY_URI = "https://alice:pa55word@mlflow.example.com"
GITHUB_TOKEN = "ghp_" + "a1B2c3D4e5" * 4  # the shape GitHub gives its tokens
AWS_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"  # AWS's documented example secret access key


def _nothing_listening() -> str:
    """The address of a port nobody listens on: a submit that tried to send anything would fail to connect."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def _gan_dist(*args: str, **env: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200", **env}  # wide: rich would wrap a long line at 80 columns
    return subprocess.run([GAN_DIST, *args], env=env, capture_output=True, text=True, timeout=120)


def test_only_settings_travel_with_the_job(monkeypatch):
    for name in jobs.CREDENTIAL_ENV:
        monkeypatch.setenv(name, f"value-of-{name}")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://s3.internal:9000")
    monkeypatch.setenv("RAY_AUTH_TOKEN", "the-cluster-token")
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # forwarded, it would turn auth off for the job's own driver

    sent = jobs.job_environment()
    assert sent["AWS_ENDPOINT_URL"] == "http://s3.internal:9000" and set(sent) <= set(jobs.FORWARDED_ENV)
    assert jobs.credentials_in_environment() == jobs.CREDENTIAL_ENV

    opted_in = jobs.job_environment(forward_credentials=True)
    assert set(opted_in) == set(sent) | set(jobs.CREDENTIAL_ENV)
    assert not {"RAY_AUTH_TOKEN", "RAY_AUTH_MODE"} & set(opted_in)


def test_the_notice_names_credentials_never_their_values(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-value")
    names = jobs.credentials_in_environment()
    held, sent = jobs.credentials_notice(names, forwarded=False), jobs.credentials_notice(names, forwarded=True)
    assert "s3cr3t-value" not in held + sent
    assert "AWS_SECRET_ACCESS_KEY" in held and "not sent" in held and "docs/security.md" in held
    for place in ("GET /api/jobs/", "ray list actors --detail", "runtime_env_agent.log"):
        assert place in sent  # test_multinode checks that the value really shows in each


@pytest.mark.parametrize(
    "override, key, secret",
    [
        (f"tracking.uri={LEAKY_URI}", "tracking.uri", "pa55word"),
        ("tracking.uri=https://mlflow.example.com/?access_token=tok123", "tracking.uri", "tok123"),
        ("data.url=https://b.s3.amazonaws.com/{000..003}.tar?X-Amz-Signature=sig456", "data.url", "sig456"),
        (f"data.url=https://cdn.example.com/{GITHUB_TOKEN}/{{000..003}}.tar", "data.url", GITHUB_TOKEN),
        ("tracking.experiment=AKIAIOSFODNN7EXAMPLE", "tracking.experiment", "AKIAIOSFODNN7EXAMPLE"),
    ],
    ids=["userinfo", "query-token", "presigned", "token-in-path", "aws-key-id"],
)
def test_a_config_carrying_a_secret_is_refused_before_anything_is_sent(override, key, secret):
    # Nothing listens at the address: had submit tried to send, this would be a ClusterError, not a ConfigError.
    with pytest.raises(ConfigError) as refused:
        jobs.submit(QUICKSTART, [override], _nothing_listening())
    assert refused.value.key == key and secret not in str(refused.value)
    assert "docs/security.md" in str(refused.value)


@pytest.mark.parametrize(
    "comment",
    [
        f"# before: tracking.uri: {LEAKY_URI}",
        f"# export AWS_SECRET_ACCESS_KEY={AWS_SECRET}",
        f"# aws_secret_access_key = {AWS_SECRET}",
        "#   key id AKIAIOSFODNN7EXAMPLE",
        f"# read the shards with {GITHUB_TOKEN}",
    ],
    ids=["uri", "env-line", "credentials-file", "aws-key-id", "github-token"],
)
def test_a_credential_in_a_comment_of_the_config_file_is_refused_too(tmp_path, comment):
    config = tmp_path / "job.yaml"  # the file itself is uploaded with the job, comments included
    config.write_text(QUICKSTART.read_text() + comment + "\n")
    with pytest.raises(ConfigError) as refused:
        jobs.submit(config, [], _nothing_listening())
    assert refused.value.key == str(config)


def test_placeholders_in_comments_are_not_credentials(tmp_path):
    # What setup notes in a job file look like (as in docs/security.md): names of secrets, never their values.
    config = tmp_path / "job.yaml"
    config.write_text(QUICKSTART.read_text() + "\n".join([
        "# kubectl create secret generic gan-dist-s3 --from-file=secret_access_key=SECRET_FILE",
        "# export RAY_AUTH_TOKEN=$(kubectl get secret gan-dist -o jsonpath='{.data.auth_token}' | base64 -d)",
        "# password: <your MLflow password>, in MLFLOW_TRACKING_PASSWORD on the nodes",
        "# token_file: ~/.gan_dist/token1   access_key_file: /etc/gan/aws-2024.key   num_tokens: 12345678",
    ]) + "\n")  # fmt: skip
    check_no_secrets(load_config(config), config)


@pytest.mark.parametrize("config", sorted((REPO / "jobs").glob("*.yaml")), ids=lambda p: p.name)
def test_the_shipped_job_configs_pass_the_secret_check(config):
    check_no_secrets(load_config(config), config)


@pytest.mark.parametrize(
    "remote, env", [(["--address", "127.0.0.1:1"], {}), ([], {"RAY_ADDRESS": "127.0.0.1:1"})], ids=["address", "env"]
)
def test_train_on_a_cluster_refuses_a_secret_config_before_connecting(digits_shards, remote, env):
    # The config travels to the cluster as the trainer's argument, where any code on the cluster can read it.
    args = ["train", str(QUICKSTART), "--set", f"data.url={digits_shards}", "--set", f"tracking.uri={LEAKY_URI}"]
    proc = _gan_dist(*args, *remote, **env)
    assert proc.returncode == 2 and "config error: tracking.uri" in proc.stderr, proc.stdout + proc.stderr
    assert "pa55word" not in proc.stdout + proc.stderr and "Traceback" not in proc.stderr


def _token_file(path: Path, mode: int = 0o600, token: str = "abc123") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(token + "\n")
    path.chmod(mode)
    return path


def test_the_token_file_becomes_rays_bearer_header(tmp_path):
    token = _token_file(tmp_path / "token")
    assert jobs.auth_headers(token) == {"authorization": "Bearer abc123"}


@pytest.mark.parametrize("where", ["--token-file", "RAY_AUTH_TOKEN_PATH", "~/.ray/auth_token"])
def test_a_token_file_other_users_can_read_is_refused(tmp_path, where):
    # Whoever reads the token controls the cluster: like ssh with a private key, refuse rather than use it.
    home = tmp_path / "home"
    token = _token_file(home / ".ray/auth_token" if where.startswith("~") else tmp_path / "token", mode=0o644)
    args = ["--token-file", str(token)] if where == "--token-file" else []
    env = {"RAY_AUTH_TOKEN_PATH": str(token)} if where == "RAY_AUTH_TOKEN_PATH" else {}
    proc = _gan_dist("status", "job1", "--address", _nothing_listening(), *args, HOME=str(home), **env)
    assert proc.returncode == 2 and f"the token file {token} is open to other users" in proc.stderr, proc.stderr
    assert f"chmod 600 {token}" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "address, allow_http, refused",
    [
        ("http://10.1.2.3:8265", False, True),
        ("http://ray-head.example.com:8265", False, True),
        ("http://10.1.2.3:8265", True, False),
        ("https://10.1.2.3:8265", False, False),
        ("http://127.0.0.1:8265", False, False),
        ("http://localhost:8265", False, False),
        ("http://[::1]:8265", False, False),
    ],
)
def test_the_token_goes_in_clear_text_only_to_this_host(address, allow_http, refused):
    headers = {"authorization": "Bearer abc123"}
    if refused:
        with pytest.raises(jobs.ClusterError, match="not sending the cluster's token in clear text"):
            jobs.check_transport(address, headers, allow_http)
    else:
        jobs.check_transport(address, headers, allow_http)
    jobs.check_transport(address, {}, allow_http)  # no token, nothing to give away


def test_submit_refuses_plain_http_to_another_host_before_connecting(tmp_path):
    # 192.0.2.1 (TEST-NET-1) answers nobody: a command that tried to connect would hang, not answer at once.
    token = _token_file(tmp_path / "token")
    started = time.monotonic()
    proc = _gan_dist("submit", str(QUICKSTART), "--address", "http://192.0.2.1:8265", "--token-file", str(token))
    assert proc.returncode == 2 and "clear text" in proc.stderr and "--allow-http" in proc.stderr, proc.stderr
    assert time.monotonic() - started < 60 and len(proc.stderr.strip().splitlines()) == 1


def test_the_cli_refuses_a_secret_config_without_repeating_it():
    proc = _gan_dist("submit", str(QUICKSTART), "--set", f"tracking.uri={LEAKY_URI}", "--address", _nothing_listening())
    assert proc.returncode == 2 and "config error: tracking.uri" in proc.stderr
    assert "pa55word" not in proc.stdout + proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "args, env, says",
    [
        (["status", "job1"], {}, "cannot reach the Ray Job server"),
        (["stop", "job1", "--token-file", "/nonexistent/token"], {}, "cannot read the token file /nonexistent/token"),
        (["status", "job1"], {"RAY_AUTH_TOKEN_PATH": "/nonexistent/token"}, "RAY_AUTH_TOKEN_PATH=/nonexistent/token"),
    ],
    ids=["unreachable", "token-file", "token-path"],
)
def test_cluster_errors_are_one_line_without_traceback(args, env, says):
    proc = _gan_dist(*args, "--address", _nothing_listening(), **env)
    assert proc.returncode == 2 and says in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


def test_a_gcs_address_is_refused_in_one_line():
    # Ray's client would look the dashboard up through the GCS at such an address: slowly, ending in a traceback.
    proc = _gan_dist("status", "job1", "--address", "127.0.0.1:6379")
    assert proc.returncode == 2 and "give the dashboard's URL" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


# A local Ray instance (in its own process, with a home of its own), as `gan-dist train` without --address starts it.
START_LOCAL_RAY = """
from gan_dist.console import quiet_ray
quiet_ray(verbose=False, local=True)
import ray
from gan_dist.driver import connect
connect(None)
ray.shutdown()
"""


@pytest.mark.ray
@pytest.mark.parametrize("before", ["no token", "a readable token"])
def test_a_local_ray_instance_keeps_its_token_private(tmp_path, before):
    # Ray writes ~/.ray/auth_token with the umask (0644 under the usual 022); `gan-dist submit` later sends it.
    token = tmp_path / ".ray/auth_token"
    if before == "a readable token":
        _token_file(token, mode=0o644, token="f" * 64)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")} | {"HOME": str(tmp_path)}
    subprocess.run([sys.executable, "-c", START_LOCAL_RAY], env=env, check=True, timeout=300,
                   preexec_fn=lambda: os.umask(0o022))  # fmt: skip
    assert stat.S_IMODE(token.stat().st_mode) == 0o600
    text = token.read_text().strip()
    assert len(text) == 64 and (before == "no token" or text == "f" * 64)  # 256 random bits; a token is kept


def _local_sh(*args: str, timeout: int = 300, **env: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY": str(Path(sys.executable).parent / "ray"), **env}
    return subprocess.run(["bash", str(LOCAL_SH), *args], env=env, capture_output=True, text=True, timeout=timeout)


def _start_time(pid: int) -> str:
    """What local.sh records with a pid: the process's start time, as ps gives it."""
    return " ".join(subprocess.run(["ps", "-o", "lstart=", "-p", str(pid)], capture_output=True, text=True).stdout.split())


@pytest.fixture
def bystander():
    """A process of this user's, leading its own session as a local.sh node does, that no `stop` may kill."""
    proc = subprocess.Popen(["sleep", "300"], start_new_session=True)
    yield proc
    proc.kill()
    proc.wait()


def test_local_cluster_refuses_a_state_directory_others_can_write(tmp_path, bystander):
    # The old default, /tmp/gan_dist_local_cluster, could be made first by anyone, with pids of their choosing.
    state = tmp_path / "state"
    state.mkdir()
    (state / "pids").write_text(f"head {bystander.pid} {_start_time(bystander.pid)}\n")
    state.chmod(0o777)
    proc = _local_sh("stop", "--state", str(state))
    assert proc.returncode != 0 and "open to other users" in proc.stderr, proc.stdout + proc.stderr
    assert bystander.poll() is None


@pytest.mark.parametrize("recorded", ["", "Thu Jan 1 00:00:00 1970"], ids=["no-start-time", "another-process"])
def test_local_cluster_stop_kills_only_the_processes_it_started(tmp_path, bystander, recorded):
    # A pid whose start time is not the one recorded is a later process that got the same pid.
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    (state / "pids").write_text(f"head {bystander.pid} {recorded}".strip() + "\n")
    proc = _local_sh("stop", "--state", str(state))
    assert f"pid {bystander.pid} is not head as started here" in proc.stderr, proc.stdout + proc.stderr
    assert bystander.poll() is None
    assert str(bystander.pid) in (state / "pids").read_text()  # kept: the node it stands for may still run


@pytest.mark.ray
def test_local_cluster_state_is_private_by_default(tmp_path):
    home = tmp_path / "home"
    env = {"HOME": str(home), "XDG_CACHE_HOME": "", "TMPDIR": "/tmp"}  # /tmp: Ray's socket paths must stay short
    started = _local_sh("start", "--workers", "0", **env)
    state = Path(_local_sh("dir", **env).stdout.strip())
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        assert (home / ".cache/gan_dist/local-cluster").read_text().strip() == str(state)
        assert state.parent == Path("/tmp") and state.name != "gan_dist_local_cluster"  # not a name others can take
        info = state.stat()
        assert stat.S_IMODE(info.st_mode) == 0o700 and info.st_uid == os.getuid()
        assert stat.S_IMODE((state / "auth_token").stat().st_mode) == 0o600
        head = int((state / "pids").read_text().split()[1])
        stopped = _local_sh("stop", **env)
        assert stopped.returncode == 0 and "stopped head" in stopped.stdout, stopped.stdout + stopped.stderr
        deadline = time.monotonic() + 30
        while _start_time(head) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not _start_time(head), "stop kills the head it started"
    finally:
        _local_sh("stop", **env)
        if state.parent == Path("/tmp") and state.name.startswith("gan-dist."):  # only what start made
            shutil.rmtree(state)

"""What `gan-dist submit` guarantees without a cluster (docs/security.md): credentials set here never travel with a
job, a config carrying a secret is refused before anything is sent, and cluster errors are one line.

The end-to-end checks against a token-auth cluster (the S3 secret appears in none of Ray's job records, actor list,
job logs or session files; no token or a wrong one, no job) are in test_multinode.py, which owns the one local
multi-node cluster of the test session."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from gan_dist import submit as jobs
from gan_dist.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]
GAN_DIST = str(Path(sys.executable).parent / "gan-dist")
QUICKSTART = REPO / "jobs/quickstart.yaml"
LEAKY_URI = "https://alice:pa55word@mlflow.example.com"


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
    ],
)
def test_a_config_carrying_a_secret_is_refused_before_anything_is_sent(override, key, secret):
    # Nothing listens at the address: had submit tried to send, this would be a ClusterError, not a ConfigError.
    with pytest.raises(ConfigError) as refused:
        jobs.submit(QUICKSTART, [override], _nothing_listening())
    assert refused.value.key == key and secret not in str(refused.value)
    assert "docs/security.md" in str(refused.value)


def test_a_credential_in_a_comment_of_the_config_file_is_refused_too(tmp_path):
    config = tmp_path / "job.yaml"  # the file itself is uploaded with the job, comments included
    config.write_text(QUICKSTART.read_text() + f"# before: tracking.uri: {LEAKY_URI}\n")
    with pytest.raises(ConfigError) as refused:
        jobs.submit(config, [], _nothing_listening())
    assert refused.value.key == str(config)


@pytest.mark.parametrize("config", sorted((REPO / "jobs").glob("*.yaml")), ids=lambda p: p.name)
def test_the_shipped_job_configs_pass_the_secret_check(config):
    jobs.check_no_secrets(load_config(config), config)


def test_the_token_file_becomes_rays_bearer_header(tmp_path):
    (tmp_path / "token").write_text("abc123\n")
    assert jobs.auth_headers(tmp_path / "token") == {"authorization": "Bearer abc123"}


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

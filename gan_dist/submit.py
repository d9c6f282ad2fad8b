"""Submit a training job to a Ray cluster through Ray's Job Submission API, authenticated with the cluster's token.

What is guaranteed:

- No credential leaves this process. Ray keeps a job's runtime env, entrypoint, metadata and working_dir package
  in plain text in the GCS, returns them to every API client (job info, ``GET /api/jobs/``, ``ray list actors
  --detail``) and logs the runtime env on the nodes (``runtime_env_agent.log``). So the S3 and MLflow credentials
  set where ``gan-dist submit`` runs are not sent: the cluster's nodes have their own (a Kubernetes Secret, an
  instance role or workload identity, the environment ``cluster/local.sh`` starts in, a mounted credentials
  file). Only non-secret settings (endpoints, regions) travel with the job. ``forward_credentials=True`` is the
  explicit opt-in for a private single-user cluster; ``credentials_notice`` says where the values then show.
- A config that carries a secret in a value or in its file (``user:password@`` in a URI, a secret-looking query
  parameter, a credential-shaped value, a ``password: ...`` comment: what ``gan_dist.tracking.redact`` would hide)
  is refused before anything is sent.
- Every request carries the cluster's token: from ``token_file`` if given, else from where Ray looks for it
  (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token). A token file other users may open is refused, as ssh
  refuses such a key; so is sending the token in clear text (http://) to a host other than this one, unless
  ``allow_http``. An unreachable cluster, a missing or wrong token and an error answer of the Job server each raise
  one ``ClusterError`` whose message is one line.

The run name is fixed at submit time so that a retried job (KubeRay's backoffLimit, a resubmission) continues the
same run from its latest checkpoint instead of starting over.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import shlex
import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

import aiohttp
import requests
from ray._private.authentication.authentication_constants import (
    AUTHORIZATION_BEARER_PREFIX,
    AUTHORIZATION_HEADER_NAME,
)
from ray._raylet import AuthenticationTokenLoader
from ray.exceptions import AuthenticationError
from ray.job_submission import JobStatus, JobSubmissionClient

import gan_dist
from gan_dist.config import load_config
from gan_dist.tracking.redact import check_no_secrets

# Settings forwarded to the job when set where `gan-dist submit` runs: none of them is a secret.
FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION", "MLFLOW_S3_ENDPOINT_URL")
# Credentials: the cluster provides its own; sent only with forward_credentials.
CREDENTIAL_ENV = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
)
CONFIG_NAME = "job.yaml"
SPACE_NAME = "space.yaml"
TOKEN_HELP = "pass --token-file FILE or set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH (see docs/security.md)"


class ClusterError(Exception):
    """The Job server could not be reached, refused the token, or answered an error; the message is one line."""


def credentials_in_environment() -> tuple[str, ...]:
    """The credential variables set here (names only)."""
    return tuple(name for name in CREDENTIAL_ENV if os.environ.get(name))


def job_environment(forward_credentials: bool = False) -> dict[str, str]:
    """The variables the job gets from here: non-secret settings, plus the credentials only on opt-in."""
    names = FORWARDED_ENV + (CREDENTIAL_ENV if forward_credentials else ())
    return {name: os.environ[name] for name in names if os.environ.get(name)}


def credentials_notice(names: Sequence[str], forwarded: bool) -> str:
    """What happened to the credential variables ``names`` (never their values), and where they live instead."""
    listed = ", ".join(names)
    if forwarded:
        return (
            f"warning: --forward-credentials sent {listed} to the cluster in plain text; anyone with the cluster "
            "token can read them in the job info API (ray job list, GET /api/jobs/), the actor list (ray list "
            "actors --detail) and runtime_env_agent.log on the nodes"
        )
    return (
        f"note: {listed} not sent to the cluster (Ray stores a job's environment in plain text); its nodes use "
        "their own: a Kubernetes Secret, an instance role, or the environment cluster/local.sh starts in "
        "(docs/security.md)"
    )


def auth_headers(token_file: Path | None = None) -> dict[str, str]:
    """Ray's HTTP auth header carrying the cluster's token; empty when no token is found."""
    if token_file is not None:
        try:
            _check_private(Path(token_file))
            token = Path(token_file).read_text().strip()  # Ray strips token files the same way
        except OSError as exc:
            raise ClusterError(f"cannot read the token file {token_file}: {exc.strerror}") from None
        if not token:
            raise ClusterError(f"the token file {token_file} is empty")
        return {AUTHORIZATION_HEADER_NAME: AUTHORIZATION_BEARER_PREFIX + token}
    if not os.environ.get("RAY_AUTH_TOKEN"):  # else the token comes from no file
        path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
        if path.is_file():
            _check_private(path)
    try:
        # Ray's own lookup: RAY_AUTH_TOKEN, then RAY_AUTH_TOKEN_PATH, then ~/.ray/auth_token. RAY_AUTH_MODE here is
        # ignored on purpose: the cluster, not this process, decides whether the token is needed.
        return AuthenticationTokenLoader.instance().get_token_for_http_header(ignore_auth_mode=True)
    except AuthenticationError:  # raised only when RAY_AUTH_TOKEN_PATH names a missing or empty file
        path = os.environ.get("RAY_AUTH_TOKEN_PATH")
        raise ClusterError(f"cannot read the token file RAY_AUTH_TOKEN_PATH={path} (missing or empty)") from None


def _check_private(path: Path) -> None:
    """Whoever reads the token controls the cluster: refuse a token file other users may open (as ssh does a key)."""
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise ClusterError(f"the token file {path} is open to other users (mode {mode:o}): chmod 600 {path}")


def check_transport(address: str, headers: dict[str, str], allow_http: bool = False) -> None:
    """Refuse to send the token in clear text (http://) to another host: anyone on the way could take it, and with
    it the cluster. This host (a `ray dashboard`, `kubectl port-forward` or `ssh -L` tunnel) is fine."""
    url = urlparse(address)
    if url.scheme != "http" or not headers or allow_http or _is_loopback(url.hostname or ""):
        return
    raise ClusterError(
        f"not sending the cluster's token in clear text to {address}: use https://, a tunnel to 127.0.0.1 "
        "(ray dashboard, kubectl port-forward, ssh -L), or --allow-http on a network you trust (docs/security.md)"
    )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name other than localhost: it may resolve anywhere
        return False


@contextmanager
def job_server(
    address: str, token_file: Path | None = None, allow_http: bool = False
) -> Iterator[JobSubmissionClient]:
    """An authenticated client of the cluster's Job server; any failure to use it becomes one ``ClusterError``."""
    if not address.startswith(("http://", "https://")):  # Ray would look the dashboard up through the GCS instead
        raise ClusterError(f"--address {address}: give the dashboard's URL, e.g. http://127.0.0.1:8265")
    headers = auth_headers(token_file)
    check_transport(address, headers, allow_http)
    try:
        yield JobSubmissionClient(address, headers=headers)
    except AuthenticationError:  # Ray's client raises it on 401 (no token) and 403 (wrong token)
        problem = "rejected the token (not this cluster's)" if headers else "requires a token and none was found"
        raise ClusterError(f"the Ray cluster at {address} {problem}: {TOKEN_HELP}") from None
    except (ConnectionError, requests.RequestException, aiohttp.ClientError):
        raise ClusterError(
            f"cannot reach the Ray Job server at {address}: is the cluster up and is this its dashboard address "
            "(http://HOST:8265, or a port-forward to it)?"
        ) from None
    except RuntimeError as exc:  # how Ray's client reports an error answer, e.g. an unknown job id
        raise ClusterError(str(exc).strip().splitlines()[0]) from None


def submit(
    config_path: str | Path,
    overrides: list[str],
    address: str,
    job_id: str | None = None,
    token_file: Path | None = None,
    forward_credentials: bool = False,
    allow_http: bool = False,
    space_path: str | Path | None = None,
) -> tuple[str, str]:
    """Validate the config here, then submit it (with ``space_path``: as ``gan-dist sweep``, the SPACE checked by
    the caller); returns (job id, run name)."""
    cfg = load_config(config_path, overrides)  # fail before anything reaches the cluster
    check_no_secrets(cfg, Path(config_path))
    named = any(item.strip().startswith("run.name=") for item in overrides)
    pinned = list(overrides) if named else [*overrides, f"run.name={cfg.run.name}"]
    workdir = Path(tempfile.mkdtemp(prefix="gan_dist_job_"))
    try:
        shutil.copyfile(config_path, workdir / CONFIG_NAME)
        command = f"sweep {CONFIG_NAME} {SPACE_NAME}" if space_path else f"train {CONFIG_NAME}"
        if space_path:
            shutil.copyfile(space_path, workdir / SPACE_NAME)
        args = " ".join(f"--set {shlex.quote(item)}" for item in pinned)
        with job_server(address, token_file, allow_http) as client:
            submitted = client.submit_job(
                entrypoint=f"python -m gan_dist {command} {args}",
                submission_id=job_id,
                runtime_env={
                    "working_dir": str(workdir),
                    "py_modules": [str(Path(gan_dist.__file__).parent)],
                    "env_vars": job_environment(forward_credentials),
                },
                metadata={"gan_dist_run": cfg.run.name},
            )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return submitted, cfg.run.name


def follow(
    job_id: str, address: str, token_file: Path | None = None, allow_http: bool = False
) -> JobStatus | None:
    """Stream the job's log to stdout until it ends; returns its final status, or None on Ctrl-C (the job goes on).

    The log is the job driver's own console: ``gan-dist train`` there has no terminal, so it prints plain
    progress lines, with Ray's internal lines already filtered out (``gan_dist.console.quiet_ray``)."""
    with job_server(address, token_file, allow_http) as client:

        async def tail() -> None:
            async for lines in client.tail_job_logs(job_id):
                sys.stdout.write(lines)
                sys.stdout.flush()

        try:
            asyncio.run(tail())
        except KeyboardInterrupt:
            return None
        return client.get_job_status(job_id)


def status(job_id: str, address: str, token_file: Path | None = None, allow_http: bool = False) -> JobStatus:
    with job_server(address, token_file, allow_http) as client:
        return client.get_job_status(job_id)


def stop(job_id: str, address: str, token_file: Path | None = None, allow_http: bool = False) -> bool:
    with job_server(address, token_file, allow_http) as client:
        return client.stop_job(job_id)

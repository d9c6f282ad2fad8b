"""Submit a training job to a Ray cluster through Ray's Job Submission API.

The job's working dir holds the user's config file; the gan_dist package travels as a ``py_module``; S3
and MLflow credentials travel as environment variables of the job (never printed or logged). The run
name is fixed at submit time so that a retried job (KubeRay's backoffLimit, a resubmission) continues the
same run from its latest checkpoint instead of starting over.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import shutil
import sys
import tempfile
from pathlib import Path

from ray.job_submission import JobStatus, JobSubmissionClient

import gan_dist
from gan_dist.config import load_config

# Forwarded to the job when set where `gan-dist submit` runs. Values never leave this process otherwise.
FORWARDED_ENV = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_ENDPOINT_URL",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_S3_ENDPOINT_URL",
    "RAY_AUTH_MODE",
)
CONFIG_NAME = "job.yaml"
TERMINAL = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}


def job_environment() -> dict[str, str]:
    return {name: os.environ[name] for name in FORWARDED_ENV if os.environ.get(name)}


def submit(config_path: str | Path, overrides: list[str], address: str, job_id: str | None = None) -> tuple[str, str]:
    """Validate the config here, then submit it; returns (job id, run name)."""
    cfg = load_config(config_path, overrides)  # fail before anything reaches the cluster
    named = any(item.strip().startswith("run.name=") for item in overrides)
    pinned = list(overrides) if named else [*overrides, f"run.name={cfg.run.name}"]
    workdir = Path(tempfile.mkdtemp(prefix="gan_dist_job_"))
    try:
        shutil.copyfile(config_path, workdir / CONFIG_NAME)
        args = " ".join(f"--set {shlex.quote(item)}" for item in pinned)
        client = JobSubmissionClient(address)
        submitted = client.submit_job(
            entrypoint=f"python -m gan_dist train {CONFIG_NAME} {args}",
            submission_id=job_id,
            runtime_env={
                "working_dir": str(workdir),
                "py_modules": [str(Path(gan_dist.__file__).parent)],
                "env_vars": job_environment(),
            },
            metadata={"gan_dist_run": cfg.run.name},
        )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return submitted, cfg.run.name


def follow(job_id: str, address: str) -> JobStatus:
    """Stream the job's logs to stdout until it ends; returns its final status."""
    client = JobSubmissionClient(address)

    async def tail() -> None:
        async for lines in client.tail_job_logs(job_id):
            sys.stdout.write(lines)
            sys.stdout.flush()

    asyncio.run(tail())
    return client.get_job_status(job_id)


def status(job_id: str, address: str) -> JobStatus:
    return JobSubmissionClient(address).get_job_status(job_id)


def stop(job_id: str, address: str) -> bool:
    return JobSubmissionClient(address).stop_job(job_id)

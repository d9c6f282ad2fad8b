"""``gan-dist``: prepare datasets and train GANs on Ray."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from gan_dist.config import ConfigError, load_config

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
err = Console(stderr=True)
out = Console(soft_wrap=True)


def _fail(kind: str, message: str, code: int = 2) -> None:
    err.print(f"[bold red]{kind}:[/] {message}", highlight=False)
    raise typer.Exit(code)


@app.command()
def prepare(
    source: str = typer.Argument(..., help="Image folder, MNIST idx file/folder, or 'sklearn:digits'"),
    out_dir: str = typer.Argument(..., metavar="OUT", help="Output directory or s3://bucket/prefix"),
    resolution: int = typer.Option(32, help="Square output size in pixels"),
    channels: int = typer.Option(1, help="1 (grayscale) or 3 (RGB)"),
    samples_per_shard: int = typer.Option(1000, help="Samples per tar shard"),
    image_format: str = typer.Option("png", "--format", help="png (lossless) or jpeg"),
    jpeg_quality: int = typer.Option(95, help="JPEG quality when --format jpeg"),
    resize_filter: str = typer.Option("lanczos", "--filter", help="lanczos or box (the filter changes FID)"),
    flip: bool = typer.Option(False, help="Also store a horizontally flipped copy of every image"),
    crop: str = typer.Option("center", help="center (square) or wide (StyleGAN's wide crop, letterboxed)"),
    labels_csv: Optional[str] = typer.Option(None, help="CSV of filename,label for a folder source"),
    processes: int = typer.Option(1, help="Processes writing shards in parallel"),
    endpoint_url: Optional[str] = typer.Option(None, help="S3 endpoint for s3:// OUT (default $AWS_ENDPOINT_URL)"),
) -> None:
    """Write WebDataset shards and a manifest from an image source."""
    from gan_dist.storage import StorageConfig
    from gan_dist.data.prepare import prepare as run_prepare

    if channels not in (1, 3):
        _fail("error", "--channels must be 1 or 3")
    try:
        manifest = run_prepare(
            source,
            out_dir,
            resolution=resolution,
            channels=channels,
            samples_per_shard=samples_per_shard,
            image_format=image_format,
            jpeg_quality=jpeg_quality,
            resize_filter=resize_filter,
            flip_duplicate=flip,
            crop=crop,
            labels_csv=labels_csv,
            processes=processes,
            storage=StorageConfig(endpoint_url=endpoint_url),
        )
    except (ValueError, OSError) as exc:
        _fail("error", str(exc))
    out.print(
        f"wrote {manifest.num_samples} samples in {len(manifest.shards)} shards to {out_dir} "
        f"({len(manifest.skipped)} inputs skipped)"
    )


@app.command()
def train(
    config: Path = typer.Argument(..., help="Job config YAML (see jobs/)"),
    overrides: Optional[list[str]] = typer.Option(None, "--set", help="Override: section.key=value (repeatable)"),
    address: Optional[str] = typer.Option(None, help="Ray cluster address; default: a local Ray instance"),
    resume: Optional[str] = typer.Option(
        None, help="Start from this checkpoint (path or s3:// URI), e.g. to fine-tune into a new run.name"
    ),
) -> None:
    """Train a GAN on a Ray worker group; re-running with the same run.name continues that run."""
    items = list(overrides or []) + ([f"checkpoint.resume_from={resume}"] if resume else [])
    try:
        cfg = load_config(config, items)
        from gan_dist.driver import preflight, run_training
        from gan_dist.train.phases import NonFiniteLoss

        preflight(cfg)
    except (ConfigError, ValueError) as exc:
        _fail("config error", str(exc))
    out.print(
        f"run [bold]{cfg.run.name}[/]: {cfg.model.arch} / {cfg.loss.name}, {cfg.scaling.num_workers} workers, "
        f"{cfg.train.steps} steps, global batch {cfg.train.batch_size}"
    )
    try:
        outcome = run_training(cfg, address)
    except NonFiniteLoss as exc:
        _fail("training stopped", str(exc), code=1)
    out.print(f"[green]done[/] at step {outcome.final_step}")
    out.print(f"checkpoint: {outcome.checkpoint_path}")
    out.print(f"MLflow run: {outcome.mlflow_run_id} in {outcome.tracking_uri}")
    out.print(f"view it:    mlflow ui --backend-store-uri {outcome.tracking_uri}")


@app.command()
def export(
    checkpoint: Path = typer.Argument(..., help="Checkpoint directory (contains state.pt)"),
    out_file: Path = typer.Argument(..., metavar="OUT", help="Generator file to write, e.g. generator.pt"),
) -> None:
    """Write the EMA generator alone (weights + architecture), small enough to serve."""
    from gan_dist.models.io import CheckpointError, export_generator

    try:
        path = export_generator(checkpoint, out_file)
    except CheckpointError as exc:
        _fail("error", str(exc))
    out.print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")


@app.command()
def submit(
    config: Path = typer.Argument(..., help="Job config YAML"),
    overrides: Optional[list[str]] = typer.Option(None, "--set", help="Override: section.key=value (repeatable)"),
    address: str = typer.Option(..., help="Ray dashboard address, e.g. http://HEAD:8265"),
    job_id: Optional[str] = typer.Option(None, help="Submission id (default: generated)"),
    follow: bool = typer.Option(False, "--follow", help="Stream logs until the job ends; exit code = job result"),
) -> None:
    """Submit a training job to a Ray cluster (Job Submission API); prints the job id."""
    from gan_dist import submit as jobs

    try:
        submitted, run_name = jobs.submit(config, overrides or [], address, job_id)
    except (ConfigError, ValueError) as exc:
        _fail("config error", str(exc))
    except ConnectionError as exc:
        _fail("error", f"cannot reach the Ray cluster at {address}: {exc}")
    out.print(f"submitted job {submitted} (run {run_name})")
    if follow:
        final = jobs.follow(submitted, address)
        out.print(f"job {submitted}: {final.value}")
        raise typer.Exit(0 if final.value == "SUCCEEDED" else 1)


@app.command()
def status(
    job_id: str = typer.Argument(...), address: str = typer.Option(..., help="Ray dashboard address")
) -> None:
    """Print a submitted job's status."""
    from gan_dist import submit as jobs

    out.print(jobs.status(job_id, address).value)


@app.command()
def stop(job_id: str = typer.Argument(...), address: str = typer.Option(..., help="Ray dashboard address")) -> None:
    """Stop a submitted job (its run can be continued later by name)."""
    from gan_dist import submit as jobs

    out.print("stopped" if jobs.stop(job_id, address) else "not running")


@app.command()
def inspect(
    url: str = typer.Argument(..., help="Dataset directory, brace pattern or s3://bucket/prefix"),
    grid: Optional[str] = typer.Option("samples.png", help="Write a PNG grid of samples here ('' to skip)"),
    num: int = typer.Option(64, help="Samples in the grid"),
    endpoint_url: Optional[str] = typer.Option(None, help="S3 endpoint (default $AWS_ENDPOINT_URL)"),
) -> None:
    """Print a dataset's manifest summary and write a grid of its samples."""
    from gan_dist.storage import StorageConfig
    from gan_dist.data.inspect import inspect_dataset

    try:
        out.print(inspect_dataset(url, StorageConfig(endpoint_url=endpoint_url), grid or None, num), highlight=False)
    except (ValueError, OSError) as exc:
        _fail("error", str(exc))


@app.command()
def evaluate(
    source: str = typer.Argument(..., help="Checkpoint directory or exported generator file"),
    data: str = typer.Option(..., "--data", help="Real dataset URL (as data.url)"),
    num_images: int = typer.Option(2000, help="Real and generated images"),
    overrides: Optional[list[str]] = typer.Option(None, "--set", help="eval.* / storage.* overrides"),
    device: str = typer.Option("cpu", help="cpu or cuda"),
    cache_dir: Optional[str] = typer.Option(None, help="Real-statistics cache (default ~/.cache/gan_dist)"),
    seed: int = typer.Option(0),
) -> None:
    """FID, KID, IS and precision/recall of a generator against real data."""
    from gan_dist.config import build_config
    from gan_dist.evaluate import evaluate as run_evaluate
    from gan_dist.models.io import CheckpointError

    try:
        cfg = build_config({"data": {"url": data}}, overrides or [])
        scores = run_evaluate(source, data, cfg.eval, cfg.storage, num_images, device, cache_dir, seed)
    except (ConfigError, CheckpointError, ValueError, OSError) as exc:
        _fail("error", str(exc))
    for key, value in scores.items():
        out.print(f"{key:12s} {value:.6g}")


@app.command()
def sample(
    source: str = typer.Argument(..., help="Checkpoint directory or exported generator file"),
    num: int = typer.Option(64, help="Images to write"),
    out_dir: Path = typer.Option(Path("samples"), "--out", help="Output directory"),
    seed: int = typer.Option(0),
    batch_size: int = typer.Option(64),
    interpolate: int = typer.Option(0, help="Also write a latent interpolation strip with K frames per row"),
) -> None:
    """Write PNG samples and a grid (and an interpolation strip) from a generator."""
    from gan_dist.sample import write_samples
    from gan_dist.models.io import CheckpointError

    try:
        paths = write_samples(source, num, out_dir, seed=seed, batch_size=batch_size, interpolate=interpolate)
    except (CheckpointError, ValueError, OSError) as exc:
        _fail("error", str(exc))
    out.print(f"wrote {len(paths)} files to {out_dir}")

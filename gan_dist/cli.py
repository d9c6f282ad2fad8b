"""``gan-dist``: prepare datasets and train GANs on Ray."""

from __future__ import annotations

import faulthandler
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer
from rich.console import Console
from rich.markup import escape

from gan_dist.config import ConfigError, load_config

if TYPE_CHECKING:  # imported lazily, per command
    from gan_dist.config import GanConfig
    from gan_dist.console import RunConsole
    from gan_dist.driver import TrainingOutcome

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
err = Console(stderr=True, soft_wrap=True)
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
    shuffle: bool = typer.Option(
        True, "--shuffle/--no-shuffle", help="Write inputs in a seeded random order (every shard a random sample)"
    ),
    endpoint_url: Optional[str] = typer.Option(None, help="S3 endpoint for s3:// OUT (default $AWS_ENDPOINT_URL)"),
) -> None:
    """Write WebDataset shards and a manifest from an image source."""
    from gan_dist.storage import StorageConfig
    from gan_dist.data.prepare import prepare as run_prepare

    if channels not in (1, 3):
        _fail("error", "--channels must be 1 or 3")
    out.print(f"preparing {escape(source)} -> {escape(out_dir)}: {resolution}px, {channels} channel(s), "
              f"{samples_per_shard} images per shard, {image_format}", highlight=False)  # fmt: skip
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
            shuffle=shuffle,
            storage=StorageConfig(endpoint_url=endpoint_url),
            progress=err.is_terminal,  # a bar on a terminal; in a log, the lines around it say enough
        )
    except (ValueError, OSError) as exc:
        _fail("error", escape(str(exc)))
    out.print(
        f"[green]✓[/] wrote {manifest.num_samples} samples in {len(manifest.shards)} shards to {escape(out_dir)} "
        f"({len(manifest.skipped)} inputs skipped)\n  next: gan-dist inspect {escape(out_dir)}  ·  "
        f"gan-dist train jobs/quickstart.yaml --set data.url={escape(out_dir)}", highlight=False,
    )


@app.command()
def train(
    config: Path = typer.Argument(..., help="Job config YAML (see jobs/)"),
    overrides: Optional[list[str]] = typer.Option(None, "--set", help="Override: section.key=value (repeatable)"),
    address: Optional[str] = typer.Option(None, help="Ray cluster address; default: a local Ray instance"),
    resume: Optional[str] = typer.Option(
        None, help="Start from this checkpoint (path or s3:// URI), e.g. to fine-tune into a new run.name"
    ),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Also show everything Ray prints"),
) -> None:
    """Train a GAN on a Ray worker group; re-running with the same run.name continues that run.

    Ctrl-C once: checkpoint the current step and stop (continue later with the same run.name); twice: stop now."""
    from gan_dist.console import RunConsole, quiet_ray

    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1 <pid>`: where a stuck command is
    quiet_ray(verbose, local=address is None and not os.environ.get("RAY_ADDRESS"))  # before Ray is imported
    items = list(overrides or []) + ([f"checkpoint.resume_from={resume}"] if resume else [])
    try:
        cfg = load_config(config, items)
        from gan_dist.driver import preflight

        plan = preflight(cfg, address)
    except (ConfigError, ValueError) as exc:
        _fail("config error", escape(str(exc)))
    command = ["train", str(config), *(a for item in items for a in ("--set", item)),
               *(["--address", address] if address else [])]  # fmt: skip
    view = RunConsole(cfg, out, verbose, command)
    view.header(address, data=f"{sum(plan.counts)} images in {len(plan.shards)} shards")
    outcome = _run_watched(cfg, address, view, verbose)
    view.summary(outcome, _run_links(outcome))
    if outcome.stopped:
        raise typer.Exit(130)  # stopped by the user (Ctrl-C) before train.steps, as a shell's interrupted command


def _run_links(outcome: TrainingOutcome, timeout_s: float = 20.0) -> dict[str, str]:
    """The MLflow links for the summary, or none if the store does not answer in time: a tracking server that
    went away must not hold up the end of a finished run (MLflow's client retries for minutes)."""
    from gan_dist.tracking.info import run_links

    links: dict[str, str] = {}
    reader = threading.Thread(target=lambda: links.update(run_links(outcome.tracking_uri, outcome.mlflow_run_id)),
                              name="gan_dist-links", daemon=True)  # fmt: skip
    reader.start()
    reader.join(timeout_s)
    return dict(links) if not reader.is_alive() else {}


def _run_watched(cfg: GanConfig, address: Optional[str], view: RunConsole, verbose: bool) -> TrainingOutcome:
    """``run_training`` with the console's live view; problems the user can fix end as one message + hint."""
    import ray.train

    from gan_dist.console import explain_failure
    from gan_dist.driver import RunError, run_training
    from gan_dist.tracking.info import end_if_running

    try:
        with view.live():
            return run_training(cfg, address, view, verbose)
    except RunError as exc:
        view.failure(exc.what, exc.message, exc.hint, exc.log_path)
    except ray.train.TrainingFailedError as exc:
        view.failure(*explain_failure(exc), log_path=getattr(exc, "gan_dist_log", None))
        end_if_running(cfg.tracking.uri, view.state.mlflow_run_id, "FAILED")
    except KeyboardInterrupt:
        view.failure("stopped at once", "the latest checkpoint is kept",
                     f"continue with: {view.continue_command(cfg.run.name, more_steps=False)}")  # fmt: skip
        end_if_running(cfg.tracking.uri, view.state.mlflow_run_id, "KILLED")
        raise typer.Exit(130)
    except Exception as exc:
        from gan_dist.train.phases import NonFiniteLoss  # the training stack: imported once a run went wrong

        if not isinstance(exc, NonFiniteLoss):
            raise
        view.failure("training stopped", str(exc))
    raise typer.Exit(1)


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


TOKEN_FILE_HELP = "File holding the cluster's token (default: $RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token)"
ALLOW_HTTP_HELP = "Send the token over plain http:// to a host other than this one (a network you trust only)"


@contextmanager
def _cluster_errors() -> Iterator[None]:
    """An unreachable cluster, a missing or wrong token, an error answer: one line on stderr, exit code 2."""
    from gan_dist.submit import ClusterError

    try:
        yield
    except ClusterError as exc:
        _fail("error", escape(str(exc)))


@app.command()
def submit(
    config: Path = typer.Argument(..., help="Job config YAML"),
    overrides: Optional[list[str]] = typer.Option(None, "--set", help="Override: section.key=value (repeatable)"),
    address: str = typer.Option(..., help="Ray dashboard address, e.g. http://127.0.0.1:8265 (a tunnel to the head)"),
    job_id: Optional[str] = typer.Option(None, help="Submission id (default: generated)"),
    follow: bool = typer.Option(False, "--follow", help="Stream logs until the job ends; exit code = job result"),
    token_file: Optional[Path] = typer.Option(None, help=TOKEN_FILE_HELP),
    allow_http: bool = typer.Option(False, "--allow-http", help=ALLOW_HTTP_HELP),
    forward_credentials: bool = typer.Option(
        False,
        "--forward-credentials",
        help="Also send the S3/MLflow credentials set here; Ray stores them in plain text (private clusters only)",
    ),
) -> None:
    """Submit a training job to a Ray cluster (Job Submission API); prints the job id.

    Credentials are not sent: the cluster's nodes have their own (docs/security.md)."""
    from gan_dist import submit as jobs

    try:
        with _cluster_errors():
            submitted, run_name = jobs.submit(config, overrides or [], address, job_id, token_file, forward_credentials,
                                             allow_http)
    except (ConfigError, ValueError) as exc:
        _fail("config error", str(exc))
    out.print(f"submitted job {submitted} (run {run_name})")
    if credentials := jobs.credentials_in_environment():
        err.print(jobs.credentials_notice(credentials, forward_credentials), highlight=False)
    if follow:
        out.print(f"following job {submitted}'s log (Ctrl-C stops following, not the job):", highlight=False)
        with _cluster_errors():
            final = jobs.follow(submitted, address, token_file, allow_http)
        if final is None:
            out.print(f"stopped following; the job goes on: gan-dist status {submitted} / gan-dist stop {submitted} "
                      f"--address {address}", highlight=False)  # fmt: skip
            raise typer.Exit(130)
        mark = "[green]✓[/]" if final.value == "SUCCEEDED" else "[red]✗[/]"
        out.print(f"{mark} job {submitted}: {final.value}", highlight=False)
        raise typer.Exit(0 if final.value == "SUCCEEDED" else 1)


@app.command()
def status(
    job_id: str = typer.Argument(...),
    address: str = typer.Option(..., help="Ray dashboard address"),
    token_file: Optional[Path] = typer.Option(None, help=TOKEN_FILE_HELP),
    allow_http: bool = typer.Option(False, "--allow-http", help=ALLOW_HTTP_HELP),
) -> None:
    """Print a submitted job's status."""
    from gan_dist import submit as jobs

    with _cluster_errors():
        out.print(jobs.status(job_id, address, token_file, allow_http).value)


@app.command()
def stop(
    job_id: str = typer.Argument(...),
    address: str = typer.Option(..., help="Ray dashboard address"),
    token_file: Optional[Path] = typer.Option(None, help=TOKEN_FILE_HELP),
    allow_http: bool = typer.Option(False, "--allow-http", help=ALLOW_HTTP_HELP),
) -> None:
    """Stop a submitted job (its run can be continued later by name)."""
    from gan_dist import submit as jobs

    with _cluster_errors():
        out.print("stopped" if jobs.stop(job_id, address, token_file, allow_http) else "not running")


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
    from gan_dist.metrics.runner import extractor_identity
    from gan_dist.models.io import CheckpointError

    try:
        cfg = build_config({"data": {"url": data}}, overrides or [])
        out.print(f"evaluating {escape(source)} against {escape(data)}: {num_images} real and {num_images} generated "
                  f"images, {cfg.eval.extractor} features, on {device}", highlight=False)  # fmt: skip
        scores = run_evaluate(source, data, cfg.eval, cfg.storage, num_images, device, cache_dir, seed,
                              progress=err.is_terminal)  # fmt: skip
        identity = extractor_identity(cfg.eval)
    except (ConfigError, CheckpointError, ValueError, OSError) as exc:
        _fail("error", escape(str(exc)))
    for key, value in scores.items():
        out.print(f"  {key:12s} {value:.6g}", highlight=False)
    out.print(f"  {'extractor':12s} {identity}  (compare only numbers from the same one)", highlight=False)
    if cfg.eval.extractor != "inception":
        out.print(f"  ({cfg.eval.extractor} features: compare only with runs scored by the same extractor file, "
                  "not with published FIDs; docs/evaluation.md)", highlight=False)  # fmt: skip


@app.command()
def sample(
    source: str = typer.Argument(..., help="Checkpoint directory or exported generator file"),
    num: int = typer.Option(64, help="Images to write"),
    out_dir: Path = typer.Option(Path("samples"), "--out", help="Output directory"),
    seed: int = typer.Option(0),
    batch_size: int = typer.Option(64),
    interpolate: int = typer.Option(0, help="Also write a latent interpolation strip with K frames per row"),
    truncation_psi: float = typer.Option(1.0, "--truncation-psi", help="Truncation towards the mean style (stylegan2)"),
    style_mix: int = typer.Option(0, help="Also write a K x K style-mixing grid (stylegan2)"),
    classes: Optional[list[int]] = typer.Option(None, "--class", help="Class(es) to draw (conditional; repeatable)"),
) -> None:
    """Write PNG samples and a grid (interpolation strip, style mixing, class rows) from a generator."""
    from gan_dist.sample import write_samples
    from gan_dist.models.io import CheckpointError

    try:
        paths = write_samples(
            source, num, out_dir, seed=seed, batch_size=batch_size, interpolate=interpolate,
            truncation_psi=truncation_psi, style_mix=style_mix, classes=classes or None,
        )  # fmt: skip
    except (CheckpointError, ValueError, OSError) as exc:
        _fail("error", str(exc))
    out.print(f"wrote {len(paths)} files to {out_dir}")


@app.command()
def plan(
    config: Path = typer.Argument(..., help="Job config YAML (see jobs/)"),
    overrides: Optional[list[str]] = typer.Option(None, "--set", help="Override: section.key=value (repeatable)"),
    gpu_memory: Optional[str] = typer.Option(None, help="One GPU size, e.g. 80GB (default: 24, 40, 80 and 141 GB)"),
) -> None:
    """Estimate per-GPU memory (weights, optimizer, EMA, measured activations), the largest batch that fits,
    FLOPs per image and the bytes all-reduced per step; runs on CPU, in seconds to a minute."""
    from gan_dist import plan as planner

    try:
        cfg = load_config(config, list(overrides or []))
        sizes = (planner.parse_gpu_memory(gpu_memory) / planner.GIB,) if gpu_memory else planner.GPU_SIZES_GB
    except (ConfigError, ValueError) as exc:
        _fail("config error", escape(str(exc)))
    out.print(f"planning {escape(str(config))}: measuring one D step and one G step on CPU", highlight=False)
    out.print(planner.render(planner.make_plan(cfg), sizes))


@app.command()
def doctor(
    config: Optional[Path] = typer.Argument(None, help="Job config YAML: also check the job against its data"),
    overrides: Optional[list[str]] = typer.Option(None, "--set", help="Override: section.key=value (repeatable)"),
    address: Optional[str] = typer.Option(None, help="Ray cluster address (HOST:6379); default: a local Ray instance"),
) -> None:
    """Check a cluster from every node before a job is spent on it: versions, driver, GPUs, a collective, data,
    storage and tracking reached with each node's credentials, disk, token; exit code 1 on any failure."""
    from gan_dist.console import quiet_ray

    quiet_ray(False, local=address is None and not os.environ.get("RAY_ADDRESS"))  # before Ray is imported
    from gan_dist import doctor as checker
    from gan_dist.config import build_config

    try:
        # No CONFIG: the defaults and --set, for the cluster-wide checks; no data is checked, so none is named.
        items = overrides or []
        cfg = load_config(config, items) if config else build_config({"data": {"url": "none"}}, items)
    except ConfigError as exc:
        _fail("config error", escape(str(exc)))
    out.print(f"gan-dist doctor: {escape(address or os.environ.get('RAY_ADDRESS') or 'a local Ray instance')}, "
              f"{cfg.scaling.max_workers} workers of the job", highlight=False)  # fmt: skip
    try:
        checks = checker.diagnose(cfg, address, with_job=config is not None)
    except checker.ClusterUnreachable as exc:
        _fail("error", escape(str(exc)))
    except ConfigError as exc:  # a credential in the config: it is not sent to the nodes
        _fail("config error", escape(str(exc)))
    table, fixes = checker.render(checks)
    out.print(table)
    for line in fixes:
        out.print(escape(line), highlight=False)
    failed = sum(c.status == checker.FAIL for c in checks)
    out.print(f"[red]✗ {failed} check(s) failed[/]" if failed else "[green]✓ every check passed[/]")
    raise typer.Exit(1 if failed else 0)


from gan_dist.sweep.cli import sweep  # noqa: E402  (a module of its own: this one is at its size limit)
app.command()(sweep)

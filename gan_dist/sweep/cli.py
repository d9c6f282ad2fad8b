"""The ``gan-dist sweep`` command (registered in ``gan_dist.cli``): run a sweep here, on a cluster (``--address
HOST:6379``), or submit it as a Ray job (``--submit --address http://HEAD:8265``, ``--follow``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

out, err = Console(soft_wrap=True), Console(stderr=True, soft_wrap=True)


def _fail(kind: str, message: str) -> None:
    err.print(f"[bold red]{kind}:[/] {message}", highlight=False)
    raise typer.Exit(2)


def sweep(
    config: Path = typer.Argument(..., help="Job config YAML: the base every trial starts from"),
    space: Path = typer.Argument(..., help="SPACE YAML: the keys and their domains, the metric, the search"),
    overrides: Optional[list[str]] = typer.Option(None, "--set", help="Override: section.key=value (repeatable)"),
    address: Optional[str] = typer.Option(None, help="Ray cluster (HOST:6379; default a local instance), or with "
                                          "--submit the dashboard (http://HEAD:8265)"),  # fmt: skip
    submit: bool = typer.Option(False, "--submit", help="Submit the sweep as a Ray job, as `gan-dist submit` does"),
    follow: bool = typer.Option(False, "--follow", help="With --submit: stream its lines; exit code = job result"),
    token_file: Optional[Path] = typer.Option(None, help="With --submit: the cluster's token file"),
    allow_http: bool = typer.Option(False, "--allow-http", help="With --submit: send the token over plain http://"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Also show everything Ray prints"),
) -> None:
    """Search job-config keys with Ray Tune: random or grid search, ASHA early stopping or population-based
    training. Each trial is a training run (its own workers, checkpoints, MLflow run under the sweep's); the best
    trial's config is written as a job file. Ctrl-C stops the sweep; the same command with the same run.name resumes it."""
    from rich.markup import escape

    from gan_dist.config import ConfigError
    from gan_dist.console import quiet_ray

    quiet_ray(verbose, local=address is None and not os.environ.get("RAY_ADDRESS"))  # before Ray is imported
    if not verbose:  # Tune's own console (its experiment table, paths): the trial lines say what happens
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    from gan_dist.sweep.runner import prepare_sweep

    items = list(overrides or [])
    try:
        cfg, base, plan = prepare_sweep(config, items, space)
    except (ConfigError, ValueError) as exc:
        _fail("config error", escape(str(exc)))
    if submit:
        _submit(config, space, items, address, follow, token_file, allow_http)
        return
    search = plan.search
    out.print(f"gan_dist · sweep {cfg.run.name}: {search.kind}, {search.num_samples} trial(s) of {', '.join(plan.params)}; "
              f"{plan.metric.mode} {plan.metric.name}\n  trials under {cfg.checkpoint.storage}/{cfg.run.name}, MLflow "
              f"experiment {cfg.tracking.experiment}", highlight=False)  # fmt: skip
    from gan_dist.driver import RunError
    from gan_dist.sweep.runner import run_sweep

    try:
        outcome = run_sweep(cfg, base, plan, address)
    except RunError as exc:
        _fail(exc.what, f"{escape(exc.message)}\n  {escape(exc.hint)}")
    ranked = sorted(outcome.rows, key=lambda r: (r is not outcome.best, r.value * (1 if plan.metric.mode == "min" else -1)))
    for row in ranked:
        keys = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.params.items())
        out.print(f"  {'★' if row is outcome.best else ' '} {row.name}  {row.state:13s} step {row.step:6d}  "
                  f"{plan.metric.name} {row.value:.4g}  {keys}", highlight=False)  # fmt: skip
    if outcome.best_config:
        out.print(f"best: {outcome.best.name}; its job: {outcome.best_config} (gan-dist train {outcome.best_config})",
                  highlight=False)  # fmt: skip
    out.print(f"MLflow: parent run {outcome.parent_run_id} in experiment {cfg.tracking.experiment}", highlight=False)
    if not outcome.complete:
        sets = " ".join(f"--set {item}" for item in items if not item.startswith("run.name="))
        out.print(f"stopped before every trial ended; continue with: gan-dist sweep {config} {space} {sets} "
                  f"--set run.name={cfg.run.name}", highlight=False)  # fmt: skip
        raise typer.Exit(130)


def _submit(config: Path, space: Path, items: list[str], address: Optional[str], follow: bool,
            token_file: Optional[Path], allow_http: bool) -> None:  # fmt: skip
    """As ``gan-dist submit``: the sweep's driver runs on the cluster; credentials stay there."""
    from gan_dist import submit as jobs

    if not address:
        _fail("error", "--submit needs --address http://HEAD:8265 (the cluster's dashboard)")
    try:
        job, name = jobs.submit(config, items, address, token_file=token_file, allow_http=allow_http, space_path=space)
        out.print(f"submitted sweep {name} as job {job}", highlight=False)
        final = jobs.follow(job, address, token_file, allow_http) if follow else None
    except jobs.ClusterError as exc:
        _fail("error", str(exc))
    if follow:
        raise typer.Exit(130 if final is None else 0 if final.value == "SUCCEEDED" else 1)

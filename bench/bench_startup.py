"""Time to first step: where `gan-dist train jobs/quickstart.yaml` spends the seconds before its first step.

Runs the real command (`python -m gan_dist train`, a fresh process, a fresh local Ray instance, a fresh sqlite
MLflow store: what a new user's first run does) on the quickstart job cut to 3 steps, and reads its timeline
afterwards from what the run leaves behind, so that any version of gan_dist can be timed the same way:

- the Ray session directory's name: when the driver's ``ray.init`` began (Ray names it after that moment);
- the driver's core-worker log: when the driver was connected to a running Ray instance;
- Ray Train's controller log (``logs/train/ray-train-sys-controller-*.log``, JSON with ``timestamp_ns``): when the
  controller started, when it asked for the worker group, and its own breakdown of the worker-group start
  (placement group, worker processes, train context, train function launch);
- the MLflow store: when rank 0 created the run, and the timestamp of the first step's metrics (the job logs
  every step here, so that metric is stamped right after step 1).

Each run gets its own ``RAY_TMPDIR`` (no other session's logs can be mixed in) and the user's environment
otherwise (``RAY_AUTH_MODE`` unset, as on a fresh machine). ``--baseline TREE`` alternates the runs with a
source tree of another gan_dist (``git archive COMMIT gan_dist | tar -x -C TREE``), put first on PYTHONPATH for
the driver and, through the raylet's environment, for every Ray worker.

    flock /tmp/gan_dist_ray.lock python bench/bench_startup.py --reps 3 --baseline /tmp/gan_dist_before
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from common import (
    QUICKSTART,
    REPO,
    machine,
    prepare_digits,
    print_progress,
    scratch,
    spread,
    summary_row,
    wait_for_quiet,
    write_results,
    SUMMARY_COLUMNS,
)

GOAL_S = 15.0
STEPS = 3
# Lines of Ray's own machinery that the issue counted in a default run's console (matched per line).
NOISE = {
    "PlacementGroupCleaner state-API warnings": r"Failed to query Ray Train Controller actor state",
    "token-auth notice": r"Token authentication is (enabled|disabled) for this Ray cluster",
    "PreemptionWatcher core_worker error": r"PreemptionWatcher.*constructor arguments in the object store",
    "MLflow database migration": r"mlflow\.store\.db\.utils|alembic\.runtime\.migration",
    "Ray Train worker-group banners": r"Requesting resources|training worker group|Setting up process group|"
    r"Reporting training result|Checkpoint successfully created",
    "Ray actor tags": r"\((RayTrainWorker|TrainController|PlacementGroupCleaner) pid=\d+\)",
    "Ray tracebacks after the summary": r"Failed to stop PlacementGroupCleaner",
}
WGI = re.compile(r"\[Worker Group Initialization\] (.+?) in ([\d.]+)s")
SESSION = re.compile(r"session_(\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d_\d+)_\d+$")


# -- one run ------------------------------------------------------------------------------------------


def command(work: Path, shards: Path, name: str) -> list[str]:
    sets = {
        "data.url": shards, "train.steps": STEPS, "train.log_every": 1, "checkpoint.storage": work / "runs",
        "tracking.uri": f"sqlite:///{work / 'mlflow.db'}", "run.name": name,
    }  # fmt: skip
    return [sys.executable, "-m", "gan_dist", "train", str(QUICKSTART)] + [
        arg for key, value in sets.items() for arg in ("--set", f"{key}={value}")
    ]


def run_once(tree: Path, work: Path, shards: Path, name: str) -> dict[str, Any]:
    """One `gan-dist train` in a fresh process, Ray temp dir and MLflow store; its timeline in seconds from launch."""
    work.mkdir(parents=True)
    ray_tmp = Path(tempfile.mkdtemp(prefix="gdst", dir="/tmp"))  # short: Ray's socket paths live under it
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "PYTHONPATH")}
    env.update(PYTHONPATH=str(tree), RAY_TMPDIR=str(ray_tmp), COLUMNS="160")
    launch = time.time()
    proc = subprocess.run(command(work, shards, name), cwd=work, env=env, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    wall = time.time() - launch
    _stop_leftovers(ray_tmp)
    try:
        if proc.returncode != 0:
            raise RuntimeError(f"run {name} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        stamps = {"launch": launch, **ray_stamps(ray_tmp), **mlflow_stamps(work / "mlflow.db")}
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    output = proc.stdout + proc.stderr
    return {
        "first_step_s": stamps["first_step"] - launch,
        "wall_s": wall,
        "timeline_s": {k: round(v - launch, 3) for k, v in stamps.items() if isinstance(v, float)},
        "worker_group_s": stamps["worker_group"],
        "console_lines": len(output.splitlines()),
        "noise_lines": {what: len(re.findall(rx, output)) for what, rx in NOISE.items()},
        "output": output,
    }


def _stop_leftovers(ray_tmp: Path) -> None:
    """Ray's processes of this run that outlived the command (none expected): found by their session path in
    /proc/PID/cmdline, stopped by pid."""
    for proc_dir in Path("/proc").iterdir():
        if not proc_dir.name.isdigit():
            continue
        try:
            cmdline = (proc_dir / "cmdline").read_bytes()
        except OSError:
            continue
        if str(ray_tmp).encode() in cmdline:
            print_progress(f"  stopping leftover pid {proc_dir.name}")
            try:
                os.kill(int(proc_dir.name), signal.SIGKILL)
            except OSError:
                pass


def ray_stamps(ray_tmp: Path) -> dict[str, Any]:
    session = next(p for p in (ray_tmp / "ray").iterdir() if SESSION.search(p.name))
    logs = session / "logs"
    stamps: dict[str, Any] = {
        "ray_init": datetime.strptime(SESSION.search(session.name).group(1), "%Y-%m-%d_%H-%M-%S_%f").timestamp(),
        "driver_connected": min(_first_core_log_time(p) for p in logs.glob("python-core-driver-*.log")),
    }
    records = [json.loads(line) for p in sorted((logs / "train").glob("ray-train-sys-controller-*.log"))
               for line in p.read_text().splitlines() if line.startswith("{")]  # fmt: skip
    records.sort(key=lambda r: r["timestamp_ns"])
    stamps["controller"] = records[0]["timestamp_ns"] / 1e9
    asked = next(r for r in records if r["message"].startswith("Attempting to start training worker group"))
    stamps["worker_group_requested"] = asked["timestamp_ns"] / 1e9
    started = next(r for r in records if r["message"].startswith("Started training worker group"))
    stamps["worker_group_started"] = started["timestamp_ns"] / 1e9
    # The controller's own breakdown of the first worker-group start: (what, seconds), in order.
    stamps["worker_group"] = [(m.group(1), float(m.group(2))) for r in records if r["timestamp_ns"] <= started["timestamp_ns"]
                              for m in [WGI.search(r["message"])] if m]  # fmt: skip
    return stamps


def _first_core_log_time(path: Path) -> float:
    """The time of a Ray core log's first line: ``[2026-11-30 15:08:31,123 I 26677 26677] ...``."""
    with path.open() as f:
        first = f.readline()
    return datetime.strptime(first[1:24], "%Y-%m-%d %H:%M:%S,%f").timestamp()


def mlflow_stamps(db: Path) -> dict[str, float]:
    with sqlite3.connect(db) as con:
        (created,) = con.execute("SELECT min(start_time) FROM runs").fetchone()
        (first,) = con.execute("SELECT min(timestamp) FROM metrics WHERE step = 1").fetchone()
    return {"mlflow_run": created / 1000, "first_step": first / 1000}


# -- the breakdown --------------------------------------------------------------------------------------

# (phase, from stamp, to stamp): consecutive, so the phases add up to the time to first step.
PHASES = [
    ("driver: Python start, imports, config, data preflight", "launch", "ray_init"),
    ("Ray start (GCS, raylet, driver connect)", "ray_init", "driver_connected"),
    ("Train controller actor started", "driver_connected", "controller"),
    ("controller set-up before asking for workers", "controller", "worker_group_requested"),
    ("worker group start (placement group, worker processes, process group, train fn launch)",
     "worker_group_requested", "worker_group_started"),
    ("train fn: models, resume check, MLflow store + run creation", "worker_group_started", "mlflow_run"),
    ("MLflow params/tags, data loader, first step", "mlflow_run", "first_step"),
]  # fmt: skip


def phases(run: dict[str, Any]) -> dict[str, float]:
    t = run["timeline_s"]
    return {name: t[b] - t[a] for name, a, b in PHASES}


def rows_by_version(runs: list[dict[str, Any]], versions: list[str]) -> list[dict[str, Any]]:
    """One row per phase (and per step of Ray Train's own worker-group breakdown): median seconds per version."""
    import statistics

    rows = []
    names = [p[0] for p in PHASES]
    for name in names:
        rows.append({"phase": name, **{v: statistics.median(phases(r)[name] for r in runs if r["version"] == v)
                                       for v in versions}})  # fmt: skip
        if name.startswith("worker group start"):
            for what in dict.fromkeys(w for r in runs for w, _ in r["worker_group_s"]):
                rows.append({"phase": f"  ↳ Ray Train: {what}", **{
                    v: statistics.median([s for r in runs if r["version"] == v for w, s in r["worker_group_s"] if w == what]
                                         or [float("nan")]) for v in versions}})  # fmt: skip
    for key, what in (("first_step_s", "**time to first step**"), ("wall_s", "whole command (3 steps, exit included)")):
        rows.append({"phase": what, **{v: statistics.median(r[key] for r in runs if r["version"] == v) for v in versions}})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--baseline", type=Path, help="a source tree of another gan_dist to alternate with")
    parser.add_argument("--baseline-label", default="before")
    parser.add_argument("--label", default="after")
    parser.add_argument("--name", default="startup", help="results/<name>.json and .md")
    args = parser.parse_args()
    trees = {args.label: REPO}
    if args.baseline:
        trees = {args.baseline_label: args.baseline.resolve(), **trees}
    versions = list(trees)
    info = machine()
    runs: list[dict[str, Any]] = []
    with scratch() as tmp:
        shards = prepare_digits(Path(tmp))
        for rep in range(args.reps):
            wait_for_quiet()
            for version in versions[rep % len(versions):] + versions[: rep % len(versions)]:
                print_progress(f"rep {rep + 1}/{args.reps}: {version}")
                r = run_once(trees[version], Path(tmp) / f"{version}-{rep}", shards, f"startup-{rep}")
                runs.append({"version": version, "rep": rep + 1, **r})
                print_progress(f"  first step after {r['first_step_s']:.1f} s, {r['console_lines']} console lines")
    for version in versions:
        example = next(r for r in runs if r["version"] == version)
        (Path(tmp).parent / f"bench_startup_{version}.txt").write_text(example["output"])
    summary_rows = [summary_row(f"{v}: time to first step (s)", spread([r["first_step_s"] for r in runs if r["version"] == v]))
                    for v in versions]  # fmt: skip
    summary_rows += [summary_row(f"{v}: console lines (3-step run)", spread([r["console_lines"] for r in runs if r["version"] == v]), 0)
                     for v in versions]  # fmt: skip
    noise_rows = [{"what": what, **{v: max(r["noise_lines"][what] for r in runs if r["version"] == v) for v in versions}}
                  for what in NOISE]  # fmt: skip
    best = {v: min(r["first_step_s"] for r in runs if r["version"] == v) for v in versions}
    median = {v: spread([r["first_step_s"] for r in runs if r["version"] == v])["median"] for v in versions}
    summary = [f"Goal ≤ {GOAL_S:.0f} s to the first step: " + "; ".join(
        f"{v} {median[v]:.1f} s median (best {best[v]:.1f} s), **{'met' if median[v] <= GOAL_S else 'NOT met'}**"
        for v in versions) + ".",
        "Phases are consecutive intervals between the stamps listed in the script's docstring; they add up to the "
        "time to first step. Ray Train's own breakdown (↳ rows) splits the worker-group start.",
    ]  # fmt: skip
    phase_columns = [("phase", "phase (median s)"), *[(v, v) for v in versions]]
    run_columns = [("version", "version"), ("rep", "rep"), ("first_step_s", "first step s"), ("wall_s", "wall s"),
                   ("console_lines", "console lines")]  # fmt: skip
    for r in runs:
        r.pop("output")
    settings = {"job": "jobs/quickstart.yaml", "steps": STEPS, "log_every": 1, "tracking": "fresh sqlite store per run",
                "ray": "fresh local instance per run (own RAY_TMPDIR)", "reps": args.reps,
                "versions": {v: str(p) for v, p in trees.items()}}  # fmt: skip
    flags = f"--reps {args.reps}" + (f" --baseline {args.baseline}" if args.baseline else "")
    print(write_results(
        args.name, "Time to first step: gan-dist train jobs/quickstart.yaml", info, settings,
        [("Summary:", SUMMARY_COLUMNS, summary_rows), ("Where the time goes:", phase_columns, rows_by_version(runs, versions)),
         ("Ray's internal lines in the console (most in one run):", [("what", ""), *[(v, v) for v in versions]], noise_rows),
         ("Runs:", run_columns, runs)],
        summary, f"flock /tmp/gan_dist_ray.lock python bench/bench_startup.py {flags}", {"runs": runs},
    ))  # fmt: skip


if __name__ == "__main__":
    main()

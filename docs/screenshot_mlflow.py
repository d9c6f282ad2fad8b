"""Screenshot of a gan_dist run in the MLflow UI, for the README: docs/mlflow_run.png. Not part of CI.

    python docs/screenshot_mlflow.py                       # trains a short run on sklearn's digits first
    python docs/screenshot_mlflow.py --store sqlite:////abs/gan_dist_mlflow.db --run my-run

Starts ``mlflow server`` over the store on 127.0.0.1 (a free port; an http:// store is used as it is),
points Debian's headless chromium (``apt-get install -y chromium``; playwright is not needed) at the run's
"Model metrics" tab in the UI's "Machine learning" layout, tall enough to show every metric section
(losses/, discriminator/, optim/, throughput/) and, below them, the fixed-noise sample grid with its step
slider; saves the PNG and stops every process it started by its pid. ``--tab overview`` shows the run's
description, params and tags instead. ``--sweep`` shows a sweep's parent run (``--run``: the sweep's name) on its
artifacts tab, with its plot of every trial's metric over its steps (docs/sweep_parent_run.png, from the store
``bench/bench_sweep.py --mlflow DIR`` keeps):

    python docs/screenshot_mlflow.py --store sqlite:////DIR/mlflow.db --experiment sweep-bench --run mnist-r1-lr \
      --sweep --height 1000 --out docs/sweep_parent_run.png
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # the server wrapper is the tests' one: same start/stop-by-pid logic

import mlflow  # noqa: E402

from gan_dist.config import build_config  # noqa: E402
from gan_dist.tracking.info import RUN_NAME_TAG, latest_sample_grid, run_page  # noqa: E402
from tests.fixtures_mlflow import MlflowServer  # noqa: E402

RUN_NAME = "digits-demo"
CHROMIUM_TIMEOUT_S = 180
TABS = {"metrics": "model-metrics", "overview": ""}  # --tab: the run page's tab (its URL path)
SWEEP_PLOT = "sweep/metric_over_steps.png"  # --sweep: the parent run's artifact shown (gan_dist/sweep/parent.py)
# MLflow's UI opens its Assistant panel over a third of the page when the host is loopback: browse the
# server under another name that chromium resolves to 127.0.0.1, and let the server accept that name.
UI_HOST = "mlflow.local"
SERVER_ARGS = ("--allowed-hosts", f"{UI_HOST}:*,127.0.0.1:*", "--cors-allowed-origins", f"http://{UI_HOST}:*")


def train_demo(work: Path) -> str:
    """A short real 2-worker run on the digits; returns its tracking URI (a sqlite store in ``work``)."""
    import ray

    from gan_dist.data.prepare import prepare
    from gan_dist.driver import run_training

    prepare("sklearn:digits", str(work / "digits"), resolution=32, channels=1, samples_per_shard=450, progress=False)
    tree = {
        "data": {"url": str(work / "digits"), "resolution": 32, "channels": 1},
        "model": {"g_width": 32, "d_width": 32, "z_dim": 64},
        "train": {"batch_size": 64, "steps": 400, "log_every": 20, "sample_every": 100, "sample_grid": 64},
        "scaling": {"num_workers": 2},
        "checkpoint": {"storage": str(work / "runs"), "every": 400},
        "tracking": {"uri": f"sqlite:///{work / 'mlflow.db'}", "experiment": "gan_dist"},
        "run": {"name": RUN_NAME},
    }
    cfg = build_config(tree)
    try:
        run_training(cfg)
    finally:
        ray.shutdown()
    return cfg.tracking.uri


def page_of(store: str, experiment: str, run_name: str | None, tab: str, artifact: str | None = None) -> str:
    """The UI path of the run's ``tab`` (the experiment's latest run without ``run_name``), or of its artifacts tab
    on ``artifact``; a run shown on a tab must have a sample grid."""
    client = mlflow.MlflowClient(store)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        sys.exit(f"no experiment '{experiment}' in {store}")
    filter_string = f"tags.`{RUN_NAME_TAG}` = '{run_name}'" if run_name else ""
    runs = client.search_runs(
        [exp.experiment_id], filter_string, order_by=["attributes.start_time DESC"], max_results=1
    )
    if not runs:
        sys.exit(f"no run {run_name or ''} in experiment '{experiment}'")
    run_id = runs[0].info.run_id
    if artifact is None and latest_sample_grid(client, run_id) is None:
        sys.exit(f"run {run_id} has no sample grid")
    path, query = run_page(exp.experiment_id, run_id).split("?")
    if artifact is not None:
        return f"{path}/artifactPath/{artifact}?{query}"
    return f"{path}/{TABS[tab]}?{query}" if TABS[tab] else f"{path}?{query}"


def screenshot(url: str, out: Path, budget_ms: int, profile: Path, height: int = 1000) -> None:
    """Headless chromium; the UI is a JS app, so the virtual-time budget lets it fetch and draw first (and
    --run-all-compositor-stages-before-draw makes virtual time produce frames, which lazy UI parts wait for)."""
    cmd = [
        "chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={profile}", f"--host-resolver-rules=MAP {UI_HOST} 127.0.0.1", "--hide-scrollbars",
        f"--window-size=1400,{height}", "--run-all-compositor-stages-before-draw",
        f"--virtual-time-budget={budget_ms}", f"--screenshot={out}", url,
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        proc.wait(CHROMIUM_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # its renderer/GPU helpers are in its process group
            proc.wait()
    if proc.returncode or not out.is_file():
        sys.exit(f"chromium failed ({proc.returncode}); no {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", help="tracking URI to show (default: train a short demo run first)")
    parser.add_argument("--experiment", default="gan_dist")
    parser.add_argument("--run", help="gan_dist run name (default: the experiment's latest run)")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "mlflow_run.png")
    parser.add_argument("--tab", choices=sorted(TABS), default="metrics")
    parser.add_argument("--sweep", action="store_true", help=f"--run is a sweep: its parent run, on {SWEEP_PLOT}")
    parser.add_argument("--height", type=int, default=3500, help="window height: the metrics tab is long")
    parser.add_argument(
        "--budget-ms",
        type=int,
        default=120_000,
        help="chromium's --virtual-time-budget (the UI animates its artifact tree)",
    )
    args = parser.parse_args()
    if args.sweep and not (args.store and args.run):
        parser.error("--sweep shows a sweep that ran: give its --store and its name as --run")

    with tempfile.TemporaryDirectory(prefix="gan_dist_screenshot_") as tmp:
        work = Path(tmp)
        store = args.store or train_demo(work)
        run_name = args.run or (None if args.store else RUN_NAME)
        page = page_of(store, args.experiment, run_name, args.tab, SWEEP_PLOT if args.sweep else None)
        remote = store.startswith(("http://", "https://"))
        server = None if remote else MlflowServer(work, backend_store_uri=store, extra_args=SERVER_ARGS)
        try:
            if server is not None:
                server.start()
            base = store if server is None else f"http://{UI_HOST}:{server.port}"
            screenshot(f"{base}/{page}", args.out.resolve(), args.budget_ms, work / "chromium-profile", args.height)
        finally:
            if server is not None:
                server.stop()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

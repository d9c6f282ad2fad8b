"""A sweep against the shipped job at the same CPU budget: R1 γ and both learning rates of jobs/mnist.yaml on MNIST.

1. The MNIST test split (../shared/data/mnist, 10,000 images) as 32-px shards; the classifier extractor trained on
   its labels (as bench_quality.py does): FID in its features, comparable within this benchmark only.
2. The sweep, through ``gan-dist sweep``'s own driver: jobs/mnist.yaml with jobs/sweeps/mnist_r1_lr.yaml (ASHA over
   loss.r1_gamma, optim.g_lr, optim.d_lr; D without BatchNorm, which R1 cannot have), each trial 1 worker, 2 at once on the 2 cores, at most ``--steps``
   steps, FID of 1,000 samples at every checkpoint (``--every`` steps). Its wall time W, start-ups included, is the
   budget: 2 cores x W.
3. The shipped job as it ships (2 workers) for the same wall time W: its steps from its own measured step rate,
   FID every ``--every`` steps, so that it is also known at the best trial's step count.

    flock /tmp/gan_dist_ray.lock python bench/bench_sweep.py --trials 8 --steps 480 --every 60
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import yaml

from bench_quality import MNIST, calibrate
from common import REPO, machine, print_progress, publish, ray_session, scratch

JOB = REPO / "jobs" / "mnist.yaml"
SPACE = REPO / "jobs" / "sweeps" / "mnist_r1_lr.yaml"


def fid_history(tracking_uri: str, run_id: str) -> list[tuple[int, float]]:
    import mlflow

    points = mlflow.MlflowClient(tracking_uri).get_metric_history(run_id, "quality/fid")
    return [(m.step, m.value) for m in sorted(points, key=lambda m: m.step)]


def job_overrides(job: Path, overrides: list[str]) -> list[str]:
    """The job file as ``key=value`` overrides (``calibrate`` builds its config from overrides alone)."""
    from gan_dist.tracking.info import flatten

    return [f"{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}"
            for k, v in flatten(yaml.safe_load(job.read_text())).items()] + overrides  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--steps", type=int, default=480, help="a trial's steps when ASHA never stops it")
    parser.add_argument("--every", type=int, default=60, help="steps between FID evaluations (ASHA's grace period)")
    parser.add_argument("--mlflow", type=Path, help="keep the MLflow store here (docs/screenshot_mlflow.py --sweep)")
    args = parser.parse_args()
    keep = args.mlflow
    del args.mlflow  # where the store goes is not a setting of the result (nor of its regenerate command)
    info = machine()
    from gan_dist.config import load_config
    from gan_dist.data.prepare import prepare
    from gan_dist.driver import run_training
    from gan_dist.metrics.classifier import train_classifier
    from gan_dist.storage import StorageConfig
    from gan_dist.sweep.runner import prepare_sweep, run_sweep

    with scratch() as tmp, ray_session(num_cpus=2):
        work = Path(tmp)
        store = (keep or work).resolve()
        store.mkdir(parents=True, exist_ok=True)
        shards = work / "mnist"
        prepare(str(MNIST), str(shards), resolution=32, channels=1, samples_per_shard=2500, progress=False)
        classifier = train_classifier(str(shards), StorageConfig(), 32, 1, work / "classifier.pt", steps=400)
        common = [f"data.url={shards}", f"checkpoint.storage={work / 'runs'}", f"tracking.uri=sqlite:///{store / 'mlflow.db'}",
                  "tracking.experiment=sweep-bench", "eval.extractor=classifier", f"eval.extractor_path={classifier}",
                  "eval.num_images=1000", "eval.batch_size=250", f"eval.every={args.every}", "train.max_failures=0"]  # fmt: skip

        space = yaml.safe_load(SPACE.read_text())
        space["search"].update(num_samples=args.trials, asha={"grace_period": args.every, "reduction_factor": 2})
        (work / "space.yaml").write_text(yaml.safe_dump(space))
        # R1 needs a D without BatchNorm (jobs/mnist.yaml has it): the SPACE's header says so too.
        trial = [f"train.steps={args.steps}", f"checkpoint.every={args.every}", "scaling.num_workers=1", "model.d_norm=none",
                 f"train.sample_every={args.steps}", "run.name=mnist-r1-lr"]  # fmt: skip
        cfg, base, plan = prepare_sweep(JOB, common + trial, work / "space.yaml")
        print_progress(f"sweep: {args.trials} trials, ASHA, <= {args.steps} steps each")
        start = time.perf_counter()
        sweep = run_sweep(cfg, base, plan)
        budget_s = time.perf_counter() - start

        shipped_overrides = job_overrides(JOB, common)
        seconds_per_step = calibrate(shipped_overrides + ["run.name=shipped-calibration"])
        steps = max(args.every, int(budget_s / seconds_per_step) // args.every * args.every)
        print_progress(f"shipped job: {seconds_per_step:.3f} s/step -> {steps} steps in the sweep's {budget_s / 60:.1f} min")
        shipped_cfg = load_config(JOB, common + [f"train.steps={steps}", f"checkpoint.every={steps}",
                                                 f"train.sample_every={steps}", "run.name=shipped"])  # fmt: skip
        start = time.perf_counter()
        shipped = run_training(shipped_cfg)
        shipped_s = time.perf_counter() - start
        shipped_fid = fid_history(shipped_cfg.tracking.uri, shipped.mlflow_run_id)

    best = sweep.best
    at_best_steps = min(shipped_fid, key=lambda p: abs(p[0] - best.step))
    rows = [{"trial": r.name, "state": r.state, "steps": r.step, "fid": r.value,
             **{k: float(f"{v:.3g}") if isinstance(v, float) else v for k, v in r.params.items()}}
            for r in sweep.rows]  # fmt: skip
    rows.sort(key=lambda r: r["fid"])
    keys = list(plan.params)
    outcome: dict[str, Any] = {
        "budget_min": budget_s / 60, "shipped_wall_min": shipped_s / 60, "shipped_steps": steps,
        "best_trial": best.name, "best_fid": best.value, "best_steps": best.step, "best_params": best.params,
        "shipped_fid_final": shipped_fid[-1][1], "shipped_fid_at_best_steps": at_best_steps,
        "trial_steps_total": sum(r.step for r in sweep.rows),
    }  # fmt: skip
    publish(
        "sweep_mnist", "A sweep over R1 γ and the learning rates vs the shipped job at the same CPU budget", info,
        {"data": "MNIST test split, 10,000 images, 32 px", "job": "jobs/mnist.yaml", "space": "jobs/sweeps/mnist_r1_lr.yaml"},
        [("Trials (ASHA; classifier-feature FID of 1,000 samples at the trial's last step: lower is better)",
          [("trial", "trial"), ("state", "state"), ("steps", "steps"), ("fid", "FID"), *((k, k) for k in keys)], rows),
         ("Shipped job, FID along training (step: FID)", [("curve", "shipped jobs/mnist.yaml, 2 workers")],
          [{"curve": " ".join(f"{s}:{v:.2f}" for s, v in shipped_fid)}])],
        [f"budget: {budget_s / 60:.1f} min on 2 cores (the sweep's wall time; {outcome['trial_steps_total']} trial steps)",
         f"best trial {best.name}: FID {best.value:.2f} after {best.step} steps with "
         + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in best.params.items()),
         f"shipped job in the same time: FID {shipped_fid[-1][1]:.2f} after {steps} steps; "
         f"{at_best_steps[1]:.2f} at step {at_best_steps[0]}"],
        "bench_sweep.py", args, raw={"outcome": outcome, "trials": rows, "shipped_fid": shipped_fid},
    )  # fmt: skip


if __name__ == "__main__":
    main()

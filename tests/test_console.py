"""The console of `gan-dist train`: what a user sees, from the header to the summary, and nothing of Ray's
machinery; Ctrl-C in two stages; a failing worker's traceback; the progress channel between rank 0 and it."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from rich.console import Console

from gan_dist.config import build_config
from gan_dist.console import RAY_NOISE, RunConsole, RunState, explain_failure, quiet_ray
from gan_dist.train.progress import ProgressChannel, format_step
from tests.conftest import TINY_MODEL
from tests.test_cli import GAN_DIST, REPO

# What the issue counted in a default run's console: none of it may come back.
RAY_INTERNALS = [
    "Failed to query Ray Train Controller actor state",
    "Token authentication is",
    "has constructor arguments in the object store",
    "mlflow.store.db.utils",
    "Requesting resources",
    "training worker group",
    "Setting up process group",
    "Reporting training result",
    "Checkpoint successfully created",
    "(RayTrainWorker pid=",
    "(TrainController pid=",
    "(PlacementGroupCleaner pid=",
    "Failed to stop PlacementGroupCleaner",
    "An input example was not provided",
]


def plain_console() -> tuple[Console, io.StringIO]:
    buffer = io.StringIO()
    return Console(file=buffer, force_terminal=False, width=100, soft_wrap=True), buffer


def tiny_cfg(job_tree: dict, *overrides: str):
    return build_config(job_tree, [*TINY_MODEL, "run.name=console-unit", *overrides])


LOG = {"losses/d": 0.5, "losses/g": 2.0, "discriminator/real": 0.8, "discriminator/fake": 0.2,
       "throughput/images_per_sec": 612.0}  # fmt: skip


def test_plain_console_tells_the_run_from_header_to_summary(job_tree):
    cfg = tiny_cfg(job_tree)
    out, buffer = plain_console()
    view = RunConsole(cfg, out, command=["train", "job.yaml", "--set", "train.steps=6", "--set", "run.name=x"])
    view.header(None, data="1797 images in 4 shards")
    with view.live():
        view.phase("starting a local Ray instance")
        view.event({"kind": "start", "step": 0, "metrics": {"world": 2, "mlflow_run_id": "abc"}})
        view.event({"kind": "log", "step": 2, "metrics": LOG, "eta_s": 65.0})
        view.event({"kind": "checkpoint", "step": 3, "metrics": {}})
        view.event({"kind": "eval", "step": 3, "metrics": {"fid": 41.5, "kid": 0.02}})
    outcome = SimpleNamespace(run_name=cfg.run.name, final_step=6, checkpoint_path="/runs/x/step-000000006",
                              mlflow_run_id="abc", tracking_uri=cfg.tracking.uri, stopped=None)  # fmt: skip
    view.summary(outcome, {"ui": "mlflow ui --backend-store-uri sqlite:///m.db", "ui_page": "http://127.0.0.1:5000/#/x",
                           "samples": "/art/images/samples+step+6.png"})  # fmt: skip
    text = buffer.getvalue()
    for expected in ("run console-unit", "1797 images in 4 shards", "on a local Ray instance", "starting a local Ray",
                     "training on 2 worker(s), from scratch", "step 2/6 | d_loss 0.5000 g_loss 2.0000",
                     "D(x) 0.800 D(G(z)) 0.200 | 612 img/s | ETA 1m05s", "checkpoint at step 3", "fid 41.5",
                     "✓ done run console-unit at step 6/6", "/runs/x/step-000000006", "MLflow run  abc",
                     "samples+step+6.png"):  # fmt: skip
        assert expected in text, (expected, text)
    # The way on: the same command, its run name pinned, more steps (train.steps replaced, not repeated).
    assert "gan-dist train job.yaml --set run.name=console-unit --set train.steps=12" in text


def test_run_state_line_shows_losses_checkpoint_and_scores():
    state = RunState(total=100)
    state.apply({"kind": "start", "step": 40, "metrics": {"world": 2}})
    state.apply({"kind": "log", "step": 50, "metrics": LOG, "eta_s": 10})
    state.apply({"kind": "checkpoint", "step": 50})
    state.apply({"kind": "eval", "step": 50, "metrics": {"fid": 12.3456, "kid": 0.01, "precision": 0.5}})
    assert state.stats() == ("d_loss 0.500  g_loss 2.000 · D(x) 0.800  D(G(z)) 0.200 · fid 12.35  kid 0.01 · "
                             "checkpoint step 50")  # fmt: skip
    state.apply({"kind": "start", "step": 50, "metrics": {"world": 1}})  # a restarted worker group
    assert state.step == 50 and state.world == 1 and "restarted 1x" in state.stats()


def test_failures_are_explained_with_a_hint():
    class FakeGroupError(Exception):
        def __init__(self, failures: dict) -> None:
            super().__init__("Training failed due to worker errors")
            self.worker_failures = failures

    oom = FakeGroupError({1: RuntimeError("[enforce fail] DefaultCPUAllocator: can't allocate memory: 9 GB")})
    what, message, hint = explain_failure(oom)
    assert what == "a worker ran out of memory" and message.startswith("rank 1: RuntimeError") and "batch_size" in hint
    what, message, _ = explain_failure(FakeGroupError({0: ValueError("bad"), 1: ValueError("bad")}))
    assert what == "training failed" and message == "rank 0 (and 1 more): ValueError: bad"


def test_quiet_ray_uses_rays_switches_and_leaves_the_users_alone(monkeypatch):
    for name in ("RAY_DEDUP_LOGS_SKIP_REGEX", "RAY_DISABLE_WORKER_LOG_PREFIX", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # the user's (here: the test session's) choice wins
    quiet_ray(verbose=False, local=True)
    assert os.environ["RAY_AUTH_MODE"] == "disabled" and os.environ["RAY_DISABLE_WORKER_LOG_PREFIX"] == "1"
    assert os.environ["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == "0"
    skip = re.compile(os.environ["RAY_DEDUP_LOGS_SKIP_REGEX"])
    assert skip.search("Failed to query Ray Train Controller actor state. State API may be temporarily unavailable.")
    assert skip.search("Reporting training result 3: TrainingReport(checkpoint=None, metrics={})")
    for line in ("Traceback (most recent call last):", "RuntimeError: CUDA out of memory",
                 "[gan_dist] MLflow tracking at http://x unreachable"):  # fmt: skip
        assert not skip.search(line)
    assert os.environ["RAY_DEDUP_LOGS_SKIP_REGEX"] == "|".join(RAY_NOISE)


def test_without_a_console_rank_0_writes_the_progress_line_itself(capsys, job_tree):
    cfg = tiny_cfg(job_tree)
    channel = ProgressChannel(None, cfg.train.steps, echo=True)
    channel.publish("log", 2, LOG)
    ProgressChannel(None, cfg.train.steps, echo=False).publish("log", 2, LOG)  # another rank: silent
    assert capsys.readouterr().err.count("[gan_dist] step 2/6 | d_loss 0.5000") == 1
    assert not channel.stop_requested()


@pytest.mark.ray
def test_progress_hub_carries_events_and_the_stop_request(ray_session, job_tree):
    import ray

    from gan_dist.train.progress import HUB_NAMESPACE, ProgressHub, hub_name

    cfg = tiny_cfg(job_tree, "run.name=hub-test")
    hub = ray.remote(num_cpus=0)(ProgressHub).options(name=hub_name(cfg.run.name), namespace=HUB_NAMESPACE).remote()
    try:
        channel = ProgressChannel.connect(cfg, rank=0)
        assert channel.connected and not ProgressChannel.connect(cfg, rank=1).connected
        channel.publish("log", 2, LOG)
        channel.publish("checkpoint", 3)
        assert not channel.stop_requested()
        ray.get(hub.request_stop.remote("stopped with Ctrl-C"))
        deadline = time.monotonic() + 10
        while not channel.stop_requested():  # never blocks: polled as a training loop would, step after step
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert channel.stop_reason == "stopped with Ctrl-C"
        events = ray.get(hub.drain.remote())
        assert [(e["kind"], e["step"]) for e in events] == [("log", 2), ("checkpoint", 3)]
        assert events[0]["metrics"] == LOG and format_step(2, 6, LOG, None).startswith("step 2/6")
    finally:
        ray.kill(hub)


# -- the real command ---------------------------------------------------------------------------------


def start_cli(args: list[str], cwd: Path, env: dict[str, str]) -> tuple[subprocess.Popen, list[str]]:
    """`gan-dist` as a user runs it (stdout not a terminal: the plain view); its stdout lines collected live."""
    proc = subprocess.Popen([GAN_DIST, *args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)  # fmt: skip
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    return proc, lines


def user_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """A user's environment: no RAY_AUTH_MODE (gan-dist sets it), a home of its own (Ray keeps its token there)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}
    return {**env, "HOME": str(tmp_path / "home"), "COLUMNS": "200", **extra}


def wait_for(lines: list[str], pattern: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not any(pattern in line for line in lines):
        assert proc.poll() is None, "".join(lines)[-4000:]
        assert time.monotonic() < deadline, "".join(lines)[-4000:]
        time.sleep(0.1)


def finish(proc: subprocess.Popen, lines: list[str], timeout: float = 300) -> int:
    """The command's exit code; on a hang, kill it and fail with what it printed."""
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGUSR1)  # the CLI prints every thread's stack: where it hung
        time.sleep(3)
        proc.kill()
        proc.wait()
        pytest.fail("gan-dist hung; it printed:\n" + "".join(lines)[-6000:])


def assert_clean(output: str) -> None:
    for noise in RAY_INTERNALS:
        assert noise not in output, (noise, output[-4000:])


@pytest.mark.ray
def test_train_console_ctrl_c_and_continue(digits_shards, tmp_path):
    """The quickstart path on a tiny model: header, live progress (plain lines here), Ctrl-C -> a checkpoint at the
    step reached and how to continue; that command continues the run to its end; no line of Ray's machinery."""
    args = ["train", str(REPO / "jobs/quickstart.yaml"), "--set", f"data.url={digits_shards}",
            "--set", "train.steps=5000", "--set", "train.log_every=5", "--set", "run.name=console-e2e"]  # fmt: skip
    for item in TINY_MODEL:
        args += ["--set", item]
    env = user_env(tmp_path)
    proc, lines = start_cli(args, tmp_path, env)
    wait_for(lines, "step 10/5000", proc)
    proc.send_signal(signal.SIGINT)
    assert finish(proc, lines) == 130
    first = "".join(lines)
    assert_clean(first)
    for expected in ("gan_dist · run console-e2e", "workers      2 × 1 CPU on a local Ray instance",
                     "training on 2 worker(s), from scratch", "Ctrl-C: stopping after this step",
                     "■ stopped run console-e2e at step", "MLflow run  ", "mlflow ui --backend-store-uri sqlite:///"):  # fmt: skip
        assert expected in first, (expected, first)
    stopped = int(re.search(r"stopped run console-e2e at step (\d+)/5000", first).group(1))
    assert (tmp_path / f"gan_dist_runs/console-e2e/step-{stopped:09d}/state.pt").is_file()
    command = next(line for line in lines if "continue" in line).split("continue", 1)[1].split()
    assert command[:2] == ["gan-dist", "train"] and "run.name=console-e2e" in command
    # The printed command continues the run (a few more steps, so that the test stays short).
    proc, lines = start_cli([*command[1:], "--set", f"train.steps={stopped + 4}"], tmp_path, env)
    assert finish(proc, lines) == 0, "".join(lines)[-4000:]
    second = "".join(lines)
    assert_clean(second)
    assert f"from step {stopped}" in second and f"✓ done run console-e2e at step {stopped + 4}/{stopped + 4}" in second


@pytest.mark.ray
def test_a_failing_worker_shows_its_traceback_and_fails_the_command(digits_shards, tmp_path):
    chaos = tmp_path / "chaos.json"
    chaos.write_text(json.dumps({"run": "console-fail", "rank": 1, "step": 2, "fault": "raise"}))
    args = ["train", str(REPO / "jobs/quickstart.yaml"), "--set", f"data.url={digits_shards}", "--set", "train.steps=50",
            "--set", "train.max_failures=0", "--set", "run.name=console-fail"]  # fmt: skip
    for item in TINY_MODEL:
        args += ["--set", item]
    proc, lines = start_cli(args, tmp_path, user_env(tmp_path, GAN_DIST_CHAOS_FILE=str(chaos)))
    assert finish(proc, lines) == 1, "".join(lines)[-4000:]
    output = "".join(lines)
    assert "Traceback (most recent call last)" in output and 'in _inject_fault' in output
    assert "✗ training failed: rank 1: RuntimeError: fault drill: an exception in rank 1 after step 2" in output
    log_path = re.search(r"full error and tracebacks: (\S+)", output).group(1)
    assert "fault drill" in Path(log_path).read_text()
    assert_clean(output)

"""Stop agreement and SIGTERM: Ray's preemption notice is a collective, so every rank must ask for it at the same
steps; the SIGTERM a rank catches while it trains is the process's again once training is over."""

import os
import signal
import subprocess
import sys
import threading
import time

import ray.train

from gan_dist.train.stop import NOTICED, PREEMPTED, PREEMPTION_CHECK_EVERY, STOPPED, StopWatch


def test_a_rank_with_a_stop_request_still_joins_the_preemption_check(monkeypatch):
    """Regression: rank 0 saw the user's Ctrl-C at step 30 and skipped the check the other ranks were waiting in."""
    asked: list[int] = []
    answer: list[object] = [None]

    def get_preemption_info():
        asked.append(len(asked))
        return answer[0]

    monkeypatch.setattr(ray.train, "get_preemption_info", get_preemption_info)
    requested = [False]
    with StopWatch(rank=0, world=1, grace_s=1e9, user_stop=lambda: requested[0]) as watch:
        assert [watch.poll(step) for step in range(1, 2 * PREEMPTION_CHECK_EVERY + 1)] == [0] * 20
        assert len(asked) == 2  # at steps 10 and 20 only
        requested[0] = True
        assert watch.poll(3 * PREEMPTION_CHECK_EVERY) == STOPPED
        assert len(asked) == 3  # asked although this rank already knew it would stop
        requested[0] = False
        answer[0] = object()  # a drain notice: acted on once
        assert watch.poll(4 * PREEMPTION_CHECK_EVERY) == STOPPED  # the stop request stays agreed
        assert len(asked) == 4


def test_a_drain_notice_is_acted_on_once(monkeypatch):
    monkeypatch.setattr(ray.train, "get_preemption_info", lambda: object())
    with StopWatch(rank=0, world=1, grace_s=1e9) as watch:
        assert watch.poll(PREEMPTION_CHECK_EVERY) == NOTICED
        assert watch.poll(2 * PREEMPTION_CHECK_EVERY) == 0


def test_sigterm_is_caught_while_training_and_goes_back_to_its_handler_after(monkeypatch):
    monkeypatch.setattr(ray.train, "get_preemption_info", lambda: None)
    delivered: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: delivered.append(signum))  # Ray's, in a worker
    try:
        watch = StopWatch(rank=0, world=1, grace_s=1e9)
        os.kill(os.getpid(), signal.SIGTERM)
        watch.wait_for_sigterm()
        assert watch.poll(1) == PREEMPTED and delivered == []  # the rank checkpoints instead of exiting
        watch.close()
        assert "gan_dist-sigterm" not in [t.name for t in threading.enumerate()]  # the watchdog is gone
        os.kill(os.getpid(), signal.SIGTERM)
        deadline = time.monotonic() + 5
        while not delivered and time.monotonic() < deadline:
            time.sleep(0.01)
        assert delivered == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_a_process_whose_training_ended_exits_on_sigterm_at_once_not_after_the_grace():
    """What ``train_worker`` leaves behind (its StopWatch closed): SIGTERM's default action, not 120 s of grace."""
    code = (
        "import time; from gan_dist.train.stop import StopWatch\n"
        "StopWatch(rank=0, world=1, grace_s=120).close(); print('ready', flush=True); time.sleep(120)"
    )
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        assert process.stdout.readline() == b"ready\n"
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == -signal.SIGTERM
    finally:
        process.kill()
        process.stdout.close()

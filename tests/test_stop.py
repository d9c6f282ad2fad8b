"""Stop agreement: Ray's preemption notice is a collective, so every rank must ask for it at the same steps."""

import faulthandler
import signal

import ray.train

from gan_dist.train.stop import NOTICED, PREEMPTION_CHECK_EVERY, STOPPED, StopWatch


def test_a_rank_with_a_stop_request_still_joins_the_preemption_check(monkeypatch):
    """Regression: rank 0 saw the user's Ctrl-C at step 30 and skipped the check the other ranks were waiting in."""
    asked: list[int] = []
    answer: list[object] = [None]

    def get_preemption_info():
        asked.append(len(asked))
        return answer[0]

    monkeypatch.setattr(ray.train, "get_preemption_info", get_preemption_info)
    requested = [False]
    watch = StopWatch(rank=0, world=1, grace_s=1e9, user_stop=lambda: requested[0])
    try:
        assert [watch.poll(step) for step in range(1, 2 * PREEMPTION_CHECK_EVERY + 1)] == [0] * 20
        assert len(asked) == 2  # at steps 10 and 20 only
        requested[0] = True
        assert watch.poll(3 * PREEMPTION_CHECK_EVERY) == STOPPED
        assert len(asked) == 3  # asked although this rank already knew it would stop
        requested[0] = False
        answer[0] = object()  # a drain notice: acted on once
        assert watch.poll(4 * PREEMPTION_CHECK_EVERY) == STOPPED  # the stop request stays agreed
        assert len(asked) == 4
    finally:
        faulthandler.unregister(signal.SIGTERM)  # give the test process its SIGTERM back


def test_a_drain_notice_is_acted_on_once(monkeypatch):
    monkeypatch.setattr(ray.train, "get_preemption_info", lambda: object())
    watch = StopWatch(rank=0, world=1, grace_s=1e9)
    try:
        assert watch.poll(PREEMPTION_CHECK_EVERY) == NOTICED
        assert watch.poll(2 * PREEMPTION_CHECK_EVERY) == 0
    finally:
        faulthandler.unregister(signal.SIGTERM)

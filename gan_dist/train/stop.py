"""Checkpointing or stopping early on purpose, agreed by every rank at the same step:

- SIGTERM to a worker (what a Kubernetes eviction sends): checkpoint the step, then fail the worker group so
  that Ray Train restarts it from that checkpoint, on whatever workers remain (elastic) or come back;
- Ray's preemption notice (a node of the group is being drained, e.g. a spot reclaim): checkpoint the step
  just in time and carry on; when the node goes, Ray restarts the group from that checkpoint;
- a stop the user asked for (Ctrl-C on the driver): checkpoint the step and end the run.

Agreement costs one tiny all-reduce per step on a CPU (gloo) group: a CPU round trip, no device sync (DDP has
the ranks in step with each other anyway). A request made during step s stops the run after step s.

SIGTERM: Ray's workers exit on SIGTERM, and Python only lets the main thread (which Ray owns) install signal
handlers. ``faulthandler.register`` installs a C-level handler from any thread; with ``chain=False`` it
replaces Ray's, and it "reports" by writing a traceback to a file descriptor: a non-blocking pipe that a
watchdog thread reads. From the first SIGTERM the rank has ``train.preempt_grace_s`` to checkpoint before the
watchdog ends the process regardless (a collective stuck on a dead peer must not outlive the node). When the
training function ends, ``close`` gives SIGTERM back to Ray's handler (exit at once) and stops the watchdog.
"""

from __future__ import annotations

import faulthandler
import fcntl
import os
import signal
import threading
import time
from typing import IO

import ray.train
import torch
import torch.distributed as dist

NOTICED, STOPPED, PREEMPTED = 1, 2, 3  # by priority: ranks agree on the highest any of them has
PREEMPTION_CHECK_EVERY = 10  # steps between Ray preemption-notice checks (a collective of Ray Train's own)
EXIT_AFTER_GRACE = 143  # 128 + SIGTERM


class Preempted(RuntimeError):
    """Raised after the checkpoint of a preempted step, so that Ray Train restarts the worker group."""


class StopWatch:
    """One per rank: collects local stop requests and agrees on them with every other rank each step."""

    def __init__(self, rank: int, world: int, grace_s: float, user_stop=None) -> None:  # noqa: ANN001
        self.rank, self.world, self.grace_s = rank, world, grace_s
        self._user_stop = user_stop  # a callable returning True once the user asked to stop (rank 0's console)
        self._sigterm_at: float | None = None
        self._local = 0
        self._noticed = False  # Ray's notice stays up until the node goes: act on it once
        self._group = dist.new_group(backend="gloo") if world > 1 else None
        self._pipe, self._pipe_writer = self._catch_sigterm()
        self._closed = threading.Event()
        self._watchdog_thread = threading.Thread(target=self._watchdog, name="gan_dist-sigterm", daemon=True)
        self._watchdog_thread.start()

    @staticmethod
    def _catch_sigterm() -> tuple[int, IO[str]]:
        """The read end of the pipe SIGTERM writes to, and its write end (both non-blocking: a handler must
        never block)."""
        read_end, write_end = os.pipe()
        for fd in (read_end, write_end):
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_NONBLOCK)
        writer = os.fdopen(write_end, "w")
        faulthandler.register(signal.SIGTERM, file=writer, all_threads=False, chain=False)
        return read_end, writer

    def close(self) -> None:
        """SIGTERM back to the handler it had before (Ray's: exit), the watchdog stopped, the pipe closed: a
        rank whose training function has ended has nothing to checkpoint, and must not outlive a SIGTERM."""
        if self._closed.is_set():
            return
        faulthandler.unregister(signal.SIGTERM)
        self._closed.set()
        self._watchdog_thread.join()  # before the pipe closes: it reads from it
        os.close(self._pipe)
        self._pipe_writer.close()

    def __enter__(self) -> StopWatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _sigterm_received(self) -> bool:
        try:
            if os.read(self._pipe, 65536) and self._sigterm_at is None:
                self._sigterm_at = time.monotonic()
        except BlockingIOError:
            pass
        return self._sigterm_at is not None

    def wait_for_sigterm(self, timeout: float = 5.0) -> None:
        """Until this process's SIGTERM has been seen (the fault drill signals itself: the signal may be
        delivered to another thread a moment later)."""
        deadline = time.monotonic() + timeout
        while not self._sigterm_received() and time.monotonic() < deadline:
            time.sleep(0.01)

    def _watchdog(self) -> None:
        while not self._closed.wait(0.2):
            if self._sigterm_received() and time.monotonic() - self._sigterm_at > self.grace_s:
                os._exit(EXIT_AFTER_GRACE)  # the grace period is over: go, checkpoint or not

    def barrier(self) -> None:
        """Until every rank has got here (on the stop flags' CPU group)."""
        if self._group is not None:
            dist.barrier(group=self._group)

    def _local_reason(self, step: int) -> int:
        # Ray's notice is a collective (the answer is rank 0's): every rank asks at the same steps, whatever it
        # has to say itself; a rank that skipped it on its own SIGTERM or stop request would hang the others.
        noticed = False
        if step % PREEMPTION_CHECK_EVERY == 0 and not self._noticed:
            noticed = self._noticed = ray.train.get_preemption_info() is not None
        if self._sigterm_received():
            return PREEMPTED
        if self._user_stop is not None and self._user_stop():
            return STOPPED
        return NOTICED if noticed else 0

    def poll(self, step: int) -> int:
        """What every rank agreed to do after ``step``: 0 carry on, NOTICED checkpoint and carry on, STOPPED
        checkpoint and end, PREEMPTED checkpoint and fail for a restart. Every rank calls it every step."""
        reason = self._local_reason(step)
        self._local = max(self._local, reason) if reason != NOTICED else self._local  # a notice is acted on once
        flag = torch.tensor([max(self._local, reason)], dtype=torch.int64)  # on the CPU: no device sync
        if self._group is not None:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
        return int(flag.item())

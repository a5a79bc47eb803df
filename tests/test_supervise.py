"""The supervisor of ``--workers``: restart with backoff, give up on a crash loop, stop by
draining (sans-I/O rules and the pool on a Clock, with fake worker processes)."""

from __future__ import annotations

import signal

import pytest
from twisted.internet.task import Clock

from slimta_tx.supervise import GiveUp, Restart, RestartLimits, RestartTracker, describe_exit
from slimta_tx.workers import WorkerPool


def test_backoff_doubles_and_a_crash_loop_gives_up() -> None:
    """Failures close together wait 0.5, 1, 2, ... s; one more than max_restarts within the
    window is a crash loop, named with the worker and how it last ended."""
    tracker = RestartTracker(RestartLimits(max_restarts=3, window=60.0, initial_delay=0.5))
    assert tracker.exited(1, 0.0, "exit status 1") == Restart(0.5, 1)
    assert tracker.exited(1, 1.0, "exit status 1") == Restart(1.0, 2)
    assert tracker.exited(1, 3.0, "exit status 1") == Restart(2.0, 3)
    decision = tracker.exited(1, 6.0, "killed by signal 9 (SIGKILL)")
    assert isinstance(decision, GiveUp)
    assert decision.reason == (
        "worker 1 failed 4 times in 60 s (last: killed by signal 9 (SIGKILL)); "
        "more than --worker-restarts 3/60 allows"
    )


def test_failures_age_out_and_slots_count_apart() -> None:
    """A worker that fails once an hour is restarted promptly forever; another slot's failures
    do not count against it."""
    tracker = RestartTracker(RestartLimits(max_restarts=1, window=60.0))
    for hour in range(5):
        assert tracker.exited(1, hour * 3600.0, "exit status 1") == Restart(0.5, 1)
    assert tracker.exited(2, 3 * 3600.0 + 1, "exit status 1") == Restart(0.5, 1)
    assert tracker.failures(1, 4 * 3600.0 + 59) == 1
    assert tracker.failures(1, 4 * 3600.0 + 60) == 0


def test_delay_is_capped() -> None:
    tracker = RestartTracker(RestartLimits(max_restarts=100, window=1e9, max_delay=30.0))
    delays = [tracker.exited(1, float(i), "exit status 1") for i in range(10)]
    assert [d.delay for d in delays if isinstance(d, Restart)][-3:] == [30.0, 30.0, 30.0]


def test_limits_are_validated() -> None:
    with pytest.raises(ValueError):
        RestartLimits(max_restarts=-1)
    with pytest.raises(ValueError):
        RestartLimits(window=0)


def test_describe_exit() -> None:
    assert describe_exit(1, None) == "exit status 1"
    assert describe_exit(None, 9) == "killed by signal 9 (SIGKILL)"


class FakeWorker:
    def __init__(self, pid: int) -> None:
        self.pid: int | None = pid
        self.signals: list[int] = []

    def signal(self, signum: int) -> None:
        self.signals.append(signum)


class Spawner:
    def __init__(self) -> None:
        self.started: list[tuple[int, FakeWorker]] = []

    def __call__(self, slot: int) -> FakeWorker:
        worker = FakeWorker(1000 + len(self.started))
        self.started.append((slot, worker))
        return worker


def make_pool(
    count: int = 2, limits: RestartLimits | None = None
) -> tuple[WorkerPool, Clock, Spawner, list[str]]:
    clock, spawner, gave_up = Clock(), Spawner(), []
    pool = WorkerPool(
        count, spawner, clock, limits=limits, stop_timeout=40.0, on_give_up=gave_up.append
    )
    pool.start()
    return pool, clock, spawner, gave_up


def test_a_dead_worker_is_restarted_after_the_backoff() -> None:
    """The slot stays empty for the backoff delay, then a new process takes it; the other
    worker is untouched."""
    pool, clock, spawner, _ = make_pool()
    assert [slot for slot, _ in spawner.started] == [1, 2]
    pool.exited(1, None, signal.SIGKILL)
    assert sorted(pool.workers) == [2]
    clock.advance(0.49)
    assert len(spawner.started) == 2
    clock.advance(0.01)
    assert [slot for slot, _ in spawner.started] == [1, 2, 1]
    assert pool.workers[1] is spawner.started[2][1]


def test_a_crash_loop_ends_the_service_once() -> None:
    pool, clock, spawner, gave_up = make_pool(limits=RestartLimits(max_restarts=2, window=60))
    for _ in range(2):
        pool.exited(1, 1, None)
        clock.advance(20)
    pool.exited(1, 1, None)
    assert gave_up == [
        "worker 1 failed 3 times in 60 s (last: exit status 1); "
        "more than --worker-restarts 2/60 allows"
    ]
    assert len(spawner.started) == 4  # 2 at start, 2 restarts, none after giving up
    clock.advance(100)
    assert len(spawner.started) == 4
    pool.exited(2, 1, None)  # the service is stopping anyway; nothing more happens
    assert len(gave_up) == 1


def test_stop_drains_with_sigterm_and_never_restarts() -> None:
    """stop() sends SIGTERM to every worker and fires only when all have exited; a restart
    that was pending is cancelled."""
    pool, clock, spawner, _ = make_pool(count=3)
    pool.exited(3, 1, None)  # restart pending
    d = pool.stop()
    assert [w.signals for _, w in spawner.started] == [[signal.SIGTERM], [signal.SIGTERM], []]
    fired: list[object] = []
    d.addCallback(fired.append)
    pool.exited(1, 0, None)
    assert not fired
    pool.exited(2, 0, None)
    assert fired == [None]
    clock.advance(100)
    assert len(spawner.started) == 3


def test_stop_kills_workers_that_outstay_the_timeout() -> None:
    pool, clock, spawner, _ = make_pool()
    d = pool.stop()
    fired: list[object] = []
    d.addCallback(fired.append)
    clock.advance(39.9)
    assert spawner.started[0][1].signals == [signal.SIGTERM]
    clock.advance(0.1)
    assert [w.signals for _, w in spawner.started] == [[signal.SIGTERM, signal.SIGKILL]] * 2
    pool.exited(1, None, signal.SIGKILL)
    pool.exited(2, None, signal.SIGKILL)
    assert fired == [None]


def test_signal_all_reaches_every_running_worker() -> None:
    pool, _, spawner, _ = make_pool(count=3)
    pool.exited(2, 0, None)
    assert pool.signal_all(signal.SIGHUP) == 2
    assert [w.signals for _, w in spawner.started] == [[signal.SIGHUP], [], [signal.SIGHUP]]


def test_a_worker_that_cannot_be_spawned_counts_as_a_failure() -> None:
    """spawnProcess itself failing (say, the interpreter is not executable by --uid) is
    retried with backoff like a crash, and ends in a crash loop, not in an empty slot."""
    clock, gave_up = Clock(), []
    attempts: list[int] = []

    def spawn(slot: int) -> FakeWorker:
        attempts.append(slot)
        raise PermissionError(13, "Permission denied")

    pool = WorkerPool(
        1, spawn, clock, limits=RestartLimits(max_restarts=2), on_give_up=gave_up.append
    )
    pool.start()
    clock.advance(0.5)
    clock.advance(1.0)
    assert attempts == [1, 1, 1]
    assert gave_up == [
        "worker 1 failed 3 times in 60 s (last: could not be started: [Errno 13] Permission "
        "denied); more than --worker-restarts 2/60 allows"
    ]

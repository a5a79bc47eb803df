"""When to restart a worker that died, when to give up, and the pool that does it.

:class:`RestartTracker` is told "worker N exited at time T" and answers either
:class:`Restart` (after how many seconds) or :class:`GiveUp` (a crash loop, with the reason
as one line). The caller owns the clock (``reactor.callLater``) and the processes; the
decision is pure, so the rules are tested without either.

:class:`WorkerPool` applies the rules: it starts workers through a spawn function, restarts
them with ``callLater`` on an injected clock, and stops them by signals; tests drive it with
``Clock`` and fake processes.

The rules, per worker slot:

- each unexpected exit is a failure at its time; failures older than ``window`` seconds are
  forgotten;
- the next start waits ``initial_delay * 2 ** (recent failures - 1)`` seconds, at most
  ``max_delay`` (0.5 s, 1 s, 2 s, ...);
- more than ``max_restarts`` failures within ``window`` seconds is a crash loop: the whole
  service stops with that reason (as systemd's ``StartLimitBurst``/``StartLimitIntervalSec``).
"""

from __future__ import annotations

import signal
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger, LogLevel

__all__ = [
    "STOP_MARGIN",
    "GiveUp",
    "Restart",
    "RestartLimits",
    "RestartTracker",
    "WorkerPool",
    "describe_exit",
]

#: Seconds a worker may take to drain beyond ``--shutdown-grace`` before it is killed.
STOP_MARGIN = 10.0


@dataclass(frozen=True)
class RestartLimits:
    """How often a worker may fail before the service gives up, and how restarts back off."""

    max_restarts: int = 5
    window: float = 60.0
    initial_delay: float = 0.5
    max_delay: float = 30.0

    def __post_init__(self) -> None:
        if self.max_restarts < 0:
            raise ValueError("max_restarts must be at least 0")
        if self.window <= 0:
            raise ValueError("window must be more than 0 seconds")
        if self.initial_delay < 0 or self.max_delay < self.initial_delay:
            raise ValueError("need 0 <= initial_delay <= max_delay")


@dataclass(frozen=True)
class Restart:
    """Start the worker again after ``delay`` seconds."""

    delay: float
    failures: int


@dataclass(frozen=True)
class GiveUp:
    """A crash loop: stop the whole service; ``reason`` is one line for the log."""

    reason: str


@dataclass
class RestartTracker:
    """Failure history of every worker slot, and the decision after each exit."""

    limits: RestartLimits = field(default_factory=RestartLimits)
    _failures: dict[int, deque[float]] = field(default_factory=dict)

    def failures(self, slot: int, now: float) -> int:
        """Failures of ``slot`` within the window ending at ``now``."""
        recent = self._failures.get(slot)
        if recent is None:
            return 0
        while recent and recent[0] <= now - self.limits.window:
            recent.popleft()
        return len(recent)

    def exited(self, slot: int, now: float, how: str) -> Restart | GiveUp:
        """Worker ``slot`` exited unexpectedly at ``now`` (``how``: "exit status 1", ...)."""
        self._failures.setdefault(slot, deque()).append(now)
        count = self.failures(slot, now)
        limits = self.limits
        if count > limits.max_restarts:
            return GiveUp(
                f"worker {slot} failed {count} times in {limits.window:g} s "
                f"(last: {how}); more than --worker-restarts "
                f"{limits.max_restarts}/{limits.window:g} allows"
            )
        delay = min(limits.initial_delay * 2 ** (count - 1), limits.max_delay)
        return Restart(delay, count)


def describe_exit(exit_code: int | None, signum: int | None) -> str:
    """How a process ended, as one phrase: "exit status 1", "killed by signal 9 (SIGKILL)"."""
    if signum is not None:
        try:
            name = f" ({signal.Signals(signum).name})"
        except ValueError:
            name = ""
        return f"killed by signal {signum}{name}"
    return f"exit status {exit_code}"


class WorkerHandle(Protocol):
    """What the pool needs of a running worker."""

    pid: int | None

    def signal(self, signum: int) -> None: ...


Spawn = Callable[[int], WorkerHandle]


class WorkerPool:
    """Keeps ``count`` workers running; restarts with backoff; gives up on a crash loop.

    :param spawn: starts worker ``slot`` (1..count) and returns its handle; the caller reports
        its end with :meth:`exited`.
    :param reactor: an ``IReactorTime`` (a ``Clock`` in tests).
    :param on_give_up: called once with the reason when a crash loop ends the service.
    """

    log = Logger(namespace="slimta_tx.workers")

    def __init__(
        self,
        count: int,
        spawn: Spawn,
        reactor: IReactorTime,
        limits: RestartLimits | None = None,
        stop_timeout: float = 30.0 + STOP_MARGIN,
        on_give_up: Callable[[str], object] | None = None,
    ) -> None:
        self.count = count
        self.spawn = spawn
        self.reactor = reactor
        self.tracker = RestartTracker(limits or RestartLimits())
        self.stop_timeout = stop_timeout
        self.on_give_up = on_give_up
        self.workers: dict[int, WorkerHandle] = {}
        self.pending: dict[int, Any] = {}  # slot -> DelayedCall of its restart
        self.stopping = False
        self.gave_up: str | None = None
        self._stopped: list[Deferred[None]] = []
        self._kill_timer: Any = None

    def start(self) -> None:
        for slot in range(1, self.count + 1):
            self._start(slot)

    def _start(self, slot: int) -> None:
        self.pending.pop(slot, None)
        if self.stopping:
            return
        try:
            handle = self.spawn(slot)
        except Exception as e:  # e.g. the interpreter cannot be run as --uid
            self._failed(slot, None, f"could not be started: {e}")
            return
        self.workers[slot] = handle
        self.log.info("worker {worker} started (pid {pid})", worker=slot, pid=handle.pid)

    def exited(self, slot: int, exit_code: int | None, signum: int | None) -> None:
        """Worker ``slot`` ended (``exit_code`` or ``signum``, as the process reports)."""
        handle = self.workers.pop(slot, None)
        how = describe_exit(exit_code, signum)
        pid = handle.pid if handle is not None else None
        if self.stopping:
            level = LogLevel.info if exit_code == 0 else LogLevel.warn
            self.log.emit(
                level, "worker {worker} (pid {pid}) stopped: {how}", worker=slot, pid=pid, how=how
            )
            self._check_stopped()
            return
        self._failed(slot, pid, how)

    def _failed(self, slot: int, pid: int | None, how: str) -> None:
        decision = self.tracker.exited(slot, self.reactor.seconds(), how)
        if isinstance(decision, GiveUp):
            self.log.critical("{reason}; stopping the service", reason=decision.reason)
            if self.gave_up is None:
                self.gave_up = decision.reason
                if self.on_give_up is not None:
                    self.on_give_up(decision.reason)
            return
        self.log.warn(
            "worker {worker} (pid {pid}) ended unexpectedly: {how}; restarting in {delay:g} s",
            worker=slot,
            pid=pid,
            how=how,
            delay=decision.delay,
        )
        self.pending[slot] = self.reactor.callLater(decision.delay, self._start, slot)

    def signal_all(self, signum: int) -> int:
        """Send ``signum`` to every running worker; returns how many got it."""
        sent = 0
        for handle in list(self.workers.values()):
            try:
                handle.signal(signum)
                sent += 1
            except Exception:
                self.log.failure("could not signal worker (pid {pid})", pid=handle.pid)
        return sent

    def stop(self) -> Deferred[None]:
        """SIGTERM every worker (each drains); SIGKILL what is left after ``stop_timeout``;
        fire when all have exited. No restart happens from here on."""
        self.stopping = True
        for call in self.pending.values():
            if call.active():
                call.cancel()
        self.pending.clear()
        if not self.workers:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._stopped.append(d)
        self.signal_all(signal.SIGTERM)
        if self._kill_timer is None:
            self._kill_timer = self.reactor.callLater(self.stop_timeout, self._kill_rest)
        return d

    def _kill_rest(self) -> None:
        self._kill_timer = None
        if self.workers:
            self.log.error(
                "{count} worker(s) still running {seconds:g} s after SIGTERM; killing them",
                count=len(self.workers),
                seconds=self.stop_timeout,
            )
            self.signal_all(signal.SIGKILL)

    def _check_stopped(self) -> None:
        if self.workers:
            return
        if self._kill_timer is not None and self._kill_timer.active():
            self._kill_timer.cancel()
        self._kill_timer = None
        stopped, self._stopped = self._stopped, []
        for d in stopped:
            d.callback(None)

"""When to restart a worker that died, and when to give up (sans-I/O: no clock, no process).

:class:`RestartTracker` is told "worker N exited at time T" and answers either
:class:`Restart` (after how many seconds) or :class:`GiveUp` (a crash loop, with the reason
as one line). The caller owns the clock (``reactor.callLater``) and the processes; the
decision is pure, so the rules are tested without either.

The rules, per worker slot:

- each unexpected exit is a failure at its time; failures older than ``window`` seconds are
  forgotten;
- the next start waits ``initial_delay * 2 ** (recent failures - 1)`` seconds, at most
  ``max_delay`` (0.5 s, 1 s, 2 s, ...);
- more than ``max_restarts`` failures within ``window`` seconds is a crash loop: the whole
  service stops with that reason (as systemd's ``StartLimitBurst``/``StartLimitIntervalSec``).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

__all__ = ["GiveUp", "Restart", "RestartLimits", "RestartTracker", "describe_exit"]


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


def describe_exit(exit_code: int | None, signal: int | None) -> str:
    """ "exit status 1", "killed by signal 9 (SIGKILL)" or "exit status 0" as one phrase."""
    if signal is not None:
        import signal as signals

        try:
            name = f" ({signals.Signals(signal).name})"
        except ValueError:
            name = ""
        return f"killed by signal {signal}{name}"
    return f"exit status {exit_code}"

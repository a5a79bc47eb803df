"""Counting failed AUTH attempts per client address, without I/O (the caller passes the time)."""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass

__all__ = ["AuthLimits", "FailureTracker"]


@dataclass(frozen=True)
class AuthLimits:
    """How hard guessing passwords is made.

    :ivar failure_delay: seconds the first ``535`` is held back; it doubles with each further
        failure (counted per connection or per address, whichever is higher).
    :ivar max_failure_delay: the delay never grows past this.
    :ivar max_failures_per_connection: failures before ``421 4.7.0`` and a close.
    :ivar max_failures_per_address: failures from one address within ``address_window``
        seconds before that address gets ``421 4.7.0`` at every AUTH until they age out.
    :ivar tracked_addresses: addresses remembered at most (the oldest are forgotten first).
    """

    failure_delay: float = 1.0
    max_failure_delay: float = 16.0
    max_failures_per_connection: int = 5
    max_failures_per_address: int = 10
    address_window: float = 900.0
    tracked_addresses: int = 10_000

    def __post_init__(self) -> None:
        if self.failure_delay < 0 or self.max_failure_delay < 0:
            raise ValueError("AUTH failure delays must be 0 or more seconds")
        if self.max_failures_per_connection < 1 or self.max_failures_per_address < 1:
            raise ValueError("AUTH failure limits must be 1 or more")
        if self.address_window <= 0 or self.tracked_addresses < 1:
            raise ValueError("address_window and tracked_addresses must be positive")

    def delay(self, failures: int) -> float:
        """Seconds to hold back the ``535`` after the ``failures``-th failure."""
        if failures < 1 or self.failure_delay == 0:
            return 0.0
        return float(min(self.failure_delay * 2 ** min(failures - 1, 30), self.max_failure_delay))


class FailureTracker:
    """Recent failure times per address, bounded in memory."""

    def __init__(self, limits: AuthLimits) -> None:
        self.limits = limits
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def _recent(self, address: str, now: float) -> deque[float] | None:
        times = self._failures.get(address)
        if times is None:
            return None
        horizon = now - self.limits.address_window
        while times and times[0] <= horizon:
            times.popleft()
        if not times:
            del self._failures[address]
            return None
        return times

    def count(self, address: str, now: float) -> int:
        times = self._recent(address, now)
        return len(times) if times is not None else 0

    def record(self, address: str, now: float) -> int:
        """Add a failure; return the address's count within the window."""
        times = self._recent(address, now)
        if times is None:
            times = self._failures[address] = deque(maxlen=self.limits.max_failures_per_address)
        times.append(now)
        self._failures.move_to_end(address)
        while len(self._failures) > self.limits.tracked_addresses:
            self._failures.popitem(last=False)
        return len(times)

    def blocked(self, address: str, now: float) -> bool:
        return self.count(address, now) >= self.limits.max_failures_per_address

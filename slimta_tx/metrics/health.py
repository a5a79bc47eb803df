"""Readiness: what ``GET /healthz`` answers, and the ``slimta_tx_bus_ready`` gauge.

Ready means: the service runs (its listeners are bound: they fail start-up otherwise), it is
not shutting down, and the bus says it can take mail (:class:`slimta_tx.interfaces.IReadiness`:
the Maildir is writable, the relay's next hop answers, the AMQP bus is connected). A bus
without a ``ready`` method counts as ready. Each check is a Deferred of None (ready) or a short
reason, bounded by :data:`CHECK_TIMEOUT`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.application.internet import TimerService
from twisted.internet.defer import Deferred, TimeoutError, maybeDeferred, succeed
from twisted.python.failure import Failure

if TYPE_CHECKING:  # pragma: no cover
    from slimta_tx.metrics.sink import EdgeMetrics

__all__ = [
    "CHECK_TIMEOUT",
    "REPORT_INTERVAL",
    "Check",
    "ReadinessReporter",
    "bus_readiness",
    "edge_readiness",
]

#: Seconds a readiness check may take before it counts as "not ready".
CHECK_TIMEOUT = 5.0
#: Seconds between two updates of ``slimta_tx_bus_ready``.
REPORT_INTERVAL = 2.0

#: A readiness check: () -> Deferred firing with None (ready) or the reason it is not.
Check = Callable[[], "Deferred[str | None]"]


def bus_readiness(bus: Any, reactor: Any, timeout: float = CHECK_TIMEOUT) -> Deferred[str | None]:
    """Ask ``bus.ready()`` (if it has one); an error or no answer in time is a reason."""
    ready = getattr(bus, "ready", None)
    if not callable(ready):
        return succeed(None)
    d: Deferred[Any] = maybeDeferred(ready)
    d.addTimeout(timeout, reactor)

    def answer(reason: object) -> str | None:
        return str(reason)[:200] if reason else None

    def failed(failure: Failure) -> str:
        if failure.check(TimeoutError):
            return f"bus readiness check timed out after {timeout:g} s"
        kind = failure.type.__name__ if failure.type else "error"
        return f"bus readiness check failed: {kind}"

    return d.addCallbacks(answer, failed)


def edge_readiness(service: Any, reactor: Any, timeout: float = CHECK_TIMEOUT) -> Check:
    """The check of one process's :class:`~slimta_tx.service.EdgeService`."""

    def check() -> Deferred[str | None]:
        if not service.running:  # also while it drains: stopService ran
            return succeed("not running")
        edge = service.edge
        for child in service:
            if not child.running:
                return succeed(f"{child.name or type(child).__name__} not running")
        return bus_readiness(edge.bus, reactor, timeout)

    return check


class ReadinessReporter(TimerService):
    """Every :data:`REPORT_INTERVAL` seconds, sets ``slimta_tx_bus_ready`` from the bus's
    answer (with ``--workers``, the parent's /healthz reads it from every worker)."""

    def __init__(
        self, bus: Any, metrics: EdgeMetrics, reactor: Any, interval: float = REPORT_INTERVAL
    ) -> None:
        super().__init__(interval, self.check)
        self.clock = reactor
        self.bus = bus
        self.metrics = metrics
        self._pending = False

    def check(self) -> None:
        if self._pending:
            return
        self._pending = True

        def report(reason: str | None) -> None:
            self._pending = False
            self.metrics.bus_ready(reason is None)

        bus_readiness(self.bus, self.clock, min(CHECK_TIMEOUT, self.step * 2)).addCallback(report)

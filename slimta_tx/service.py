"""Policy + bus + endpoint descriptions -> a service that twistd (or any app) can run."""

from __future__ import annotations

import signal
from collections.abc import Callable, Sequence
from typing import Any

from twisted.application import strports
from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred
from twisted.internet.error import CannotListenError
from twisted.logger import Logger

from slimta_tx.capacity import with_backlog
from slimta_tx.factory import SmtpEdge

__all__ = ["EdgeService", "SighupReload"]


class SighupReload(Service):
    """While running, SIGHUP calls every registered reload callback, in the reactor thread.

    One handler for the whole process, so certificates, lists and anything else reload
    together whatever order features were configured in. The handler is installed once the
    reactor runs, chains to the handler it replaced, and is removed when the service stops.
    """

    log = Logger()

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self.callbacks: list[Callable[[], object]] = []
        self._previous: list[Any] = []

    def add(self, callback: Callable[[], object]) -> None:
        self.callbacks.append(callback)

    def reload(self) -> None:
        """What SIGHUP does: each callback runs even if an earlier one fails."""
        for callback in self.callbacks:
            try:
                callback()
            except Exception:
                self.log.failure("reload callback {callback!r} failed", callback=callback)

    def startService(self) -> None:
        super().startService()
        if hasattr(signal, "SIGHUP"):
            self.reactor.callWhenRunning(self._install)

    def _install(self) -> None:
        if not self.running:
            return
        previous = signal.getsignal(signal.SIGHUP)

        def on_sighup(signum: int, frame: Any) -> None:
            self.reactor.callFromThread(self.reload)
            if callable(previous):
                previous(signum, frame)

        self._previous.append(signal.signal(signal.SIGHUP, on_sighup))

    def stopService(self) -> Any:
        while self._previous:
            signal.signal(signal.SIGHUP, self._previous.pop())
        return super().stopService()


class EdgeService(MultiService):
    """Listens on each endpoint description; on stop, drains sessions through ``edge.close``.

    Listening uses ``strports.service``, so a port that cannot be bound fails start-up
    (``twistd`` exits 1 and says why) instead of running with no listener. A description
    without ``backlog=`` gets :data:`slimta_tx.capacity.DEFAULT_LISTEN_BACKLOG`.
    """

    #: Under ``twistd`` (set by ``twistd slimta``): a port that cannot be bound ends start-up
    #: with one line saying why and exit status 1, instead of a traceback.
    exit_on_listen_error = False

    def __init__(self, edge: SmtpEdge, listen: Sequence[str], reactor: Any = None) -> None:
        super().__init__()
        self.edge = edge
        self.reactor = reactor if reactor is not None else edge.reactor
        self.reloads: SighupReload | None = None
        for description in listen:
            listener = strports.service(with_backlog(description), edge, reactor=reactor)
            listener.setServiceParent(self)

    def on_reload(self, callback: Callable[[], object]) -> None:
        """Call ``callback`` on SIGHUP (certificates, lists, ...)."""
        if self.reloads is None:
            self.reloads = SighupReload(self.reactor)
            self.reloads.setServiceParent(self)
        self.reloads.add(callback)

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except CannotListenError as e:
            if not self.exit_on_listen_error:
                raise
            raise SystemExit(f"slimta: {e}") from None

    def stopService(self) -> Deferred[None]:
        d: Deferred[Any] = super().stopService()  # stops listening first
        return d.addCallback(lambda _: self.edge.close())

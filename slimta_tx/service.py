"""Policy + bus + endpoint descriptions -> a service that twistd (or any app) can run."""

from __future__ import annotations

import signal
from collections.abc import Callable, Sequence
from typing import Any

from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred
from twisted.internet.error import CannotListenError
from twisted.logger import ILogObserver, Logger
from twisted.python.components import Componentized

from slimta_tx.factory import SmtpEdge
from slimta_tx.proxy import listener_service

__all__ = ["EdgeService", "SighupReload", "offer_log_observer"]


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


def offer_log_observer(parent: Any, factory: Callable[[], object] | None) -> None:
    """Give twistd's Application ``factory()`` as its ILogObserver component.

    twistd adopts the service before it sets up logging, and then asks its Application for an
    ILogObserver component: this is where a service's own observer (slimta_tx/cli/logs.py)
    goes. Nothing happens without a factory, outside an Application, or when it has one.
    """
    if factory is not None and isinstance(parent, Componentized):
        if parent.getComponent(ILogObserver) is None:
            parent.setComponent(ILogObserver, factory())


class EdgeService(MultiService):
    """Listens on each endpoint description; on stop, drains sessions through ``edge.close``.

    Listening uses ``strports.service``, so a port that cannot be bound fails start-up
    (``twistd`` exits 1 and says why) instead of running with no listener. A description
    without ``backlog=`` gets :data:`slimta_tx.capacity.DEFAULT_LISTEN_BACKLOG`.
    """

    #: Under ``twistd`` (set by ``twistd slimta``): a port that cannot be bound ends start-up
    #: with one line saying why and exit status 1, instead of a traceback.
    exit_on_listen_error = False
    #: Set by ``twistd slimta`` (slimta_tx/cli/logs.py): builds the log observer twistd
    #: installs, given to twistd's Application as its ILogObserver component.
    log_observer_factory: Callable[[], object] | None = None

    def __init__(self, edge: SmtpEdge, listen: Sequence[str], reactor: Any = None) -> None:
        super().__init__()
        self.edge = edge
        self.reactor = reactor if reactor is not None else edge.reactor
        self.reloads: SighupReload | None = None
        for description in listen:
            # haproxy:... gets slimta_tx's PROXY layer (slimta_tx/proxy.py), not Twisted's.
            listener_service(description, edge, reactor).setServiceParent(self)

    def on_reload(self, callback: Callable[[], object]) -> None:
        """Call ``callback`` on SIGHUP (certificates, lists, ...)."""
        if self.reloads is None:
            self.reloads = SighupReload(self.reactor)
            self.reloads.setServiceParent(self)
        self.reloads.add(callback)

    def setServiceParent(self, parent: Any) -> None:
        offer_log_observer(parent, self.log_observer_factory)
        super().setServiceParent(parent)

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except (CannotListenError, OSError, OverflowError) as e:
            # OSError: a unix: socket's lock file; OverflowError: a port past 65535.
            if not self.exit_on_listen_error:
                raise
            reason = e if isinstance(e, CannotListenError) else f"cannot listen: {e}"
            raise SystemExit(f"slimta: {reason}") from None

    def stopService(self) -> Deferred[None]:
        d: Deferred[Any] = super().stopService()  # stops listening first
        return d.addCallback(lambda _: self.edge.close())

"""Policy + bus + endpoint descriptions -> a service that twistd (or any app) can run."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from twisted.application import strports
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred
from twisted.internet.error import CannotListenError

from slimta_tx.factory import SmtpEdge

__all__ = ["EdgeService"]


class EdgeService(MultiService):
    """Listens on each endpoint description; on stop, drains sessions through ``edge.close``.

    Listening uses ``strports.service``, so a port that cannot be bound fails start-up
    (``twistd`` exits 1 and says why) instead of running with no listener.
    """

    #: Under ``twistd`` (set by ``twistd slimta``): a port that cannot be bound ends start-up
    #: with one line saying why and exit status 1, instead of a traceback.
    exit_on_listen_error = False

    def __init__(self, edge: SmtpEdge, listen: Sequence[str], reactor: Any = None) -> None:
        super().__init__()
        self.edge = edge
        for description in listen:
            strports.service(description, edge, reactor=reactor).setServiceParent(self)

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

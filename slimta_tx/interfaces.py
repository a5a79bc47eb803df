"""The zope interfaces users implement: the bus (where accepted mail goes)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from zope.interface import Interface

if TYPE_CHECKING:  # pragma: no cover
    from twisted.internet.defer import Deferred

    from slimta_tx.envelope import Envelope
    from slimta_tx.reply import Reply

__all__ = ["IBus"]


class IBus(Interface):  # type: ignore[misc]
    """Takes each accepted message; its reply is the client's reply to the final dot.

    A bus promises: a 2xx reply means the message is on stable storage (written and fsynced)
    or confirmed by the next hop. Anything it cannot promise is a 4xx. An exception (or a
    failed Deferred) becomes ``451 4.3.0`` and is logged.

    The bus must finish reading ``envelope.message`` before its Deferred fires: the edge
    discards the spooled body then.
    """

    def send(envelope: Envelope) -> Deferred[Reply]:  # type: ignore[misc]
        """Store or forward ``envelope``; fire with the reply for the client."""

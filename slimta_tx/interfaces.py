"""The zope interfaces users implement: the bus (where accepted mail goes)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from zope.interface import Interface

if TYPE_CHECKING:  # pragma: no cover
    from twisted.internet.defer import Deferred

    from slimta_tx.envelope import Envelope

__all__ = ["IBus", "IReadiness"]


class IBus(Interface):
    """Takes each accepted message; its reply is the client's reply to the final dot.

    A bus promises: a 2xx reply means the message is on stable storage (written and fsynced)
    or confirmed by the next hop. Anything it cannot promise is a 4xx. An exception (or a
    failed Deferred) becomes ``451 4.3.0`` and is logged.

    The bus must finish reading ``envelope.message`` before its Deferred fires: the edge
    discards the spooled body then.

    The result is one :class:`~slimta_tx.reply.Reply` for every recipient, or a sequence of
    replies, one per recipient in ``envelope.recipients`` order (see
    :mod:`slimta_tx.results`): an LMTP client hears each, an SMTP client one summary.
    """

    def send(envelope: Envelope) -> Deferred[Any]:
        """Store or forward ``envelope``; fire with the reply (or replies) for the client:
        a ``Reply`` or a sequence of them (``slimta_tx.results.BusResult``; typed ``Any`` here
        so that a bus declaring ``Deferred[Reply]`` or ``Deferred[list[Reply]]`` fits)."""


class IReadiness(Interface):
    """Optional, beside :class:`IBus`: whether the bus can take mail now (``/healthz`` of
    ``twistd slimta --metrics``, see docs/metrics.md). A bus without it counts as ready."""

    def ready() -> Any:
        """None when ready, else a short reason (``"broker not connected"``); or a Deferred
        firing with one of those. Cheap: a load balancer may ask every second or two."""

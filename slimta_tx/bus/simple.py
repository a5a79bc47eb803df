"""A bus that stores nothing: for benchmarks of the protocol alone. Never for real mail."""

from __future__ import annotations

from twisted.internet.defer import Deferred, succeed
from zope.interface import implementer

from slimta_tx.envelope import Envelope
from slimta_tx.interfaces import IBus
from slimta_tx.reply import Reply

__all__ = ["DiscardBus"]


@implementer(IBus)
class DiscardBus:
    """Answers 250 and throws the message away (a 250 here promises nothing)."""

    def __init__(self) -> None:
        self.count = 0

    def send(self, envelope: Envelope) -> Deferred[Reply]:
        self.count += 1
        return succeed(Reply("250", f"Message discarded as {envelope.queue_id}", "2.6.0"))

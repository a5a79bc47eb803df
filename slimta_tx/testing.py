"""A kit for testing code built on slimta_tx without a network.

- :class:`RecordingBus` keeps what it receives and answers with a reply you choose.
- :class:`FailingBus` raises, to test the 451 path.
- :class:`PendingBus` leaves each delivery pending until the test fires it.
- :func:`connect` runs one edge session over a ``StringTransport`` with a ``Clock``.
- :func:`parse_replies` splits wire bytes into ``(code, text)`` replies.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.testing import StringTransport
from zope.interface import implementer

from slimta_tx.envelope import Envelope
from slimta_tx.interfaces import IBus
from slimta_tx.reply import Reply

__all__ = [
    "FailingBus",
    "PendingBus",
    "ReceivedMessage",
    "RecordingBus",
    "connect",
    "parse_replies",
]


@dataclass
class ReceivedMessage:
    envelope: Envelope
    data: bytes = field(repr=False)


@implementer(IBus)
class RecordingBus:
    """Keeps each message (envelope and bytes) in :attr:`messages`; replies with ``reply``."""

    def __init__(self, reply: Reply | None = None) -> None:
        self.reply = reply
        self.messages: list[ReceivedMessage] = []

    def send(self, envelope: Envelope) -> Deferred[Reply]:
        assert envelope.message is not None
        self.messages.append(ReceivedMessage(envelope, envelope.message.read()))
        reply = self.reply or Reply("250", f"Message queued as {envelope.queue_id}", "2.6.0")
        return succeed(reply.copy())


@implementer(IBus)
class FailingBus:
    """Raises ``error`` for every message (the edge answers 451 4.3.0)."""

    def __init__(self, error: Exception | None = None) -> None:
        self.error = error or RuntimeError("bus failure (test)")

    def send(self, envelope: Envelope) -> Deferred[Reply]:
        return fail(self.error)


@implementer(IBus)
class PendingBus:
    """Each message waits in :attr:`pending` as ``(envelope, data, deferred)``."""

    def __init__(self) -> None:
        self.pending: list[tuple[Envelope, bytes, Deferred[Reply]]] = []

    def send(self, envelope: Envelope) -> Deferred[Reply]:
        assert envelope.message is not None
        d: Deferred[Reply] = Deferred()
        self.pending.append((envelope, envelope.message.read(), d))
        return d


_REPLY_LINE = re.compile(rb"^(\d{3})([ -])(.*)$")


def parse_replies(data: bytes) -> list[tuple[str, str]]:
    """``b"250-a\\r\\n250 b\\r\\n354 go\\r\\n"`` -> ``[("250", "a\\nb"), ("354", "go")]``."""
    replies: list[tuple[str, str]] = []
    lines: list[str] = []
    for raw in data.split(b"\r\n"):
        if not raw:
            continue
        match = _REPLY_LINE.match(raw)
        if match is None:
            raise ValueError(f"not an SMTP reply line: {raw!r}")
        lines.append(match.group(3).decode("utf-8"))
        if match.group(2) == b" ":
            replies.append((match.group(1).decode("ascii"), "\n".join(lines)))
            lines = []
    return replies


def connect(
    edge: object, peer: tuple[str, int] = ("192.0.2.1", 40000)
) -> tuple[object, StringTransport]:
    """Build a protocol from ``edge`` and connect it to a fresh ``StringTransport``."""
    from twisted.internet.address import IPv4Address, IPv6Address

    host = peer[0]
    address = (
        IPv6Address("TCP", host, peer[1]) if ":" in host else IPv4Address("TCP", host, peer[1])
    )
    local = IPv4Address("TCP", "127.0.0.1", 25)
    proto = edge.buildProtocol(address)  # type: ignore[attr-defined]
    transport = StringTransport(hostAddress=local, peerAddress=address)
    proto.makeConnection(transport)
    return proto, transport

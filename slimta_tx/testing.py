"""A kit for testing code built on slimta_tx without a network, under pytest or trial.

- :class:`RecordingBus` keeps what it receives and answers with a reply you choose.
- :class:`FailingBus` fails every message with ``451 4.3.0``, to test the retry path.
- :class:`PendingBus` leaves each delivery pending until the test fires it.
- :func:`connect` runs one edge session over a ``StringTransport``; its timers run on a
  ``Clock`` (the edge's, or a new one), never on the real reactor.
- :func:`parse_replies` splits wire bytes into ``(code, text)`` replies.

Nothing here logs an error or leaves a timer in the reactor, so ``trial``'s checks for logged
errors and a dirty reactor pass (docs/embedding.md shows tests with both test runners).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, cast

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from zope.interface import implementer

from slimta_tx.envelope import Envelope
from slimta_tx.interfaces import IBus
from slimta_tx.reply import Reply

if TYPE_CHECKING:  # pragma: no cover
    from slimta_tx.factory import SmtpEdge
    from slimta_tx.protocol import ESMTPServerProtocol

__all__ = [
    "BUS_FAILURE",
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


#: What the edge answers when a bus fails (see ``slimta_tx.protocol.TEMPFAIL``).
BUS_FAILURE = Reply("451", "Temporary local problem, try again later", "4.3.0")


@implementer(IBus)
class FailingBus:
    """Every message fails: the client gets ``451 4.3.0``, as from a bus that broke.

    By default the bus answers that reply itself, so nothing is logged: a trial test is not
    failed by a logged error. Give ``error`` to raise it instead and test the path where a bus
    raises; the edge then logs the failure, as it does for any bus (under trial, call
    ``self.flushLoggedErrors(type(error))`` in the test). Each envelope is kept in
    :attr:`envelopes`.
    """

    def __init__(self, error: Exception | None = None, reply: Reply | None = None) -> None:
        self.error = error
        self.reply = reply or BUS_FAILURE
        self.envelopes: list[Envelope] = []

    def send(self, envelope: Envelope) -> Deferred[Reply]:
        self.envelopes.append(envelope)
        if self.error is not None:
            return fail(self.error)
        return succeed(self.reply.copy())


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
    edge: SmtpEdge,
    peer: tuple[str, int] = ("192.0.2.1", 40000),
    clock: Clock | None = None,
) -> tuple[ESMTPServerProtocol, StringTransport]:
    """Build a session from ``edge``, connected to a fresh ``StringTransport`` from ``peer``.

    The session's timers (the idle timeout, closing a connection) run on ``clock``; by default
    on the edge's reactor when that is a ``Clock`` (``SmtpEdge(bus, policy, reactor=Clock())``),
    else on a new ``Clock``, so that nothing is left in the real reactor when the test ends.
    Advance it (``proto.clock.advance(300)``) to test timeouts.

    The session ends when the test calls ``proto.connectionLost()``, as the network would; a
    ``StringTransport`` never does it by itself (after ``QUIT``, ``transport.disconnecting``
    is set).
    """
    host = peer[0]
    address = (
        IPv6Address("TCP", host, peer[1]) if ":" in host else IPv4Address("TCP", host, peer[1])
    )
    local = IPv4Address("TCP", "127.0.0.1", 25)
    # As the reactor does: the edge may turn the connection away (its connection gate) or hold
    # it for accept(); only a session has timers to move onto the Clock.
    from slimta_tx.protocol import ESMTPServerProtocol as _Session

    proto = cast("ESMTPServerProtocol", edge.buildProtocol(address))
    if isinstance(proto, _Session):
        if clock is not None:
            proto.clock = clock
        elif not isinstance(proto.clock, Clock):
            proto.clock = Clock()
    transport = StringTransport(hostAddress=local, peerAddress=address)
    proto.makeConnection(transport)
    return proto, transport

"""The seed's socket-style API: ``new(socket, bus)`` and ``accept()``.

Twisted accepts connections for you, and that stays the normal path. These exist for code
written in the seed's style:

- :func:`new` / :meth:`SmtpEdge.adopt <slimta_tx.factory.SmtpEdge.adopt>` serve a socket that
  is already listening (made by your code, inherited from systemd, ...), adopted into the
  reactor with ``adoptStreamPort``.
- :class:`AcceptQueue` backs :meth:`SmtpEdge.accept <slimta_tx.factory.SmtpEdge.accept>`: once
  it is called, new connections wait (unread, no banner) until ``accept()`` hands them out one at
  a time, as callables that run the whole session and return a Deferred of its end.
"""

from __future__ import annotations

import socket
from collections import deque
from typing import TYPE_CHECKING, Any, cast

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IHandshakeListener, IListeningPort, IReactorSocket
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from slimta_tx.reply import Reply

if TYPE_CHECKING:  # pragma: no cover
    from slimta_tx.factory import SmtpEdge
    from slimta_tx.interfaces import IBus
    from slimta_tx.policy import Policy
    from slimta_tx.protocol import ESMTPServerProtocol

__all__ = ["AcceptQueue", "EdgeClosed", "adopt_socket", "new"]

# Connections held for accept() beyond this many are turned away (like a full listen backlog).
DEFAULT_BACKLOG = 128


class EdgeClosed(Exception):
    """``accept()`` after (or during) ``close()``: there will be no more connections."""


def adopt_socket(edge: SmtpEdge, sock: socket.socket, factory: Any = None) -> IListeningPort:
    """Serve ``sock`` (bound and listening) with ``edge``; the reactor gets its own copy.

    ``sock`` is set non-blocking; the caller may close it afterwards (the reactor holds a
    duplicate of the descriptor, closed by ``edge.close()``). ``factory``: one in front of the
    edge (a PROXY protocol layer) instead of the edge itself.
    """
    if sock.type & socket.SOCK_STREAM != socket.SOCK_STREAM:
        raise ValueError(f"not a stream socket: {sock!r}")
    if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 0:
        raise ValueError(f"socket is not listening (call listen() first): {sock!r}")
    sock.setblocking(False)
    reactor = cast(IReactorSocket, edge.reactor)
    family = socket.AddressFamily(sock.family)
    port = reactor.adoptStreamPort(sock.fileno(), family, factory if factory is not None else edge)
    edge.ports.append(port)
    return port


def new(
    sock: socket.socket,
    bus: IBus,
    policy: Policy | None = None,
    reactor: Any = None,
) -> SmtpEdge:
    """The seed's ``new(socket, bus)``: an edge serving the already-listening ``sock``."""
    from slimta_tx.factory import SmtpEdge

    edge = SmtpEdge(bus, policy, reactor=reactor)
    edge.adopt(sock)
    return edge


class AcceptQueue:
    """Connections waiting for ``accept()``, and ``accept()`` calls waiting for connections."""

    log = Logger()

    def __init__(self, edge: SmtpEdge, backlog: int = DEFAULT_BACKLOG) -> None:
        self.edge = edge
        self.backlog = backlog
        self.held: deque[HeldConnection] = deque()
        self.waiting: deque[Deferred[HeldConnection]] = deque()
        self.closed = False

    def accept(self) -> Deferred[HeldConnection]:
        if self.closed:
            return Deferred.fromCoroutine(_raise(EdgeClosed("the edge is closed")))
        while self.held:
            held = self.held.popleft()
            if held.is_open:
                return succeed(held)
        d: Deferred[HeldConnection] = Deferred(lambda d: self._forget(d))
        self.waiting.append(d)
        return d

    def arrived(self, held: HeldConnection) -> None:
        if self.closed:
            held.turn_away(_shutting_down(self.edge))
            return
        if self.waiting:
            self.waiting.popleft().callback(held)
            return
        if len(self.held) >= self.backlog:
            self.log.warn("accept() backlog full; turning a connection away")
            held.turn_away(Reply("421", f"{self.edge.policy.hostname} Too busy", "4.3.2"))
            return
        self.held.append(held)

    def close(self) -> None:
        """No more connections: pending ``accept()`` calls fail, held ones get 421."""
        self.closed = True
        waiting, self.waiting = self.waiting, deque()
        for d in waiting:
            d.errback(EdgeClosed("the edge is closed"))
        held, self.held = self.held, deque()
        for connection in held:
            connection.turn_away(_shutting_down(self.edge))

    def _forget(self, d: Deferred[HeldConnection]) -> None:
        if d in self.waiting:
            self.waiting.remove(d)


@implementer(IHandshakeListener)
class HeldConnection(Protocol):
    """A connection that waits, unread, until it is accepted; then an SMTP session.

    Calling it (the callable ``accept()`` fires with) starts the session and returns a
    Deferred that fires when the connection has ended.
    """

    def __init__(self, edge: SmtpEdge, queue: AcceptQueue) -> None:
        self.edge = edge
        self.queue = queue
        self.session_protocol: ESMTPServerProtocol | None = None
        self.ended: Deferred[None] = Deferred()
        self._started = False
        self._handshake_done = False

    @property
    def is_open(self) -> bool:
        return self.transport is not None and not self.ended.called

    def connectionMade(self) -> None:
        cast(Any, self.transport).pauseProducing()
        self.queue.arrived(self)

    def __call__(self) -> Deferred[None]:
        """Run the whole SMTP session; the Deferred fires when the connection has ended."""
        if self._started or not self.is_open:
            return self.ended if self._started else succeed(None)
        self._started = True
        proto = self.edge.build_session_protocol()
        self.session_protocol = proto
        # Resume first: the session pauses reading itself whenever it waits.
        cast(Any, self.transport).resumeProducing()
        proto.makeConnection(cast(Any, self.transport))
        if self._handshake_done:
            proto.handshakeCompleted()
        return self.ended

    def handshakeCompleted(self) -> None:
        # TLS layers report to the transport's protocol, which is this one (STARTTLS, 465).
        if self.session_protocol is not None:
            self.session_protocol.handshakeCompleted()
        else:
            self._handshake_done = True

    def dataReceived(self, data: bytes) -> None:
        if self.session_protocol is not None:
            self.session_protocol.dataReceived(data)

    def connectionLost(self, reason: Failure | None = None) -> None:
        if self.session_protocol is not None:
            self.session_protocol.connectionLost(reason)
        if not self.ended.called:
            self.ended.callback(None)

    def turn_away(self, reply: Reply) -> None:
        if self.transport is not None and not self.ended.called:
            self.transport.write(reply.render())
            self.transport.loseConnection()


def _shutting_down(edge: SmtpEdge) -> Reply:
    return Reply("421", f"{edge.policy.hostname} Service shutting down", "4.3.2")


async def _raise(error: Exception) -> HeldConnection:
    raise error

"""Write-through for plain TCP: send at once when nothing is queued, as asyncio does.

Twisted's ``transport.write`` never sends at once: it queues, registers for writability, and
sends on the next reactor turn. In a lockstep SMTP session that is one extra reactor turn and
two ``epoll_ctl`` calls per reply. When the transport is a plain TCP connection with nothing
queued, sending straight away is safe (the kernel keeps the order) and saves all of that; any
part the socket does not take, and every other case (TLS, a queue, a closing connection, a
test transport), goes through ``transport.write`` as before.

On a TLS connection with the standard-library layer (:mod:`slimta_tx.tlslayer`, the default
after STARTTLS) the layer encrypts and sends straight to the socket the same way. Under
Twisted's own TLS layer the reply goes through that layer as usual (``transport.write``
encrypts it into the connection's write buffer and registers for writability); when that
buffer was empty before, the connection's own ``doWrite`` then sends it at once, instead of the
reactor doing so on its next pass (one ``epoll_wait`` wake-up and dispatch less per reply:
each lockstep reply under TLS cost a reactor pass of its own). ``doWrite`` is what the reactor
would call; anything it cannot send, or an error, is left for the reactor as before.

Replies are also coalesced per reactor pass (:func:`flush_later`): the replies that the
connections made ready in one pass of the reactor over its ready sockets go out together at
the end of that pass (a ``callLater(0)``, run before the reactor polls again), each still
straight to its socket. A client then finds its replies waiting when it wakes, instead of being
woken once per reply; on loopback with 50 lockstep connections that was 14-30% more messages
per second and 20% less server CPU per message, and no change with one connection. Order
within a connection is kept: a connection's replies are one buffer, written in order. The
standard-library TLS layer is coalesced too (each connection's replies are encrypted at the end
of the pass); Twisted's TLS layer is not.

Closing is shortened the same way (:func:`close_now`): Twisted's ``loseConnection`` stops
reading, registers the connection for writability (an ``epoll_ctl``), and closes on the next
pass of the reactor, when ``doWrite`` finds nothing to send and the reactor unregisters it again
(another ``epoll_ctl``). When a plain TCP connection has nothing queued, the session's last
reply (``221``, ``421``) has already gone to the socket, so there is nothing to wait for: the
connection stops reading and closes at once, as that ``doWrite`` would have (an orderly
``shutdown`` and ``close``; the protocol is told ``ConnectionDone``).

This reads Twisted's TCP transport internals (:data:`TRANSPORT_INTERNALS`: ``dataBuffer``,
``offset``, ``_tempDataLen``, ``socket``, ``doWrite``, ...; ``tests/test_fastwrite.py`` pins
what they must mean). The first plain TCP connection checks that they are there; if a Twisted
release dropped one, one warning says so and every write goes through ``transport.write``
from then on (correct, a reactor turn slower).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

from twisted.internet import tcp
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

__all__ = ["at_end_of_pass", "close_later", "close_now", "flush_later", "send_now", "write"]

log = Logger()

#: The attributes of a ``twisted.internet.tcp.Connection`` that ``write`` reads (or calls).
TRANSPORT_INTERNALS = (
    "connected",
    "disconnecting",
    "producer",
    "TLS",
    "_tempDataLen",
    "offset",
    "dataBuffer",
    "socket",
    "doWrite",
)

#: None until the first plain TCP connection is seen; then whether it has them all.
_usable: bool | None = None


def _check_internals(connection: object) -> bool:
    """Whether ``connection`` has every attribute of :data:`TRANSPORT_INTERNALS` (once)."""
    global _usable
    missing = [name for name in TRANSPORT_INTERNALS if not hasattr(connection, name)]
    _usable = not missing
    if missing:
        log.warn(
            "fastwrite: this Twisted's TCP transport has no {missing}; replies go through "
            "transport.write (slower, still correct)",
            missing=", ".join(missing),
        )
    return _usable


def _tcp_connection(transport: Any) -> Any:
    """The ``tcp.Connection`` under ``transport`` whose internals can be used, or None.

    A layer that passes writes straight down (the PROXY protocol layer, whose class says
    ``passes_writes_through``) is seen through.
    """
    connection = transport
    if not isinstance(connection, tcp.Connection) and getattr(
        type(connection), "passes_writes_through", False
    ):
        connection = connection.transport
    if not isinstance(connection, tcp.Connection) or not (
        _usable or (_usable is None and _check_internals(connection))
    ):
        return None
    return connection


def write(transport: Any, data: bytes) -> None:
    """Write ``data`` to ``transport``, straight to its socket when that keeps the order.

    A layer that passes writes straight down (the PROXY protocol layer, whose class says
    ``passes_writes_through``) is seen through: its connection's socket is used.
    """
    connection = _tcp_connection(transport)
    if connection is None:
        transport.write(data)
        return
    if connection.TLS:
        if _idle(connection):
            connection.write(data)  # encrypted into the (empty) write buffer
            if connection._tempDataLen and connection.connected and not connection.disconnecting:
                connection.doWrite()  # what the reactor would do on its next pass
            return
    else:
        data = send_now(connection, data)
        if not data:
            return
    transport.write(data)


def _idle(connection: Any) -> bool:
    """Nothing is queued on ``connection``: what is sent now keeps the order."""
    return bool(
        connection.connected
        and not connection.disconnecting
        and connection.producer is None
        and connection._tempDataLen == 0
        and connection.offset == len(connection.dataBuffer)
    )


def send_now(connection: Any, data: bytes) -> bytes:
    """Send what the socket of ``connection`` (a ``tcp.Connection``) takes of ``data`` now, if
    nothing is queued there; return the rest (all of ``data`` when it could not try), which
    the caller queues with the connection's write.

    Also the standard-library TLS layer's way out (:mod:`slimta_tx.tlslayer`), so both rely on
    the internals through this one guarded place.
    """
    if not (_usable or (_usable is None and _check_internals(connection))) or not _idle(
        connection
    ):
        return data
    try:
        sent = connection.socket.send(data)
    except (BlockingIOError, InterruptedError):
        sent = 0
    except OSError:
        sent = 0  # Twisted notices the error on its own write and reports it as usual
    return b"" if sent >= len(data) else data[sent:]


def _plain_connection(transport: Any) -> Any:
    """The plain (not TLS) ``tcp.Connection`` under ``transport``, or None."""
    connection = _tcp_connection(transport)
    return None if connection is None or connection.TLS else connection


def close_later(transport: Any, close: Callable[[], None]) -> bool:
    """Call ``close`` at the end of this reactor pass, if ``transport`` is plain TCP (which
    :func:`close_now` may then close at once); False (nothing done) for any other transport."""
    connection = _plain_connection(transport)
    reactor = getattr(connection, "reactor", None)
    if reactor is None:
        return False
    at_end_of_pass(reactor, close)
    return True


def close_now(transport: Any) -> bool:
    """Close ``transport`` now, as ``loseConnection`` would once its buffer is written, if it
    is a plain TCP connection with nothing queued; return whether it did (False: call
    ``loseConnection``).

    The connection stops reading and its ``connectionLost`` is called with ``ConnectionDone``
    (so the protocol's ``connectionLost`` runs before this returns): call it where that is
    safe, outside the transport's own ``doRead`` (slimta_tx.protocol does it at the end of the
    reactor pass). A layer that passes writes straight down is seen through, as in
    :func:`write`.
    """
    connection = _plain_connection(transport)
    if connection is None or not _idle(connection):
        return False
    connection.stopReading()
    connection.stopWriting()
    connection.connectionLost(Failure(ConnectionDone()))
    return True


class _PassBatch:
    """The flushes asked for during one reactor pass, run together at its end."""

    def __init__(self, reactor: IReactorTime) -> None:
        self.reactor = reactor
        self.flushes: list[Callable[[], None]] = []
        self.call: IDelayedCall | None = None

    def add(self, flush: Callable[[], None]) -> None:
        self.flushes.append(flush)
        if self.call is None:
            self.call = self.reactor.callLater(0, self.run)

    def run(self) -> None:
        self.call = None
        flushes, self.flushes = self.flushes, []
        for flush in flushes:
            try:
                flush()
            except Exception:
                log.failure("deferred flush {flush!r} failed", flush=flush)


_batches: weakref.WeakKeyDictionary[Any, _PassBatch] = weakref.WeakKeyDictionary()
# The last batch used: nearly always the one asked for (a WeakKeyDictionary lookup makes a
# weak reference to its key each time). Held weakly too, so it never keeps a reactor alive.
_last: weakref.ReferenceType[_PassBatch] | None = None


def at_end_of_pass(reactor: IReactorTime, call: Callable[[], None]) -> None:
    """Call ``call`` at the end of this reactor pass, with the replies' flushes (one
    ``callLater(0)`` per pass for all of them: the log sink's writes share it)."""
    global _last
    batch = _last() if _last is not None else None
    if batch is None or batch.reactor is not reactor:
        batch = _batches.get(reactor)
        if batch is None:
            batch = _batches[reactor] = _PassBatch(reactor)
        _last = weakref.ref(batch)
    batch.add(call)


def flush_later(transport: Any, flush: Callable[[], None]) -> bool:
    """Call ``flush`` at the end of this reactor pass, if ``transport`` is plain TCP.

    Returns False (and does nothing) for any other transport: Twisted's TLS layer (it buffers
    on its own; the standard-library layer of :mod:`slimta_tx.tlslayer` is coalesced too),
    test transports (tests see replies at once), anything without a reactor. The caller then
    flushes at once. ``flush`` must be harmless to call when there is nothing left to send.
    """
    connection = _tcp_connection(transport)
    if connection is None:
        return False
    if connection.TLS and not getattr(
        getattr(connection, "protocol", None), "coalesces_writes", False
    ):
        return False  # Twisted's TLS layer buffers (and flushes) on its own
    reactor = getattr(connection, "reactor", None)
    if reactor is None:
        return False
    at_end_of_pass(reactor, flush)
    return True

"""The connection to one milter: a Twisted protocol over the codec, and how it is opened.

:class:`MilterConnection` queues the packets the milter sends (a bounded number; an
oversized or malformed packet fails the connection at once) and hands them out one at a time
(:meth:`~MilterConnection.next_packet`, with a timeout). Writes respect the transport's
flow control: :meth:`~MilterConnection.drained` fires when the socket buffer has room, so a
slow milter never makes a body pile up in memory.

A milter conversation is lockstep: each event is one write, then a wait for the answer. So
the per-packet costs are kept low. On a plain TCP or unix connection, what the sessions write
during one reactor pass goes out at the end of that pass (:func:`slimta_tx.fastwrite.
at_end_of_pass`, as the SMTP replies do), straight to the socket when nothing is queued before
it: no two ``epoll_ctl`` calls and no reactor dispatch per packet, and the milter, woken once,
finds the packets of many sessions waiting. Anything the socket does not take goes through
``transport.write`` as before. One timer per connection serves every wait (moved, not
re-created, for each packet).

:class:`Connector` opens connections, at most ``max_connections`` per milter at once: a
session beyond that waits for a free slot within the milter's connect timeout (then the
milter's default action applies). The milter protocol ties a connection to one SMTP session
(its state is that session's), so a slot is held from the greeting to the end of the session.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

from twisted.internet import tcp
from twisted.internet.defer import Deferred, DeferredSemaphore
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    UNIXClientEndpoint,
    connectProtocol,
)
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from slimta_tx.fastwrite import at_end_of_pass
from slimta_tx.milter.codec import PacketReader, ProtocolError
from slimta_tx.milter.config import Milter

__all__ = ["Connector", "MilterConnection", "MilterFailure", "MilterTimeout"]

#: Packets the milter may send ahead of what is asked of it before it is cut off.
MAX_QUEUED = 64


class MilterFailure(Exception):
    """The milter cannot be used for this session (down, closed, broken, too slow)."""


class MilterTimeout(MilterFailure):
    pass


@implementer(IPushProducer)
class MilterConnection(Protocol):
    """One connection to a milter (the MTA side)."""

    def __init__(self, clock: IReactorTime, max_packet: int | None = None) -> None:
        self.clock = clock
        self.reader = PacketReader() if max_packet is None else PacketReader(max_packet)
        self.packets: deque[tuple[bytes, bytes]] = deque()
        self.failure: MilterFailure | None = None
        self.connected = False
        self._waiter: Deferred[tuple[bytes, bytes]] | None = None
        self._timer: Any = None  # the timeout of the current wait (idle: left to expire)
        self._timeout = 0.0
        self._paused = False
        self._drain_waiters: list[Deferred[None]] = []
        self.on_close: Callable[[], None] | None = None
        self._out: list[bytes] = []  # written during this reactor pass, sent at its end

    # -- transport events ---------------------------------------------------------------------

    def connectionMade(self) -> None:
        self.connected = True
        self.transport.registerProducer(self, True)  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        if self.failure is not None:
            return
        try:
            packets = self.reader.feed(data)
        except ProtocolError as e:
            self.fail(MilterFailure(f"bad packet: {e}"))
            return
        self.packets.extend(packets)
        if len(self.packets) > MAX_QUEUED:
            self.fail(MilterFailure(f"more than {MAX_QUEUED} packets nobody asked for"))
            return
        self._wake()

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.connected = False
        self._out = []
        self._stop_timer()
        if self.failure is None:
            why = reason.getErrorMessage() if reason is not None else "connection lost"
            self._set_failure(MilterFailure(f"connection closed by the milter ({why})"))
        self._resume_drain()
        if self.on_close is not None:
            on_close, self.on_close = self.on_close, None
            on_close()

    # -- flow control (IPushProducer: the transport tells us when its buffer is full) -------

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._resume_drain()

    def stopProducing(self) -> None:
        self._resume_drain()

    def _resume_drain(self) -> None:
        waiters, self._drain_waiters = self._drain_waiters, []
        for d in waiters:
            d.callback(None)

    def drained(self) -> Deferred[None]:
        """Fires when more may be written (at once unless the socket buffer is full)."""
        self.flush()  # (what waits for the end of the pass counts too)
        d: Deferred[None] = Deferred()
        if not self._paused or not self.connected:
            d.callback(None)
        else:
            self._drain_waiters.append(d)
        return d

    # -- what the session driver uses ------------------------------------------------------------

    def send(self, data: bytes) -> None:
        if self.failure is not None:
            raise self.failure
        transport = self.transport
        assert transport is not None
        if not isinstance(transport, tcp.Connection):  # (TCP and unix are)
            transport.write(data)
        else:
            if not self._out:
                at_end_of_pass(self.clock, self.flush)
            self._out.append(data)

    def flush(self) -> None:
        """Send what waits for the end of the reactor pass now."""
        out, self._out = self._out, []
        transport = self.transport
        if not out or transport is None or not self.connected:
            return
        data = _write_through(transport, out[0] if len(out) == 1 else b"".join(out))
        if data:
            transport.write(data)

    def next_packet(self, timeout: float) -> Deferred[tuple[bytes, bytes]]:
        """The next packet from the milter; fails with MilterFailure (closed, broken) or
        MilterTimeout after ``timeout`` seconds."""
        if self._waiter is not None:
            raise RuntimeError("already waiting for a packet")
        d: Deferred[tuple[bytes, bytes]] = Deferred()
        self._waiter = d
        if self.packets or self.failure is not None:
            self._wake()  # no wait: no timer
            return d
        self._timeout = timeout
        timer = self._timer
        if timer is not None and timer.active():
            timer.reset(timeout)
        else:
            self._timer = self.clock.callLater(timeout, self._timed_out)
        return d

    def _timed_out(self) -> None:
        self._timer = None
        if self._waiter is not None:  # (else it expired while nothing was awaited)
            self.fail(MilterTimeout(f"no answer within {self._timeout:g} seconds"))

    def _stop_timer(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _wake(self) -> None:
        d = self._waiter
        if d is None:
            return
        if self.packets:
            item = self.packets.popleft()
            self._clear_wait()
            d.callback(item)
        elif self.failure is not None:
            self._clear_wait()
            d.errback(Failure(self.failure))

    def _clear_wait(self) -> None:
        self._waiter = None  # the timer is left to run: the next wait moves it

    def _set_failure(self, failure: MilterFailure) -> None:
        if self.failure is None:
            self.failure = failure
        self._wake()
        self._stop_timer()

    def fail(self, failure: MilterFailure) -> None:
        """Give up on this connection: it is aborted and every wait fails."""
        self._set_failure(failure)
        self.abort()

    def close(self) -> None:
        """Close after what was written (QUIT sent)."""
        self.flush()
        if self.transport is not None and self.connected:
            self.transport.loseConnection()

    def abort(self) -> None:
        self._out = []
        if self.transport is not None and self.connected:
            abort = getattr(self.transport, "abortConnection", None)
            if abort is not None:
                abort()
            else:  # pragma: no cover - every stream transport Twisted has can abort
                self.transport.loseConnection()


def _write_through(transport: Any, data: bytes) -> bytes:
    """Send what the socket takes at once if nothing is queued before it (the kernel keeps
    the order); returns what is left for ``transport.write``. Uses the same internals of
    Twisted's connections as :func:`slimta_tx.fastwrite.write` (its write buffer)."""
    if (
        not transport.connected
        or transport.disconnecting
        or transport.TLS
        or getattr(transport, "_tempDataLen", 1) != 0
        or transport.offset != len(transport.dataBuffer)
    ):
        return data
    try:
        sent = transport.socket.send(data)
    except (BlockingIOError, InterruptedError):
        return data
    except OSError:
        return data  # Twisted notices the error on its own write and reports it as usual
    return data[sent:]


def _endpoint(milter: Milter, reactor: Any) -> Any:
    kind, host, port = milter.address
    timeout = milter.connect_timeout
    if kind == "unix":
        return UNIXClientEndpoint(reactor, host, timeout=timeout)
    if ":" in host:
        return TCP6ClientEndpoint(reactor, host, port, timeout=timeout)
    if host.replace(".", "").isdigit():
        return TCP4ClientEndpoint(reactor, host, port, timeout=timeout)
    return HostnameEndpoint(reactor, host, port, timeout=timeout)


def connect(milter: Milter, reactor: Any) -> Deferred[MilterConnection]:
    """Open a connection to ``milter`` (TCP or unix socket) on ``reactor``."""
    connected: Deferred[MilterConnection] = connectProtocol(
        _endpoint(milter, reactor), MilterConnection(reactor)
    )
    return connected


Open = Callable[[Milter], "Deferred[MilterConnection]"]


class Connector:
    """Opens connections to milters, at most ``milter.max_connections`` to each at once.

    :param reactor: the reactor (and clock) to connect with.
    :param open_connection: ``milter -> Deferred[MilterConnection]``; by default a TCP or unix
        connection on ``reactor`` (tests pass an in-memory one).
    """

    def __init__(self, reactor: Any, open_connection: Open | None = None) -> None:
        self.reactor = reactor
        self.open_connection: Open = open_connection or (lambda m: connect(m, reactor))
        self._slots: dict[str, DeferredSemaphore] = {}

    def slots(self, milter: Milter) -> DeferredSemaphore:
        key = f"{milter.endpoint}/{milter.max_connections}"
        slots = self._slots.get(key)
        if slots is None:
            slots = self._slots[key] = DeferredSemaphore(milter.max_connections)
        return slots

    def in_use(self, milter: Milter) -> int:
        slots = self.slots(milter)
        return slots.limit - slots.tokens

    def waiting(self, milter: Milter) -> int:
        return len(self.slots(milter).waiting)

    async def open(self, milter: Milter) -> MilterConnection:
        """A connection within the limit; MilterFailure if none within the connect timeout.

        The slot is released when the connection closes (``on_close``).
        """
        slots = self.slots(milter)
        acquired: Deferred[Any] = slots.acquire()
        timer = self.reactor.callLater(milter.connect_timeout, acquired.cancel)
        try:
            await acquired
        except Exception:
            raise MilterTimeout(
                f"no free connection (max_connections={milter.max_connections}) within "
                f"{milter.connect_timeout:g} seconds"
            ) from None
        finally:
            if timer.active():
                timer.cancel()
        try:
            connection = await self.open_connection(milter)
        except Exception as e:
            slots.release()
            raise MilterFailure(f"cannot connect: {_why(e)}") from None
        if not connection.connected:  # closed before we got it
            slots.release()
            raise MilterFailure("connection closed at once")
        connection.on_close = slots.release
        return connection


def _why(error: BaseException) -> str:
    return str(error) or type(error).__name__

"""The milter connection's write path: packets written during one reactor pass leave together
at its end, straight to the socket when nothing is queued before them; otherwise (and for the
rest of what the socket does not take) through ``transport.write``, in order."""

from __future__ import annotations

from typing import Any

from twisted.internet import tcp
from twisted.internet.task import Clock

from slimta_tx.milter.client import MilterConnection


class FakeSocket:
    def __init__(self, accept: int | None = None) -> None:
        self.accept = accept
        self.sent: list[bytes] = []

    def send(self, data: bytes) -> int:
        taken = len(data) if self.accept is None else min(self.accept, len(data))
        self.sent.append(bytes(data[:taken]))
        return taken


def milter_connection(sock: FakeSocket, **state: Any) -> tuple[MilterConnection, Any, Clock]:
    """A MilterConnection on a tcp.Client in the given state (the attributes of Twisted's
    connection that the write-through reads), without a real socket or reactor."""
    clock = Clock()
    transport: Any = object.__new__(tcp.Client)
    transport.TLS = False
    transport.connected = True
    transport.disconnecting = False
    transport._tempDataLen = 0
    transport.dataBuffer = b""
    transport.offset = 0
    transport.socket = sock
    transport.queued = []
    transport.write = transport.queued.append
    transport.abortConnection = lambda: None
    for name, value in state.items():
        setattr(transport, name, value)
    connection = MilterConnection(clock)
    connection.transport = transport
    connection.connected = True
    return connection, transport, clock


def test_packets_of_one_pass_leave_together_at_its_end() -> None:
    sock = FakeSocket()
    connection, transport, clock = milter_connection(sock)
    connection.send(b"one")
    connection.send(b"two")
    assert sock.sent == []
    clock.advance(0)
    assert sock.sent == [b"onetwo"] and transport.queued == []


def test_what_the_socket_does_not_take_goes_through_the_transport() -> None:
    sock = FakeSocket(accept=2)
    connection, transport, clock = milter_connection(sock)
    connection.send(b"abcdef")
    clock.advance(0)
    assert sock.sent == [b"ab"] and transport.queued == [b"cdef"]


def test_a_queue_in_the_transport_keeps_the_order() -> None:
    sock = FakeSocket()
    connection, transport, clock = milter_connection(sock, dataBuffer=b"xyz")
    connection.send(b"abc")
    clock.advance(0)
    assert sock.sent == [] and transport.queued == [b"abc"]


def test_waiting_for_the_socket_buffer_sends_first() -> None:
    """drained() (between body chunks) sends what waits for the end of the pass at once."""
    sock = FakeSocket()
    connection, _, _ = milter_connection(sock)
    connection.send(b"chunk")
    assert connection.drained().called
    assert sock.sent == [b"chunk"]


def test_an_aborted_connection_sends_nothing_more() -> None:
    sock = FakeSocket()
    connection, transport, clock = milter_connection(sock)
    connection.send(b"abort")
    connection.abort()
    clock.advance(0)
    assert sock.sent == [] and transport.queued == []

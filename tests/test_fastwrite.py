"""Write-through: straight to the socket only when that keeps the order; else transport.write."""

from __future__ import annotations

from functools import partial
from typing import Any, cast

import pytest
from twisted.internet import tcp
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from slimta_tx import fastwrite
from slimta_tx.bus.simple import DiscardBus
from slimta_tx.factory import SmtpEdge
from slimta_tx.policy import Policy
from tests.support.logs import captured_events


class FakeSocket:
    def __init__(self, accept: int | None = None, error: Exception | None = None) -> None:
        self.accept = accept
        self.error = error
        self.sent: list[bytes] = []

    def send(self, data: bytes) -> int:
        if self.error is not None:
            raise self.error
        taken = len(data) if self.accept is None else min(self.accept, len(data))
        self.sent.append(bytes(data[:taken]))
        return taken


def connection(sock: FakeSocket, **state: Any) -> Any:
    """A tcp.Server in the given state, without a real socket or reactor."""
    conn: Any = object.__new__(tcp.Server)
    conn.TLS = False
    conn.connected = True
    conn.disconnecting = False
    conn.producer = None
    conn._tempDataLen = 0
    conn.dataBuffer = b""
    conn.offset = 0
    conn.socket = sock
    conn.queued = []
    conn.write = conn.queued.append
    for name, value in state.items():
        setattr(conn, name, value)
    return conn


def test_idle_plain_tcp_sends_at_once() -> None:
    sock = FakeSocket()
    conn = connection(sock)
    fastwrite.write(conn, b"250 2.0.0 Ok\r\n")
    assert sock.sent == [b"250 2.0.0 Ok\r\n"] and conn.queued == []


def test_what_the_socket_does_not_take_is_queued_in_order() -> None:
    sock = FakeSocket(accept=4)
    conn = connection(sock)
    fastwrite.write(conn, b"250 2.0.0 Ok\r\n")
    assert sock.sent == [b"250 "] and conn.queued == [b"2.0.0 Ok\r\n"]


@pytest.mark.parametrize("error", [BlockingIOError(), InterruptedError(), ConnectionResetError()])
def test_a_socket_that_cannot_take_it_now_falls_back(error: Exception) -> None:
    conn = connection(FakeSocket(error=error))
    fastwrite.write(conn, b"data")
    assert conn.queued == [b"data"]


@pytest.mark.parametrize(
    "state",
    [
        {"TLS": True},
        {"_tempDataLen": 3},
        {"dataBuffer": b"xyz"},
        {"disconnecting": True},
        {"connected": False},
        {"producer": object()},
    ],
    ids=["tls", "temp-queue", "buffer", "disconnecting", "not-connected", "producer"],
)
def test_anything_queued_or_special_goes_through_twisted(state: dict[str, Any]) -> None:
    """Sending past queued bytes would reorder the stream; TLS must encrypt first."""
    sock = FakeSocket()
    conn = connection(sock, **state)
    fastwrite.write(conn, b"data")
    assert sock.sent == [] and conn.queued == [b"data"]


def test_tls_goes_through_the_tls_layer_then_out_at_once() -> None:
    """Under TLS the reply is encrypted by Twisted's layer (transport.write) and, the buffer
    having been empty, sent by the connection's own doWrite now, not on the next pass."""
    sock = FakeSocket()
    conn = connection(sock, TLS=True)
    written: list[bytes] = []
    did_write: list[bool] = []

    def tls_write(data: bytes) -> None:  # what the TLS layer does: record bytes into the buffer
        written.append(data)
        conn._tempDataLen += len(data) + 29

    conn.write = tls_write
    conn.doWrite = lambda: did_write.append(True)
    fastwrite.write(conn, b"250 2.0.0 Ok\r\n")
    assert written == [b"250 2.0.0 Ok\r\n"] and did_write == [True] and sock.sent == []


def test_tls_with_bytes_already_queued_waits_for_the_reactor() -> None:
    conn = connection(FakeSocket(), TLS=True, _tempDataLen=10)
    conn.doWrite = lambda: pytest.fail("doWrite past queued bytes")
    fastwrite.write(conn, b"data")
    assert conn.queued == [b"data"]


def test_other_transports_use_their_own_write() -> None:
    transport = StringTransport()
    fastwrite.write(transport, b"data")
    assert transport.value() == b"data"


# -- replies coalesced per reactor pass ---------------------------------------------------------


def test_flushes_asked_for_in_one_pass_run_together_at_its_end() -> None:
    """One callLater(0) per pass, whatever the number of connections; each flush runs once."""
    clock = Clock()
    ran: list[str] = []
    conns = [connection(FakeSocket(), reactor=clock) for _ in range(3)]
    for i, conn in enumerate(conns):
        assert fastwrite.flush_later(conn, partial(ran.append, f"c{i}"))
    assert ran == [] and len(clock.getDelayedCalls()) == 1
    clock.advance(0)
    assert ran == ["c0", "c1", "c2"] and clock.getDelayedCalls() == []
    # The next pass gets a new batch.
    assert fastwrite.flush_later(conns[0], lambda: ran.append("again"))
    clock.advance(0)
    assert ran[-1] == "again"


@pytest.mark.parametrize(
    "transport",
    [
        StringTransport(),
        connection(FakeSocket(), TLS=True, reactor=Clock()),
        connection(FakeSocket()),  # no reactor
    ],
    ids=["test-transport", "tls", "no-reactor"],
)
def test_other_transports_are_flushed_by_the_caller(transport: Any) -> None:
    assert not fastwrite.flush_later(transport, lambda: pytest.fail("must not be called"))


def test_a_failing_flush_is_logged_and_the_others_still_run() -> None:
    clock = Clock()
    ran: list[int] = []

    def broken() -> None:
        raise RuntimeError("boom")

    fastwrite.flush_later(connection(FakeSocket(), reactor=clock), broken)
    fastwrite.flush_later(connection(FakeSocket(), reactor=clock), lambda: ran.append(1))
    with captured_events() as events:
        clock.advance(0)
    assert ran == [1]
    assert any(isinstance(e.get("log_failure"), Failure) for e in events)


def fake_tcp_session(edge: SmtpEdge, clock: Clock) -> tuple[Any, FakeSocket, list[str]]:
    """An ESMTPServerProtocol of ``edge`` on a tcp.Server whose socket is a FakeSocket."""
    sock = FakeSocket()
    closed: list[str] = []
    conn = connection(sock, reactor=clock)
    conn.getPeer = lambda: IPv4Address("TCP", "127.0.0.1", 40000)
    conn.getHost = lambda: IPv4Address("TCP", "127.0.0.1", 25)
    conn.setTcpNoDelay = lambda on: None
    conn.pauseProducing = conn.resumeProducing = lambda: None
    conn.loseConnection = lambda: closed.append("lose")
    conn.stopReading = lambda: closed.append("stop-reading")
    conn.stopWriting = lambda: None

    def connection_lost(reason: Failure) -> None:
        closed.append(f"lost: {getattr(reason.type, '__name__', None)}")
        proto.connectionLost(reason)

    conn.connectionLost = connection_lost
    proto = edge.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    proto.makeConnection(conn)
    clock.advance(0)
    return proto, sock, closed


def smtp_over_fake_tcp(sessions: int = 2) -> tuple[Any, FakeSocket, Clock, list[str]]:
    """The first of ``sessions`` connections to one edge (coalescing needs company)."""
    clock = Clock()
    edge = SmtpEdge(DiscardBus(), Policy(hostname="mx.example"), reactor=clock)
    proto, sock, closed = fake_tcp_session(edge, clock)
    for _ in range(sessions - 1):
        fake_tcp_session(edge, clock)
    return proto, sock, clock, closed


def session_timers(proto: Any, clock: Clock) -> list[float]:
    """When the timers of ``proto`` (its own or its deadlines') are due, from now."""
    return [
        call.getTime() - clock.seconds()
        for call in clock.getDelayedCalls()
        if getattr(getattr(call, "func", None), "__self__", None) in (proto, proto.deadlines)
    ]


def test_alone_on_the_edge_replies_go_out_at_once() -> None:
    """No other connection could share the pass: no callLater, no wait."""
    proto, sock, clock, _ = smtp_over_fake_tcp(sessions=1)
    proto.dataReceived(b"NOOP\r\n")
    assert sock.sent[1:] == [b"250 2.0.0 Ok\r\n"]
    assert all(call.getTime() > clock.seconds() for call in clock.getDelayedCalls())


def test_replies_of_one_pass_go_out_at_its_end_in_one_send() -> None:
    proto, sock, clock, _ = smtp_over_fake_tcp()
    assert [s[:3] for s in sock.sent] == [b"220"]
    proto.dataReceived(b"EHLO client.example\r\n")
    proto.dataReceived(b"NOOP\r\n")  # a second read in the same pass
    assert len(sock.sent) == 1  # nothing yet: the pass is not over
    clock.advance(0)
    assert len(sock.sent) == 2
    text = sock.sent[1]
    assert text.startswith(b"250-mx.example") and text.endswith(b"250 2.0.0 Ok\r\n")


def test_a_closing_reply_goes_at_once_and_the_connection_closes_at_the_end_of_the_pass() -> None:
    """QUIT: the 221 follows the earlier replies in order, is sent at once, and the connection
    closes at the end of the pass without loseConnection's round through the reactor (and
    without the 30 s abort deadline that round needs)."""
    proto, sock, clock, closed = smtp_over_fake_tcp()
    proto.dataReceived(b"NOOP\r\n")
    proto.dataReceived(b"QUIT\r\n")
    assert sock.sent[1:] == [b"250 2.0.0 Ok\r\n221 2.0.0 mx.example Bye\r\n"]
    assert closed == []  # not inside the transport's doRead
    clock.advance(0)
    assert closed == ["stop-reading", "lost: ConnectionDone"]
    assert len(sock.sent) == 2
    assert proto.state.value == "closed"
    assert session_timers(proto, clock) == []  # no abort deadline either


def test_a_closing_reply_the_socket_did_not_take_is_left_to_lose_connection() -> None:
    """A client that does not read: the 221 is queued behind Twisted's buffer, so the
    connection closes the usual way, after it is written, within the 30 s abort deadline."""
    proto, sock, clock, closed = smtp_over_fake_tcp()
    sock.accept = 3
    proto.dataReceived(b"QUIT\r\n")
    proto.transport.dataBuffer = b"queued"  # what Twisted's write kept
    clock.advance(0)
    assert closed == ["lose"]
    assert session_timers(proto, clock) == [30]  # the abort deadline


def test_close_now_closes_an_idle_plain_connection_at_once() -> None:
    events: list[str] = []
    conn = connection(FakeSocket())
    conn.stopReading = lambda: events.append("stop-reading")
    conn.stopWriting = lambda: events.append("stop-writing")
    conn.connectionLost = lambda reason: events.append(reason.type.__name__)
    assert fastwrite.close_now(conn)
    assert events == ["stop-reading", "stop-writing", "ConnectionDone"]


@pytest.mark.parametrize(
    "state",
    [{"TLS": True}, {"_tempDataLen": 3}, {"dataBuffer": b"xyz"}, {"disconnecting": True}],
    ids=["tls", "temp-queue", "buffer", "disconnecting"],
)
def test_close_now_leaves_anything_queued_or_tls_to_lose_connection(
    state: dict[str, Any],
) -> None:
    """Bytes still queued must be written first; TLS must send its close_notify."""
    conn = connection(FakeSocket(), **state)
    conn.connectionLost = lambda reason: pytest.fail("closed with bytes queued")
    assert not fastwrite.close_now(conn)
    assert not fastwrite.close_now(StringTransport())


# -- the Twisted internals relied on (issue 14) ---------------------------------------------------


class _Reactor:
    """Just what a tcp.Server asks of its reactor: which descriptors to watch."""

    def __init__(self) -> None:
        self.readers: set[Any] = set()
        self.writers: set[Any] = set()

    def addReader(self, reader: Any) -> None:
        self.readers.add(reader)

    def removeReader(self, reader: Any) -> None:
        self.readers.discard(reader)

    def addWriter(self, writer: Any) -> None:
        self.writers.add(writer)

    def removeWriter(self, writer: Any) -> None:
        self.writers.discard(writer)


def test_twisted_tcp_transport_internals_mean_what_fastwrite_assumes() -> None:
    """Fails loudly when a Twisted release changes the TCP transport's write buffer.

    fastwrite reads: ``_tempDataLen`` (bytes written since the last ``doWrite``),
    ``dataBuffer[offset:]`` (bytes not yet sent), ``producer``, ``connected``,
    ``disconnecting``, ``TLS``, ``socket`` (the socket to ``send`` on) and calls ``doWrite``
    (send what is buffered, as the reactor would).
    """
    import socket

    from twisted.internet.protocol import Protocol

    ours, theirs = socket.socketpair()
    try:
        ours.setblocking(False)
        reactor = _Reactor()
        conn = tcp.Server(ours, Protocol(), ("127.0.0.1", 1), None, 1, reactor)  # type: ignore[arg-type]
        for name in fastwrite.TRANSPORT_INTERNALS:
            assert hasattr(conn, name), name
        assert conn.socket is ours
        assert conn.connected and not conn.disconnecting and not conn.TLS
        assert conn.producer is None
        assert (conn._tempDataLen, conn.offset, conn.dataBuffer) == (0, 0, b"")

        conn.write(b"queued ")  # Twisted queues: nothing sent, the reactor asked to write
        assert conn._tempDataLen == len(b"queued ") and conn in reactor.writers
        conn.doWrite()  # what the reactor calls: everything goes, nothing is left
        assert conn._tempDataLen == 0 and conn.offset == len(conn.dataBuffer)
        assert conn not in reactor.writers

        fastwrite.write(conn, b"at once")  # idle again: straight to the socket
        assert conn._tempDataLen == 0 and conn not in reactor.writers
        assert theirs.recv(100) == b"queued at once"

        # close_now: stop reading, then connectionLost(ConnectionDone) as doWrite would
        # after a loseConnection: an orderly close the peer sees as end of file.
        reactor.addReader(conn)
        lost: list[Failure] = []
        cast(Any, conn.protocol).connectionLost = lost.append
        assert fastwrite.close_now(conn)
        assert conn not in reactor.readers and conn not in reactor.writers
        assert [f.type for f in lost] == [ConnectionDone]
        assert ours.fileno() == -1 and theirs.recv(100) == b""
    finally:
        ours.close()
        theirs.close()


def test_without_the_internals_writes_go_through_twisted_with_one_warning(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(fastwrite, "_usable", None)
    monkeypatch.setattr(
        fastwrite, "TRANSPORT_INTERNALS", (*fastwrite.TRANSPORT_INTERNALS, "_goneInTwisted99")
    )
    clock = Clock()
    sock = FakeSocket()
    conns = [connection(sock, reactor=clock) for _ in range(2)]
    with captured_events() as events:
        for conn in conns:
            fastwrite.write(conn, b"250 2.0.0 Ok\r\n")
            assert fastwrite.flush_later(conn, lambda: None) is False
    assert sock.sent == [] and [c.queued for c in conns] == [[b"250 2.0.0 Ok\r\n"]] * 2
    warnings = [e for e in events if "fastwrite" in e.get("log_format", "")]
    assert len(warnings) == 1
    assert warnings[0]["missing"] == "_goneInTwisted99"

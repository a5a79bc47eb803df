"""Real sockets on 127.0.0.1: TCP_NODELAY and pipelined replies in one segment burst."""

from __future__ import annotations

import socket

import pytest_twisted
from twisted.internet import reactor, threads
from twisted.internet.endpoints import TCP4ServerEndpoint

from slimta_tx import Policy, SmtpEdge
from slimta_tx.testing import RecordingBus


def _client_session(port: int) -> list[bytes]:
    """A raw client: one pipelined write, then read until QUIT's reply."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        received = b""
        while not received.endswith(b"\r\n"):
            received += sock.recv(4096)
        sock.sendall(b"EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<u@example.com>\r\nDATA\r\n")
        while b"354 " not in received:
            received += sock.recv(4096)
        sock.sendall(b"Subject: x\r\n\r\nhi\r\n.\r\nQUIT\r\n")
        while b"221 " not in received:
            chunk = sock.recv(4096)
            if not chunk:
                break
            received += chunk
        return received.split(b"\r\n")


@pytest_twisted.inlineCallbacks
def test_tcp_nodelay_and_delivery_over_a_real_socket():  # type: ignore[no-untyped-def]
    """The server sets TCP_NODELAY on accepted sockets and serves a pipelined client."""
    bus = RecordingBus()
    edge = SmtpEdge(bus, Policy(hostname="mx.test", accepted_domains=("example.com",)))
    nodelay: list[int] = []
    original = edge.connection_made

    def spy(proto):  # type: ignore[no-untyped-def]
        original(proto)
        handle = proto.transport.getHandle()
        nodelay.append(handle.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

    edge.connection_made = spy  # type: ignore[method-assign]
    port = yield edge.listen(TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1"))
    try:
        lines = yield threads.deferToThread(_client_session, port.getHost().port)
    finally:
        yield edge.close()
    assert nodelay == [1]
    codes = [line[:3] for line in lines if line]
    assert codes[-3:] == [b"354", b"250", b"221"]
    assert bus.messages[0].data == b"Subject: x\r\n\r\nhi\r\n"


def _bdat_session(port: int) -> bytes:
    """A raw client sending one message in three pipelined BDAT chunks."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        received = b""
        while not received.endswith(b"\r\n"):
            received += sock.recv(4096)
        sock.sendall(b"EHLO c\r\n")
        while b"250 " not in received:
            received += sock.recv(4096)
        sock.sendall(
            b"MAIL FROM:<a@b.test>\r\nRCPT TO:<u@example.com>\r\n"
            b"BDAT 12\r\nSubject: x\r\nBDAT 2\r\n\r\nBDAT 10 LAST\r\n.hi\r\nbye\r\nQUIT\r\n"
        )
        while b"221 " not in received:
            chunk = sock.recv(4096)
            if not chunk:
                break
            received += chunk
        return received


@pytest_twisted.inlineCallbacks
def test_bdat_over_a_real_socket():  # type: ignore[no-untyped-def]
    """CHUNKING is advertised and pipelined BDAT chunks arrive as one message, unstuffed never."""
    bus = RecordingBus()
    edge = SmtpEdge(bus, Policy(hostname="mx.test", accepted_domains=("example.com",)))
    port = yield edge.listen(TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1"))
    try:
        received = yield threads.deferToThread(_bdat_session, port.getHost().port)
    finally:
        yield edge.close()
    assert b"250-CHUNKING" in received or b"250 CHUNKING" in received
    assert received.count(b"octets received") == 2
    assert bus.messages[0].data == b"Subject: x\r\n\r\n.hi\r\nbye\r\n"

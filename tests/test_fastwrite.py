"""Write-through: straight to the socket only when that keeps the order; else transport.write."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet import tcp
from twisted.internet.testing import StringTransport

from slimta_tx import fastwrite


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


def test_other_transports_use_their_own_write() -> None:
    transport = StringTransport()
    fastwrite.write(transport, b"data")
    assert transport.value() == b"data"

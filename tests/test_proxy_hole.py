"""Issue 10's security hole, as a new user meets it: Twisted's ``haproxy:`` endpoint in front of
the edge must not make every client look like the (trusted) proxy.

Real sockets on 127.0.0.1, the real reactor, a raw client sending exact bytes.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest_twisted
from twisted.internet import reactor, threads
from twisted.internet.endpoints import serverFromString

from slimta_tx import Policy, SmtpEdge
from slimta_tx.testing import RecordingBus
from tests.support.wire import WireClient

V1_HEADER = b"PROXY TCP4 203.0.113.9 127.0.0.1 40000 25\r\n"


@dataclass
class Listening:
    edge: SmtpEdge
    port: int


@pytest_twisted.async_yield_fixture
async def twisted_haproxy_edge() -> AsyncIterator[Listening]:
    """An edge for example.com (relay for loopback only, the default) listening through
    Twisted's own ``haproxy:`` endpoint, as ``--listen haproxy:tcp:...`` builds it."""
    edge = SmtpEdge(RecordingBus(), Policy(hostname="mx.test", accepted_domains=("example.com",)))
    endpoint = serverFromString(reactor, "haproxy:tcp:0:interface=127.0.0.1")
    port = await edge.listen(endpoint)
    yield Listening(edge, port.getHost().port)
    await edge.close()


@pytest_twisted.ensureDeferred
async def test_client_behind_proxy_cannot_relay(twisted_haproxy_edge: Listening) -> None:
    """The client named by the PROXY header (203.0.113.9, not trusted) gets 554 5.7.1 for a
    recipient outside the accepted domains; it must not inherit the proxy's loopback trust."""

    def client() -> list[tuple[str, str]]:
        with WireClient(twisted_haproxy_edge.port, timeout=10) as smtp:
            smtp.send(V1_HEADER)
            return [
                smtp.reply(),
                smtp.command("EHLO client.test"),
                smtp.command("MAIL FROM:<a@b.org>"),
                smtp.command("RCPT TO:<c@example.net>"),
                smtp.command("RCPT TO:<c@example.com>"),
            ]

    replies = await threads.deferToThread(client)
    assert [code for code, _ in replies] == ["220", "250", "250", "554", "250"]
    assert replies[3][1].startswith("5.7.1")


@pytest_twisted.ensureDeferred
async def test_connection_without_header_gets_no_banner(twisted_haproxy_edge: Listening) -> None:
    """A connection that speaks SMTP without a PROXY header is closed without a banner and
    without an answer: it is never served as the proxy itself."""

    def client() -> bytes:
        with socket.create_connection(("127.0.0.1", twisted_haproxy_edge.port), timeout=10) as s:
            s.sendall(b"EHLO client.test\r\n")
            received = b""
            while True:
                try:
                    chunk = s.recv(4096)
                except ConnectionResetError:
                    break
                if not chunk:
                    break
                received += chunk
            return received

    assert await threads.deferToThread(client) == b""

"""The relay bus against controllable next hops on 127.0.0.1: aiosmtpd and small Twisted
servers. Down, slow, dropping mid-DATA, AUTH, STARTTLS, and memory while streaming."""

from __future__ import annotations

import asyncio
import smtplib
import ssl
import tracemalloc
from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted
import trustme
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.threads import deferToThread

from slimta_tx.bus.relay import RelayBus, next_hop_endpoint
from slimta_tx.envelope import Envelope
from slimta_tx.factory import SmtpEdge
from slimta_tx.policy import Policy
from slimta_tx.spool import Spool
from tests.support.postfix import free_port

CA = trustme.CA()
LEAF = CA.issue_cert("localhost", "127.0.0.1")


class Handler:
    """Records messages; ``hold`` makes DATA wait (a slow next hop) until released."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, list[str], bytes, bool]] = []
        self.hold: asyncio.Event | None = None

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if self.hold is not None:
            await self.hold.wait()
        self.messages.append(
            (envelope.mail_from, list(envelope.rcpt_tos), envelope.content, bool(session.ssl))
        )
        return "250 2.0.0 Ok: queued as AIO123"


def authenticate(server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> Any:
    ok = data.login == b"relay" and data.password == b"s3cret"
    return AuthResult(success=ok, handled=False)  # handled=False: aiosmtpd sends the 535


@pytest.fixture
def aiosmtpd_hop() -> Iterator[tuple[Controller, Handler]]:
    handler = Handler()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    LEAF.configure_cert(context)
    controller = Controller(
        handler,
        hostname="127.0.0.1",
        port=free_port(),
        tls_context=context,
        authenticator=authenticate,
        auth_require_tls=False,
    )
    controller.start()
    try:
        yield controller, handler
    finally:
        if handler.hold is not None:
            controller.loop.call_soon_threadsafe(handler.hold.set)
        controller.stop()


def envelope(body: bytes = b"Subject: t\r\n\r\nhello\r\n") -> Envelope:
    spool = Spool()
    spool.write(body)
    env = Envelope(sender="edge@edge.test")
    env.add_recipient("bob@example.test", {})
    env.message = spool
    return env


def relay(port: int, **kwargs: Any) -> RelayBus:
    kwargs.setdefault("tls", "none")
    kwargs.setdefault("timeout", 5.0)
    return RelayBus(
        next_hop_endpoint(reactor, f"127.0.0.1:{port}"), reactor, hostname="edge.test", **kwargs
    )


@pytest_twisted.inlineCallbacks
def test_next_hop_down_is_451_4_4_1() -> Any:
    """Nothing listening: 451 4.4.1 at once (the client retries later)."""
    bus = relay(free_port())
    reply = yield bus.send(envelope())
    assert (reply.code, reply.enhanced_status_code) == ("451", "4.4.1")


@pytest_twisted.inlineCallbacks
def test_slow_next_hop_times_out_with_451_4_4_1(aiosmtpd_hop: Any) -> Any:
    """A next hop that never answers the final dot: 451 4.4.1 after --relay-timeout."""
    controller, handler = aiosmtpd_hop
    handler.hold = asyncio.Event()
    bus = relay(controller.port, timeout=0.5)
    reply = yield bus.send(envelope())
    assert (reply.code, reply.enhanced_status_code) == ("451", "4.4.1")
    assert "in time" in reply.message


@pytest_twisted.inlineCallbacks
def test_auth_plain_to_next_hop(aiosmtpd_hop: Any) -> Any:
    """With credentials, the bus authenticates (PLAIN) and the message goes through."""
    controller, handler = aiosmtpd_hop
    bus = relay(controller.port, credentials=("relay", "s3cret"), allow_plaintext_auth=True)
    reply = yield bus.send(envelope())
    bus.close()
    assert str(reply) == "250 2.0.0 Ok: queued as AIO123"
    assert len(handler.messages) == 1


@pytest_twisted.inlineCallbacks
def test_wrong_credentials_are_temporary(aiosmtpd_hop: Any) -> Any:
    """The next hop refusing our credentials is our problem, not the sender's: 451 4.7.0."""
    controller, handler = aiosmtpd_hop
    bus = relay(controller.port, credentials=("relay", "wrong"), allow_plaintext_auth=True)
    reply = yield bus.send(envelope())
    assert (reply.code, reply.enhanced_status_code) == ("451", "4.7.0")
    assert handler.messages == []


@pytest_twisted.inlineCallbacks
def test_opportunistic_starttls(aiosmtpd_hop: Any) -> Any:
    """Opportunistic TLS: STARTTLS when offered (certificate not checked), message encrypted."""
    controller, handler = aiosmtpd_hop
    bus = relay(controller.port, tls="opportunistic")
    reply = yield bus.send(envelope())
    bus.close()
    assert reply.code == "250", reply
    assert handler.messages[0][3] is True


@pytest_twisted.inlineCallbacks
def test_required_tls_without_starttls_is_refused() -> Any:
    """tls=required and a next hop without STARTTLS: 451 4.7.0, nothing sent in clear."""
    handler = Handler()
    controller = Controller(handler, hostname="127.0.0.1", port=free_port())
    controller.start()
    try:
        from twisted.internet.ssl import optionsForClientTLS

        bus = relay(controller.port, tls="required", tls_options=optionsForClientTLS("localhost"))
        reply = yield bus.send(envelope())
    finally:
        controller.stop()
    assert (reply.code, reply.enhanced_status_code) == ("451", "4.7.0")
    assert handler.messages == []


class DropsMidData(Protocol):
    """Says yes to everything, then hangs up after some of the message arrived."""

    def connectionMade(self) -> None:
        self.in_data = 0
        self.transport.write(b"220 drop.test\r\n")

    def dataReceived(self, data: bytes) -> None:
        if self.in_data:
            self.in_data += len(data)
            if self.in_data > 10_000:
                self.transport.loseConnection()
            return
        for line in data.split(b"\r\n"):
            if line.upper().startswith(b"EHLO"):
                self.transport.write(b"250-drop.test\r\n250 PIPELINING\r\n")
            elif line.upper().startswith(b"DATA"):
                self.transport.write(b"354 go\r\n")
                self.in_data = 1
            elif line:
                self.transport.write(b"250 ok\r\n")


@pytest_twisted.inlineCallbacks
def test_next_hop_dropping_mid_data_is_451_4_4_2() -> Any:
    """The connection lost while the message is sent: 451 4.4.2; the client keeps it."""
    port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
        Factory.forProtocol(DropsMidData)
    )
    try:
        bus = relay(port.getHost().port)
        reply = yield bus.send(envelope(b"Subject: big\r\n\r\n" + b"y" * 78 + b"\r\n" * 20_000))
    finally:
        yield port.stopListening()
    assert (reply.code, reply.enhanced_status_code) == ("451", "4.4.2")


class Sink(Protocol):
    """Accepts one message of any size and throws the bytes away (counts them)."""

    def connectionMade(self) -> None:
        self.in_data = False
        self.tail = b""
        self.transport.write(b"220 sink.test\r\n")

    def dataReceived(self, data: bytes) -> None:
        if self.in_data:
            self.tail = (self.tail + data)[-5:]
            if self.tail == b"\r\n.\r\n":
                self.in_data = False
                self.transport.write(b"250 2.0.0 sunk\r\n")
            return
        for line in data.split(b"\r\n"):
            if line.upper().startswith(b"EHLO"):
                self.transport.write(b"250-sink.test\r\n250 PIPELINING\r\n")
            elif line.upper().startswith(b"DATA"):
                self.transport.write(b"354 go\r\n")
                self.in_data = True
            elif line:
                self.transport.write(b"250 ok\r\n")


@pytest_twisted.inlineCallbacks
def test_memory_stays_flat_for_a_large_message() -> Any:
    """A 32 MiB message goes out with under 4 MiB of Python memory at peak: it streams from
    the spool file instead of being read whole."""
    port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
        Factory.forProtocol(Sink)
    )
    spool = Spool()
    line = b"z" * 1022 + b"\r\n"
    for _ in range(32 * 1024):
        spool.write(line)
    env = envelope()
    env.message = spool
    try:
        bus = relay(port.getHost().port)
        tracemalloc.start()
        reply = yield bus.send(env)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        bus.close()
    finally:
        yield port.stopListening()
    assert reply.code == "250", reply
    assert peak < 4 * 1024 * 1024, peak


@pytest_twisted.inlineCallbacks
def test_edge_with_relay_bus_end_to_end(aiosmtpd_hop: Any) -> Any:
    """A real client -> the edge -> the relay bus -> aiosmtpd: the client's reply is the next
    hop's (with its queue id) and the next hop has the message with our Received: header."""
    controller, handler = aiosmtpd_hop
    bus = relay(controller.port)
    edge = SmtpEdge(bus, Policy(hostname="edge.test"), reactor=reactor)
    port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(edge)

    def client() -> Any:
        with smtplib.SMTP("127.0.0.1", port.getHost().port, timeout=10) as smtp:
            smtp.ehlo("client.test")
            smtp.mail("alice@client.test")
            smtp.rcpt("bob@example.test")
            return smtp.data(b"Subject: e2e\r\n\r\nthrough the edge\r\n")

    try:
        code, text = yield deferToThread(client)
    finally:
        yield port.stopListening()
        bus.close()
    assert code == 250 and b"queued as AIO123" in text
    ((sender, rcpts, content, _),) = handler.messages
    assert (sender, rcpts) == ("alice@client.test", ["bob@example.test"])
    assert content.startswith(b"Received: from client.test")
    assert content.endswith(b"through the edge\r\n")

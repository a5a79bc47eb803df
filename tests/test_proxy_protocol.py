"""PROXY protocol listeners on a StringTransport with a Clock: nothing before the header, the
header's client everywhere afterwards, and every way a connection is turned away. Each test
runs over slimta_tx's own layer (ProxyFactory) and over Twisted's haproxy wrapper, which the
session takes over."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from test_policies_dns import FakeResolver, a, ptr
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.names import dns
from twisted.protocols.haproxy._wrapper import HAProxyWrappingFactory

from slimta_tx import Policy, SmtpEdge
from slimta_tx.bus.amqp import message_properties
from slimta_tx.policies import ConnectionLimits, DnsblPolicy, EarlyTalkerPolicy, ReverseDnsPolicy
from slimta_tx.policy import parse_network
from slimta_tx.protocol import ESMTPServerProtocol
from slimta_tx.proxy import ProxyFactory, ProxyProtocol
from slimta_tx.proxy_header import v1_header, v2_header
from slimta_tx.testing import RecordingBus, parse_replies
from tests.support.logs import captured_events

POLICY = Policy(hostname="mx.test", accepted_domains=("example.com",))
PROXY_PEER = ("127.0.0.1", 51000)
CLIENT = ("203.0.113.9", 40000)
LISTENER = ("192.0.2.25", 25)
MESSAGE = b"From: a@b.org\r\nSubject: proxied\r\n\r\nhello\r\n"


def ours(edge: SmtpEdge) -> Any:
    return ProxyFactory(edge)


def twisteds(edge: SmtpEdge) -> Any:
    return HAProxyWrappingFactory(edge)


LAYERS = pytest.mark.parametrize("layer", [ours, twisteds], ids=["slimta_tx", "twisted"])


def _address(peer: tuple[str, int]) -> IPv4Address | IPv6Address:
    if ":" in peer[0]:
        return IPv6Address("TCP", *peer)
    return IPv4Address("TCP", *peer)


class Connection:
    """One connection from ``peer`` to a PROXY listener built by ``layer``."""

    def __init__(
        self,
        edge: SmtpEdge,
        layer: Callable[[SmtpEdge], Any],
        peer: tuple[str, int] = PROXY_PEER,
    ) -> None:
        self.edge = edge
        factory = layer(edge)
        self.proto = factory.buildProtocol(_address(peer))
        self.transport = StringTransport(
            hostAddress=IPv4Address("TCP", "127.0.0.1", 2526), peerAddress=_address(peer)
        )
        self.proto.makeConnection(self.transport)

    def send(self, data: bytes) -> list[tuple[str, str]]:
        self.proto.dataReceived(data)
        return self.read()

    def read(self) -> list[tuple[str, str]]:
        data = self.transport.value()
        self.transport.clear()
        return parse_replies(data)

    def cmd(self, line: str) -> str:
        [(code, text)] = self.send(line.encode() + b"\r\n")
        return f"{code} {text}"

    @property
    def closed(self) -> bool:
        return bool(self.transport.disconnecting)

    @property
    def session_protocol(self) -> ESMTPServerProtocol:
        t = self.transport
        [proto] = [p for p in self.edge.connections if getattr(p.transport, "transport", 0) is t]
        return proto


def make_edge(policy: Policy = POLICY, bus: Any = None) -> tuple[SmtpEdge, Clock]:
    clock = Clock()
    return SmtpEdge(bus or RecordingBus(), policy, reactor=clock), clock


# -- the client named by the header -------------------------------------------------------------


HEADERS = {
    "v1-tcp4": (v1_header(CLIENT, LISTENER), CLIENT),
    "v2-tcp4": (v2_header(CLIENT, LISTENER), CLIENT),
    "v1-tcp6": (v1_header(("2001:db8::9", 40000), ("2001:db8::25", 25)), ("2001:db8::9", 40000)),
    "v2-tcp6": (v2_header(("2001:db8::9", 40000), ("2001:db8::25", 25)), ("2001:db8::9", 40000)),
}


@LAYERS
@pytest.mark.parametrize("kind", list(HEADERS))
def test_header_client_is_the_session_client_everywhere(
    layer: Callable[[SmtpEdge], Any], kind: str
) -> None:
    """No banner before the header. Afterwards the header's client is the session's address:
    it is refused relaying (the proxy, 127.0.0.1, would be trusted), and it is the client in
    Received:, the envelope (and its JSON), the AMQP properties and the transaction log."""
    header, client = HEADERS[kind]
    bus = RecordingBus()
    edge, _ = make_edge(bus=bus)
    conn = Connection(edge, layer)
    assert conn.transport.value() == b""
    assert edge.connections == set()  # no session yet
    [(code, _)] = conn.send(header)
    assert code == "220"
    session = conn.session_protocol.session
    assert session.address == client
    assert conn.cmd("EHLO client.test").startswith("250")
    assert conn.cmd("MAIL FROM:<a@b.org>").startswith("250")
    assert conn.cmd("RCPT TO:<c@example.net>").startswith("554 5.7.1")
    assert conn.cmd("RCPT TO:<c@example.com>").startswith("250")
    assert conn.cmd("DATA").startswith("354")
    with captured_events() as events:
        [(code, _)] = conn.send(MESSAGE + b".\r\n")
    assert code == "250"
    [received] = bus.messages
    envelope = received.envelope
    assert (envelope.client_ip, envelope.client_port) == client
    ip = client[0]
    literal = f"[IPv6:{ip}]" if ":" in ip else f"[{ip}]"
    assert f"from client.test (unknown {literal})".encode() in envelope.received_header()
    assert envelope.to_json_dict()["client"]["ip"] == ip
    properties = message_properties(envelope)
    assert json.loads(properties.headers["slimta-envelope"])["client"]["ip"] == ip
    [logged] = [e for e in events if e.get("queue_id") == envelope.queue_id]
    assert logged["client"] == ip


@LAYERS
def test_a_trusted_client_named_by_the_header_may_relay(layer: Callable[[SmtpEdge], Any]) -> None:
    """The header drives the relay decision both ways: a client in the trusted networks relays
    even though the proxy itself (192.0.2.7 here) is not trusted to."""
    policy = POLICY.evolve(
        trusted_networks=(parse_network("198.51.100.0/24"),),
        trusted_proxies=(parse_network("192.0.2.7"),),
    )
    edge, _ = make_edge(policy)
    conn = Connection(edge, layer, peer=("192.0.2.7", 51000))
    assert conn.send(v1_header(("198.51.100.4", 1234), LISTENER))[0][0] == "220"
    conn.cmd("EHLO client.test")
    conn.cmd("MAIL FROM:<a@b.org>")
    assert conn.cmd("RCPT TO:<c@example.net>").startswith("250")


@LAYERS
def test_header_in_single_bytes(layer: Callable[[SmtpEdge], Any]) -> None:
    """A header split into one-byte reads (TCP may deliver it so) is read whole."""
    edge, _ = make_edge()
    conn = Connection(edge, layer)
    header = v2_header(CLIENT, LISTENER)
    for byte in header[:-1]:
        assert conn.send(bytes([byte])) == []
        assert not conn.closed
    assert conn.send(header[-1:])[0][0] == "220"
    assert conn.session_protocol.session.address == CLIENT


@LAYERS
def test_header_and_first_command_in_one_read(layer: Callable[[SmtpEdge], Any]) -> None:
    """What follows the header in the same read is the client's and is answered."""
    edge, _ = make_edge()
    conn = Connection(edge, layer)
    replies = conn.send(v1_header(CLIENT, LISTENER) + b"EHLO client.test\r\n")
    assert [code for code, _ in replies] == ["220", "250"]


# -- turned away ---------------------------------------------------------------------------------


@LAYERS
def test_no_header_within_the_timeout_closes(layer: Callable[[SmtpEdge], Any]) -> None:
    """Silence: closed after proxy_timeout (10 s by default), without a banner, and logged."""
    edge, clock = make_edge()
    conn = Connection(edge, layer)
    clock.advance(9.9)
    assert not conn.closed
    with captured_events() as events:
        clock.advance(0.1)
    assert conn.closed
    assert conn.transport.value() == b""
    assert any("no PROXY header within 10.0 s" in _text(e) for e in events)


@LAYERS
def test_timeout_is_the_policys(layer: Callable[[SmtpEdge], Any]) -> None:
    edge, clock = make_edge(POLICY.evolve(proxy_timeout=2.5))
    conn = Connection(edge, layer)
    conn.send(b"PROXY TCP4 203.0")  # half a header does not restart anything
    clock.advance(2.5)
    assert conn.closed and conn.transport.value() == b""


@LAYERS
def test_a_header_in_time_cancels_the_timeout(layer: Callable[[SmtpEdge], Any]) -> None:
    edge, clock = make_edge()
    conn = Connection(edge, layer)
    conn.send(v1_header(CLIENT, LISTENER))
    # Only the session's own timers are left: its command timer and its deadlines' timer
    # (due within a body's first check, data_rate_grace).
    assert sorted(call.getTime() for call in clock.getDelayedCalls()) == [
        POLICY.data_rate_grace,
        POLICY.command_timeout,
    ]
    clock.advance(60)
    assert not conn.closed


@LAYERS
@pytest.mark.parametrize(
    "data",
    [
        b"EHLO client.test\r\n",
        b"PROXY TCP4 evil.example 127.0.0.1 1 25\r\n",
        b"PROXY TCP4 203.0.113.9 127.0.0.1 40000 25 extra\r\n",
        b"\r\n\r\n\x00\r\nQUIT\n\x21\x12\x00\x0c" + bytes(12),
    ],
    ids=["smtp", "hostname", "extra-field", "v2-udp"],
)
def test_malformed_header_closes_and_is_logged(
    layer: Callable[[SmtpEdge], Any], data: bytes
) -> None:
    edge, _ = make_edge()
    conn = Connection(edge, layer)
    with captured_events() as events:
        assert conn.send(data) == []
    assert conn.closed
    assert edge.connections == set()
    assert any("malformed PROXY header" in _text(e) for e in events)


@LAYERS
def test_untrusted_peer_is_closed_unread(layer: Callable[[SmtpEdge], Any]) -> None:
    """A connection from outside the trusted proxies (loopback by default) is closed at once;
    a header it sends anyway is never read."""
    edge, clock = make_edge()
    with captured_events() as events:
        conn = Connection(edge, layer, peer=("198.51.100.66", 4000))
    assert conn.closed
    assert any("not a trusted proxy" in _text(e) for e in events)
    assert conn.send(v1_header(("127.0.0.1", 1), LISTENER)) == []
    assert edge.connections == set()
    assert clock.getDelayedCalls() == []


@LAYERS
def test_trusted_proxies_are_the_policys(layer: Callable[[SmtpEdge], Any]) -> None:
    """With other trusted proxies, loopback is no longer one of them."""
    edge, _ = make_edge(POLICY.evolve(trusted_proxies=(parse_network("10.0.0.0/8"),)))
    assert Connection(edge, layer, peer=("127.0.0.1", 4000)).closed
    conn = Connection(edge, layer, peer=("10.1.2.3", 4000))
    assert conn.send(v1_header(CLIENT, LISTENER))[0][0] == "220"


# -- the proxy's own connections ---------------------------------------------------------------


@LAYERS
@pytest.mark.parametrize(
    "header", [v2_header(), b"PROXY UNKNOWN\r\n"], ids=["v2-local", "v1-unknown"]
)
def test_header_naming_no_client_is_the_proxys_own_connection(
    layer: Callable[[SmtpEdge], Any], header: bytes
) -> None:
    """v2 LOCAL (HAProxy's health checks) and v1 UNKNOWN: served with the proxy's address."""
    edge, _ = make_edge()
    conn = Connection(edge, layer)
    assert conn.send(header)[0][0] == "220"
    assert conn.session_protocol.session.address == PROXY_PEER
    assert conn.cmd("QUIT").startswith("221")


# -- per-connection policies see the header's client ---------------------------------------------


@LAYERS
def test_connection_limits_count_the_header_client(layer: Callable[[SmtpEdge], Any]) -> None:
    """Per-IP limits count the clients, not the proxy every connection comes from."""
    edge, _ = make_edge()
    ConnectionLimits(max_connections=1).install(edge)
    first = Connection(edge, layer)
    assert first.send(v1_header(CLIENT, LISTENER))[0][0] == "220"
    second = Connection(edge, layer)
    [(code, text)] = second.send(v1_header((CLIENT[0], 40001), LISTENER))
    assert (code, text) == ("421", "4.7.0 mx.test Too many connections from 203.0.113.9")
    other = Connection(edge, layer)
    assert other.send(v1_header(("203.0.113.10", 1), LISTENER))[0][0] == "220"


@LAYERS
def test_dnsbl_and_reverse_dns_look_up_the_header_client(layer: Callable[[SmtpEdge], Any]) -> None:
    resolver = FakeResolver(
        {
            ("9.113.0.203.bl.example", dns.A): [a("x", "127.0.0.2")],
            ("10.113.0.203.in-addr.arpa", dns.PTR): [ptr("x", "client.example")],
            ("client.example", dns.A): [a("client.example", "203.0.113.10")],
        }
    )
    edge, _ = make_edge()
    DnsblPolicy(["bl.example"], resolver=resolver).install(edge)
    ReverseDnsPolicy(resolver=resolver).install(edge)
    listed = Connection(edge, layer)
    [(code, text)] = listed.send(v1_header(CLIENT, LISTENER))
    assert (code, text) == (
        "554",
        "5.7.1 Service unavailable; client [203.0.113.9] blocked using bl.example",
    )
    clean = Connection(edge, layer)
    assert clean.send(v1_header(("203.0.113.10", 1), LISTENER))[0][0] == "220"
    assert clean.session_protocol.session.reverse_name == "client.example"
    assert ("9.113.0.203.bl.example", dns.A) in resolver.queries
    assert not any("127.0.0.1" in name or "1.0.0.127" in name for name, _ in resolver.queries)


@LAYERS
def test_greeting_delay_starts_after_the_header(layer: Callable[[SmtpEdge], Any]) -> None:
    """The early-talker delay runs from the header, and a client that talks before the
    greeting (even in the header's own read) is refused."""
    edge, clock = make_edge()
    EarlyTalkerPolicy(delay=5).install(edge)
    conn = Connection(edge, layer)
    clock.advance(3)  # waiting for the header does not count
    assert conn.send(v1_header(CLIENT, LISTENER)) == []
    clock.advance(4.9)
    assert conn.read() == []
    clock.advance(0.1)
    assert conn.read()[0][0] == "220"
    talker = Connection(edge, layer)
    talker.send(v1_header(("203.0.113.10", 1), LISTENER) + b"EHLO spam.test\r\n")
    clock.advance(5)
    [(code, text)] = talker.read()
    assert (code, text) == ("554", "5.5.1 Protocol error: talking before the greeting")


# -- the rest of the edge ------------------------------------------------------------------------


def test_accept_gets_the_connection_after_its_header() -> None:
    """edge.accept() hands out a proxied connection only once its header is in, with what the
    client sent after the header kept for the session."""
    edge, clock = make_edge()
    accepted: list[Any] = []
    edge.accept().addCallback(accepted.append)
    conn = Connection(edge, ours)
    assert accepted == []
    conn.send(v1_header(CLIENT, LISTENER) + b"EHLO client.test\r\n")
    [held] = accepted
    held()
    assert conn.read()[0][0] == "220"
    clock.advance(0)
    assert conn.read()[0][0] == "250"
    assert held.session_protocol.session.address == CLIENT


def test_accept_over_twisteds_wrapper_starts_the_session_after_the_header() -> None:
    """Under Twisted's wrapper the held connection is handed out before its header (nothing is
    read while it waits); the session it starts still waits for the header."""
    edge, _ = make_edge()
    accepted: list[Any] = []
    edge.accept().addCallback(accepted.append)
    conn = Connection(edge, twisteds)
    [held] = accepted
    held()
    assert conn.read() == []
    assert conn.send(v1_header(CLIENT, LISTENER))[0][0] == "220"
    assert held.session_protocol.session.address == CLIENT


def test_closing_edge_turns_away_a_header_that_comes_late() -> None:
    edge, _ = make_edge()
    conn = Connection(edge, ours)
    edge.close()
    [(code, _)] = conn.send(v1_header(CLIENT, LISTENER))
    assert code == "421"


def test_connection_lost_before_the_header_leaves_no_session() -> None:
    """A proxy that hangs up before its header: no session, no timer left behind."""
    edge, clock = make_edge()
    conn = Connection(edge, ours)
    lost: list[Any] = []
    edge.disconnect_hooks.append(lost.append)
    conn.proto.connectionLost(None)
    assert clock.getDelayedCalls() == []
    assert lost == [] and edge.connections == set()


def test_layer_reports_header_addresses_and_passes_the_rest_through() -> None:
    edge, _ = make_edge()
    conn = Connection(edge, ours)
    conn.send(v2_header(CLIENT, LISTENER))
    layer = conn.proto
    assert isinstance(layer, ProxyProtocol)
    assert (layer.getPeer().host, layer.getPeer().port) == CLIENT  # type: ignore[attr-defined]
    assert (layer.getHost().host, layer.getHost().port) == LISTENER  # type: ignore[attr-defined]
    assert conn.session_protocol.session.server_address == LISTENER
    assert ProxyFactory(edge).logPrefix() == "SmtpEdge (PROXY)"


def _text(event: dict[str, Any]) -> str:
    from twisted.logger import formatEvent

    return formatEvent(event)


def test_replies_through_the_layer_go_straight_to_the_socket() -> None:
    """fastwrite sees through the PROXY layer (it only passes writes down): a reply goes to
    the TCP connection's socket at once, as without a proxy; after STARTTLS (TLS beneath the
    layer) it goes through the TLS connection's write."""
    from test_fastwrite import FakeSocket, connection

    from slimta_tx import fastwrite

    edge, _ = make_edge()
    sock = FakeSocket()
    tcp_connection = connection(sock)
    layer = ProxyFactory(edge).buildProtocol(_address(PROXY_PEER))
    layer.transport = tcp_connection
    written: list[bytes] = []
    layer.write = written.append  # type: ignore[method-assign]
    fastwrite.write(layer, b"250 2.0.0 Ok\r\n")
    assert sock.sent == [b"250 2.0.0 Ok\r\n"] and written == []
    tcp_connection.TLS = True
    fastwrite.write(layer, b"250 2.0.0 Ok\r\n")
    # TLS beneath the layer: the connection's own write encrypts it (the layer would only
    # have passed it down to the same write), never the socket in clear.
    assert sock.sent == [b"250 2.0.0 Ok\r\n"] and written == []
    assert tcp_connection.queued == [b"250 2.0.0 Ok\r\n"]

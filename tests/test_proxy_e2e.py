"""PROXY listeners over real sockets on 127.0.0.1, with smtplib as the client behind a "proxy"
that sends the header itself: every way an embedder can build the listener, TLS from the first
byte and STARTTLS after a header."""

from __future__ import annotations

import smtplib
import socket
import ssl
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import pytest_twisted
from test_tls_helpers import Certs, make_certs
from twisted.application import strports
from twisted.internet import reactor, threads
from twisted.internet.endpoints import TCP4ServerEndpoint, serverFromString

from slimta_tx import Policy, ServerTLS, SmtpEdge
from slimta_tx.proxy import ProxyConfigError, ProxyFactory, listener_service
from slimta_tx.proxy_header import v1_header, v2_header
from slimta_tx.starttls import wrap_implicit
from slimta_tx.testing import RecordingBus
from tests.support.process import free_port
from tests.support.proxied import ProxiedSMTP, ProxiedSMTP_SSL

CLIENT = ("203.0.113.9", 40000)
LISTENER = ("192.0.2.25", 25)
MESSAGE = b"From: a@b.org\r\nSubject: proxied\r\n\r\nhello\r\n"
TIMEOUT = 10


def new_edge(bus: RecordingBus) -> SmtpEdge:
    return SmtpEdge(bus, Policy(hostname="mx.test", accepted_domains=("example.com",)))


def deliver(port: int, header: bytes, starttls: ssl.SSLContext | None = None) -> dict[str, Any]:
    """Banner, EHLO, a foreign recipient (refused: the client may not relay) and a local one."""
    with ProxiedSMTP(header, "127.0.0.1", port, timeout=TIMEOUT) as smtp:
        smtp.ehlo("client.test")
        if starttls is not None:
            smtp.starttls(context=starttls)
            smtp.ehlo("client.test")
        refused = smtp.sendmail("a@b.org", ["c@example.net", "c@example.com"], MESSAGE)
        return {key: code for key, (code, _) in refused.items()}


async def in_thread(f: Callable[..., Any], *args: Any) -> Any:
    return await threads.deferToThread(f, *args)


@pytest_twisted.async_yield_fixture
async def listening() -> AsyncIterator[Callable[..., Any]]:
    """Start edges with a callable; every edge started is closed afterwards."""
    edges: list[SmtpEdge] = []

    async def start(build: Callable[[SmtpEdge], Any]) -> tuple[SmtpEdge, RecordingBus, int]:
        bus = RecordingBus()
        edge = new_edge(bus)
        edges.append(edge)
        port = await build(edge)
        return edge, bus, port

    yield start
    for edge in edges:
        await edge.close()


async def _listen_proxied(edge: SmtpEdge) -> int:
    port = await edge.listen(TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1"), True)
    return int(port.getHost().port)


async def _twisted_endpoint(edge: SmtpEdge) -> int:
    port = await edge.listen(serverFromString(reactor, "haproxy:tcp:0:interface=127.0.0.1"))
    return int(port.getHost().port)


async def _twisted_endpoint_direct(edge: SmtpEdge) -> int:
    """``endpoint.listen(edge)`` without the edge seeing the endpoint at all."""
    endpoint = serverFromString(reactor, "haproxy:tcp:0:interface=127.0.0.1")
    port = await endpoint.listen(edge)
    edge.ports.append(port)
    return int(port.getHost().port)


async def _adopted(edge: SmtpEdge) -> int:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    edge.adopt(sock, proxy_protocol=True)
    port = int(sock.getsockname()[1])
    sock.close()  # the reactor holds its own copy
    return port


async def _strports(edge: SmtpEdge, description: str) -> int:
    number = free_port()
    service = strports.service(description.format(port=number), edge, reactor=reactor)
    service.startService()
    edge.ports.append(await service._waitingForPort)  # type: ignore[attr-defined]
    return number


async def _twisted_strports(edge: SmtpEdge) -> int:
    return await _strports(edge, "haproxy:tcp:{port}:interface=127.0.0.1")


async def _listener_service(edge: SmtpEdge) -> int:
    number = free_port()
    service = listener_service(f"haproxy:tcp:{number}:interface=127.0.0.1", edge, reactor)
    service.startService()
    edge.ports.append(await service._waitingForPort)  # type: ignore[attr-defined]
    return number


BUILDS = {
    "listen-proxy_protocol": _listen_proxied,
    "listen-twisted-endpoint": _twisted_endpoint,
    "twisted-endpoint-listen": _twisted_endpoint_direct,
    "adopt": _adopted,
    "strports-twisted": _twisted_strports,
    "listener_service": _listener_service,
}


@pytest.mark.parametrize("build", list(BUILDS))
@pytest.mark.parametrize(
    ("header", "client"),
    [
        (v1_header(CLIENT, LISTENER), CLIENT),
        (v2_header(("2001:db8::9", 40000), ("2001:db8::25", 25)), ("2001:db8::9", 40000)),
    ],
    ids=["v1-tcp4", "v2-tcp6"],
)
@pytest_twisted.ensureDeferred
async def test_every_way_to_build_the_listener(
    listening: Callable[..., Any], build: str, header: bytes, client: tuple[str, int]
) -> None:
    """However the listener was built, smtplib behind the header is the client: refused
    relaying, delivered locally with its address in the envelope and Received:."""
    _, bus, port = await listening(BUILDS[build])
    refused = await in_thread(deliver, port, header)
    assert refused == {"c@example.net": 554}
    [message] = bus.messages
    assert (message.envelope.client_ip, message.envelope.client_port) == client
    literal = f"[IPv6:{client[0]}]" if ":" in client[0] else f"[{client[0]}]"
    assert literal.encode() in message.envelope.received_header()


@pytest.mark.parametrize("build", list(BUILDS))
@pytest_twisted.ensureDeferred
async def test_every_way_refuses_a_client_without_header(
    listening: Callable[..., Any], build: str
) -> None:
    """A client that connects straight to the PROXY port and talks SMTP is closed with no
    banner and no answer."""
    _, _, port = await listening(BUILDS[build])
    assert await in_thread(talk_without_header, port) == b""


def talk_without_header(port: int, data: bytes = b"EHLO client.test\r\n") -> bytes:
    """Send ``data``; everything the server sent until it closed."""
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        if data:
            sock.sendall(data)
        received = b""
        while True:
            try:
                chunk = sock.recv(4096)
            except ConnectionResetError:
                return received
            if not chunk:
                return received
            received += chunk


@pytest_twisted.ensureDeferred
async def test_silent_connection_is_closed_after_the_proxy_timeout(
    listening: Callable[..., Any],
) -> None:
    """smtplib, waiting for a banner that never comes, is disconnected after proxy_timeout."""

    async def build(edge: SmtpEdge) -> int:
        edge.policy = edge.policy.evolve(proxy_timeout=0.3)
        return await _listen_proxied(edge)

    _, _, port = await listening(build)

    def connect() -> str:
        try:
            smtplib.SMTP("127.0.0.1", port, timeout=TIMEOUT)
        except smtplib.SMTPServerDisconnected as e:
            return f"disconnected: {e}"
        return "greeted"

    assert (await in_thread(connect)).startswith("disconnected")


@pytest_twisted.ensureDeferred
async def test_proxy_protocol_on_a_haproxy_endpoint_is_refused_at_start() -> None:
    """Two PROXY layers would each expect a header: refused before listening."""
    edge = new_edge(RecordingBus())
    endpoint = serverFromString(reactor, "haproxy:tcp:0:interface=127.0.0.1")
    with pytest.raises(ProxyConfigError, match="reads a PROXY header already"):
        edge.listen(endpoint, proxy_protocol=True)
    assert edge.ports == []


# -- TLS ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("proxy-certs"))


@pytest.fixture(scope="module")
def tls(certs: Certs) -> ServerTLS:
    cert = certs.leaf("localhost", "127.0.0.1", stem="server")
    return ServerTLS(str(cert))


def client_tls(certs: Certs) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(certs.ca_file))


def deliver_implicit(port: int, header: bytes, ctx: ssl.SSLContext) -> dict[str, Any]:
    with ProxiedSMTP_SSL(header, "localhost", port, timeout=TIMEOUT, context=ctx) as smtp:
        smtp.ehlo("client.test")
        refused = smtp.sendmail("a@b.org", ["c@example.net", "c@example.com"], MESSAGE)
        return {key: code for key, (code, _) in refused.items()}


@pytest.mark.parametrize("layer", ["slimta_tx", "twisted"])
@pytest_twisted.ensureDeferred
async def test_tls_from_the_first_byte_after_the_header(
    listening: Callable[..., Any], tls: ServerTLS, certs: Certs, layer: str
) -> None:
    """``--tls-listen haproxy:...``: the header in clear, then TLS; the session is the header's
    client and TLS (Received: says ESMTPS). Also under Twisted's wrapper, beneath TLS."""

    async def build(edge: SmtpEdge) -> int:
        edge.enable_tls(tls)
        if layer == "slimta_tx":
            factory = ProxyFactory(edge, wrap_implicit(edge))
            port = reactor.listenTCP(0, factory, interface="127.0.0.1")  # type: ignore[attr-defined]
            edge.ports.append(port)
        else:
            endpoint = serverFromString(reactor, "haproxy:tcp:0:interface=127.0.0.1")
            port = await endpoint.listen(wrap_implicit(edge))
            edge.ports.append(port)
        return int(port.getHost().port)

    _, bus, port = await listening(build)
    header = v1_header(CLIENT, LISTENER)
    refused = await in_thread(deliver_implicit, port, header, client_tls(certs))
    assert refused == {"c@example.net": 554}
    [message] = bus.messages
    assert message.envelope.client_ip == CLIENT[0]
    assert message.envelope.security == "TLS"
    trace = message.envelope.received_header()
    assert b"[203.0.113.9]" in trace and b"with ESMTPS" in trace


@pytest.mark.parametrize("build", ["listen-proxy_protocol", "listen-twisted-endpoint"])
@pytest_twisted.ensureDeferred
async def test_starttls_after_a_header(
    listening: Callable[..., Any], tls: ServerTLS, certs: Certs, build: str
) -> None:
    """STARTTLS on a proxied connection: TLS starts beneath the PROXY layer, the client stays
    the header's."""

    async def start(edge: SmtpEdge) -> int:
        edge.enable_tls(tls)
        return int(await BUILDS[build](edge))

    _, bus, port = await listening(start)
    refused = await in_thread(deliver, port, v2_header(CLIENT, LISTENER), client_tls(certs))
    assert refused == {"c@example.net": 554}
    [message] = bus.messages
    assert (message.envelope.client_ip, message.envelope.security) == (CLIENT[0], "TLS")


def header_and_client_hello_together(port: int, ctx: ssl.SSLContext) -> bytes:
    """Send the header and the ClientHello in one segment, then finish the handshake by hand
    and read the banner (a memory-BIO TLS client)."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        try:
            tls.do_handshake()
        except ssl.SSLWantReadError:
            pass
        sock.sendall(v1_header(CLIENT, LISTENER) + outgoing.read())
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                data = outgoing.read()
                if data:
                    sock.sendall(data)
                chunk = sock.recv(65536)
                if not chunk:
                    raise ConnectionError("closed during the handshake") from None
                incoming.write(chunk)
        sock.sendall(outgoing.read())
        while True:
            try:
                return tls.read(4096)
            except ssl.SSLWantReadError:
                incoming.write(sock.recv(65536))


@pytest.mark.parametrize("build", ["listen-proxy_protocol", "listen-twisted-endpoint"])
@pytest_twisted.ensureDeferred
async def test_immediate_tls_with_the_client_hello_in_the_headers_segment(
    listening: Callable[..., Any], tls: ServerTLS, certs: Certs, build: str
) -> None:
    """``enable_tls(ctx, immediately=True)``: the session starts TLS as soon as the header is
    in; a ClientHello that came in the same read as the header goes to the TLS layer (not to
    SMTP as plaintext), and the banner comes inside TLS."""

    greeted: list[tuple[Any, ...]] = []

    async def start(edge: SmtpEdge) -> int:
        edge.enable_tls(tls, immediately=True)
        edge.set_validator("BANNER", lambda s, r: greeted.append((s.address, s.security)))
        return int(await BUILDS[build](edge))

    _, _, port = await listening(start)
    banner = await in_thread(header_and_client_hello_together, port, client_tls(certs))
    assert banner.startswith(b"220 mx.test")
    assert greeted == [(CLIENT, "TLS")]

"""The standard-library TLS layer (slimta_tx.tlslayer) over real sockets on 127.0.0.1: which
layer STARTTLS installs, the session's TLS facts, SNI, versions and ciphers, injection, failed
handshakes, reload, large writes and close_notify in both directions."""

from __future__ import annotations

import smtplib
import socket
import ssl
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from cryptography import x509
from OpenSSL import SSL
from test_tls_e2e import (
    TIMEOUT,
    Server,
    _serve,
    client_context,
    inject_after_starttls,
    send_starttls,
)
from test_tls_helpers import Certs, in_thread, make_certs
from twisted.internet import defer, reactor
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import globalLogPublisher
from zope.interface import implementer

from slimta_tx import ServerTLS
from slimta_tx.cli.tls import reload_certificates
from slimta_tx.tlslayer import StdlibTLS, start_tls


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("tls-layer-certs"))


@pytest.fixture
def server(certs: Certs, tmp_path: Path) -> Iterator[Server]:
    cert = certs.leaf("localhost", "127.0.0.1", stem="layer")
    yield from _serve(ServerTLS(str(cert)), tmp_path)


def handles(server: Server) -> list[Any]:
    """The TLS handle of each session that reached MAIL (recorded by a MAIL validator)."""
    return [session.extra.get("handle") for session in server.sessions or []]


def record_handles(server: Server) -> None:
    def on_mail(session: Any, reply: Any, *extra: Any) -> None:
        for proto in server.edge.connections:
            if proto.session is session:
                session.extra["handle"] = proto.transport.getHandle()  # type: ignore[union-attr]
        server.sessions.append(session)  # type: ignore[union-attr]

    server.edge.set_validator("MAIL", on_mail)


def test_which_layer_serves() -> None:
    """Standard library by default; pyOpenSSL with layer='twisted' or with client CAs."""
    certs = make_certs(Path(__import__("tempfile").mkdtemp(prefix="tls-layer-")))
    cert = str(certs.leaf("localhost"))
    assert isinstance(ServerTLS(cert).stdlib_context(), ssl.SSLContext)
    assert ServerTLS(cert, layer="twisted").stdlib_context() is None
    assert ServerTLS(cert, client_ca=str(certs.ca_file)).stdlib_context() is None
    with pytest.raises(ValueError, match="TLS layer must be one of stdlib, twisted"):
        ServerTLS(cert, layer="openssl")


@pytest_twisted.inlineCallbacks
def test_starttls_delivers_through_the_stdlib_layer(server: Server, certs: Certs) -> Any:
    """STARTTLS installs the standard-library layer; the session records version and cipher
    as before, the message arrives (Received: says ESMTPS) and STARTTLS is not offered again."""
    record_handles(server)
    result = yield in_thread(send_starttls, server.port, client_context(certs))
    assert result["starttls_code"] == 220 and not result["advertised_after"]
    [handle] = handles(server)
    assert isinstance(handle, ssl.SSLObject)
    [session] = server.sessions  # type: ignore[misc]
    assert session.security == "TLS"
    assert session.tls.version == result["version"] == "TLSv1.3"
    assert session.tls.cipher.startswith("TLS_")
    assert session.tls.client_certificate is False
    assert session.tls.server_name is None  # smtplib by IP address: no SNI
    [message] = server.messages()
    assert b"with ESMTPS" in message


@pytest_twisted.inlineCallbacks
def test_twisted_layer_on_request(certs: Certs, tmp_path: Path) -> Any:
    """layer='twisted': the same session over Twisted's pyOpenSSL layer."""
    cert = certs.leaf("localhost", "127.0.0.1", stem="twisted-layer")
    gen = _serve(ServerTLS(str(cert), layer="twisted"), tmp_path)
    server = next(gen)
    try:
        record_handles(server)
        result = yield in_thread(send_starttls, server.port, client_context(certs))
    finally:
        gen.close()
    assert result["starttls_code"] == 220
    [handle] = handles(server)
    assert isinstance(handle, SSL.Connection)
    assert server.sessions[0].tls.version == "TLSv1.3"  # type: ignore[index, union-attr]


def starttls_peer(
    port: int, ctx: ssl.SSLContext, name: str | None, send: bool = True
) -> dict[str, Any]:
    with smtplib.SMTP("127.0.0.1", port, timeout=TIMEOUT) as smtp:
        smtp.ehlo("client.test")
        smtp._host = name  # type: ignore[attr-defined]  # the SNI smtplib sends
        smtp.starttls(context=ctx)
        assert smtp.sock is not None
        tls: Any = smtp.sock
        der = tls.getpeercert(binary_form=True)
        cert = x509.load_der_x509_certificate(der)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        smtp.ehlo("client.test")
        if send:
            smtp.mail("a@sender.test")
            smtp.rset()
        return {
            "names": san.value.get_values_for_type(x509.DNSName),
            "version": tls.version(),
            "cipher": tls.cipher()[0],
        }


@pytest_twisted.inlineCallbacks
def test_sni_after_starttls(certs: Certs, tmp_path: Path) -> Any:
    """A certificate directory under the stdlib layer: each name gets its certificate (exact,
    then wildcard), others the default; the session records the name asked for."""
    directory = tmp_path / "certdir"
    directory.mkdir()
    by_name = Certs(certs.ca, directory, certs.ca_file)
    by_name.leaf("mail.example.org")
    by_name.leaf("*.example.net").rename(directory / "*.example.net.pem")
    default = certs.leaf("mx.test", stem="layer-sni-default")
    gen = _serve(ServerTLS(str(default), certificate_dir=str(directory)), tmp_path)
    server = next(gen)
    try:
        verify = client_context(certs)
        loose = client_context(certs, check_hostname=False)
        org = yield in_thread(starttls_peer, server.port, verify, "mail.example.org")
        net = yield in_thread(starttls_peer, server.port, verify, "smtp.example.net")
        other = yield in_thread(starttls_peer, server.port, loose, "other.test")
    finally:
        gen.close()
    assert org["names"] == ["mail.example.org"]
    assert net["names"] == ["*.example.net"]
    assert other["names"] == ["mx.test"]
    names = [s.tls.server_name for s in server.sessions]  # type: ignore[union-attr]
    assert names == ["mail.example.org", "smtp.example.net", "other.test"]


def failed_handshakes() -> tuple[list[dict[str, Any]], Any]:
    seen: list[dict[str, Any]] = []

    def observe(event: dict[str, Any]) -> None:
        if "handshake failed" in event.get("log_format", ""):
            seen.append(event)

    globalLogPublisher.addObserver(observe)
    return seen, lambda: globalLogPublisher.removeObserver(observe)


@pytest_twisted.inlineCallbacks
def test_versions_and_ciphers_after_starttls(certs: Certs, tmp_path: Path) -> Any:
    """The cipher list and minimum version reach the stdlib layer: a TLS 1.2 client gets the
    cipher chosen; with min_version '1.3' its handshake fails and the failure is logged."""
    cert = certs.leaf("localhost", "127.0.0.1", stem="layer-policy")
    tls12 = client_context(certs, maximum_version=ssl.TLSVersion.TLSv1_2)
    gen = _serve(ServerTLS(str(cert), ciphers="ECDHE+CHACHA20"), tmp_path)
    server = next(gen)
    try:
        result = yield in_thread(starttls_peer, server.port, tls12, "localhost")
    finally:
        gen.close()
    assert result["version"] == "TLSv1.2"
    assert "CHACHA20" in result["cipher"]
    assert server.sessions[0].tls.cipher == result["cipher"]  # type: ignore[index, union-attr]
    seen, stop = failed_handshakes()
    gen = _serve(ServerTLS(str(cert), min_version="1.3"), tmp_path / "b")
    server = next(gen)
    try:
        with pytest.raises((ssl.SSLError, smtplib.SMTPServerDisconnected)):
            yield in_thread(starttls_peer, server.port, tls12, "localhost")
        for _ in range(100):
            if seen:
                break
            yield deferLater(0.01)
    finally:
        gen.close()
        stop()
    assert seen and "unsupported protocol" in seen[0]["why"]


def deferLater(delay: float) -> defer.Deferred[None]:
    from twisted.internet.task import deferLater as later

    return later(reactor, delay, lambda: None)


@pytest_twisted.inlineCallbacks
def test_plaintext_injected_after_starttls_is_dropped(server: Server, certs: Certs) -> Any:
    """CVE-2011-0411 under the stdlib layer: only the 220 comes back in plaintext."""
    result = yield in_thread(inject_after_starttls, server.port, client_context(certs))
    assert result["reply"] == b"220 2.0.0 Ready to start TLS\r\n"
    assert result["after"][0].startswith(b"250-mx.test Hello client.test")
    assert result["rest"][0] == b"503 5.5.1 Need MAIL before RCPT\r\n"
    assert result["rest"][1].startswith(b"221 ")


def garbage_after_starttls(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        sock.recv(1024)
        sock.sendall(b"EHLO client.test\r\n")
        sock.recv(4096)
        sock.sendall(b"STARTTLS\r\n")
        reply = sock.recv(1024)
        sock.sendall(b"this is no ClientHello\r\n" * 4)
        sock.recv(1024)  # an alert, or EOF
        return reply


@pytest_twisted.inlineCallbacks
def test_garbage_handshake_is_logged_and_others_served(server: Server, certs: Certs) -> Any:
    seen, stop = failed_handshakes()
    try:
        reply = yield in_thread(garbage_after_starttls, server.port)
        for _ in range(100):
            if seen:
                break
            yield deferLater(0.01)
    finally:
        stop()
    assert reply == b"220 2.0.0 Ready to start TLS\r\n"
    assert seen and seen[0]["why"]
    result = yield in_thread(send_starttls, server.port, client_context(certs))
    assert result["starttls_code"] == 220
    assert len(server.messages()) == 1


def serial_across_reload(port: int, ctx: ssl.SSLContext, reload: Any) -> list[Any]:
    with smtplib.SMTP("127.0.0.1", port, timeout=TIMEOUT) as smtp:
        smtp.starttls(context=ctx)
        before = smtp.sock.getpeercert()["serialNumber"]  # type: ignore[union-attr]
        reload()
        code = smtp.noop()[0]
        with smtplib.SMTP("127.0.0.1", port, timeout=TIMEOUT) as second:
            second.starttls(context=ctx)
            after = second.sock.getpeercert()["serialNumber"]  # type: ignore[union-attr]
        return [before, code, after]


@pytest_twisted.inlineCallbacks
def test_reload_reaches_the_stdlib_layer(certs: Certs, tmp_path: Path) -> Any:
    """After reload a new STARTTLS gets the new certificate; the open session goes on."""
    cert = certs.leaf("localhost", "127.0.0.1", stem="layer-reload")
    gen = _serve(ServerTLS(str(cert)), tmp_path)
    server = next(gen)

    def reload() -> None:
        certs.leaf("localhost", "127.0.0.1", stem="layer-reload")
        reactor.callFromThread(reload_certificates, server.context)  # type: ignore[attr-defined]

    try:
        before, code, after = yield in_thread(
            serial_across_reload, server.port, client_context(certs), reload
        )
    finally:
        gen.close()
    assert code == 250
    assert before != after


# -- the layer alone: large writes, close_notify -------------------------------------------------

BIG = bytes(range(256)) * 12_000  # 3 MB: more than the socket takes at once


@implementer(IHandshakeListener)
class Sender(Protocol):
    """TLS from the first byte; once up, writes BIG and closes (close_notify after it)."""

    def __init__(self, context: ServerTLS, done: defer.Deferred[Any]) -> None:
        self.context = context
        self.done = done
        self.received = b""

    def connectionMade(self) -> None:
        start_tls(self.transport, self.context)
        assert isinstance(self.transport.protocol, StdlibTLS)  # type: ignore[union-attr]

    def handshakeCompleted(self) -> None:
        self.transport.write(BIG[:100])  # type: ignore[union-attr]
        self.transport.writeSequence([BIG[100:200_000], BIG[200_000:]])  # type: ignore[union-attr]
        self.transport.loseConnection()  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Any) -> None:
        self.done.callback(reason.type)


def read_all(port: int, ctx: ssl.SSLContext) -> tuple[int, bool]:
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as raw:
        tls = ctx.wrap_socket(raw, server_hostname="localhost", suppress_ragged_eofs=False)
        got = bytearray()
        while True:
            try:
                chunk = tls.recv(65536)
            except ssl.SSLEOFError:
                return len(got), False  # closed without a close_notify
            if not chunk:
                return len(got) if bytes(got) == BIG else -1, True
            got += chunk


@pytest_twisted.inlineCallbacks
def test_large_write_then_close_notify(certs: Certs) -> Any:
    """A write larger than the socket takes goes out whole and in order, and the close that
    follows it sends a close_notify after the last byte."""
    cert = certs.leaf("localhost", "127.0.0.1", stem="layer-big")
    context = ServerTLS(str(cert))
    done: defer.Deferred[Any] = defer.Deferred()
    factory = Factory.forProtocol(lambda: Sender(context, done))  # type: ignore[arg-type]
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")  # type: ignore[attr-defined]
    try:
        length, clean = yield in_thread(read_all, port.getHost().port, client_context(certs))
        lost = yield done
    finally:
        port.stopListening()
    assert (length, clean) == (len(BIG), True)
    assert lost is ConnectionDone


def ask_starttls(sock: socket.socket) -> bytes:
    """Banner, EHLO, STARTTLS on ``sock`` (plaintext): the reply to STARTTLS."""
    reader = sock.makefile("rb")
    reader.readline()
    sock.sendall(b"EHLO client.test\r\n")
    while not reader.readline().startswith(b"250 "):
        pass
    sock.sendall(b"STARTTLS\r\n")
    return reader.readline()


def quit_with_close_notify(port: int, ctx: ssl.SSLContext) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        ask_starttls(sock)
        tls = ctx.wrap_socket(sock, server_hostname="localhost")
        tls.sendall(b"NOOP\r\n")
        first = tls.recv(1024)
        tls.unwrap()  # close_notify, and the server's in return
        return first


@pytest_twisted.inlineCallbacks
def test_client_close_notify_ends_the_session_cleanly(server: Server, certs: Certs) -> Any:
    """A client that ends TLS with a close_notify gets one back and the session closes, with
    no TLS failure logged."""
    seen, stop = failed_handshakes()
    try:
        first = yield in_thread(quit_with_close_notify, server.port, client_context(certs))
        for _ in range(100):
            if not server.edge.connections:
                break
            yield deferLater(0.01)
    finally:
        stop()
    assert first.startswith(b"250 ")
    assert not server.edge.connections
    assert seen == []


def silent_after_starttls(port: int) -> tuple[bytes, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        reply = ask_starttls(sock)
        return reply, sock.recv(1024)  # no ClientHello: the server must close (EOF)


@pytest_twisted.inlineCallbacks
def test_handshake_that_never_starts_times_out(certs: Certs, tmp_path: Path) -> Any:
    """A client that says STARTTLS and then nothing is closed after the command timeout, with
    a handshake failure logged, under the stdlib layer."""
    cert = certs.leaf("localhost", "127.0.0.1", stem="layer-timeout")
    gen = _serve(ServerTLS(str(cert)), tmp_path)
    server = next(gen)
    server.edge.policy = replace(server.edge.policy, command_timeout=0.3)
    seen, stop = failed_handshakes()
    try:
        reply, rest = yield in_thread(silent_after_starttls, server.port)
        for _ in range(100):
            if seen:
                break
            yield deferLater(0.01)
    finally:
        stop()
        gen.close()
    assert reply == b"220 2.0.0 Ready to start TLS\r\n"
    assert rest == b""
    assert seen and seen[0]["why"]

"""Real TLS handshakes over 127.0.0.1 with trustme certificates (issue 3): smtplib STARTTLS
and SMTP_SSL, Twisted's ESMTP client, swaks; injection, SNI, client certificates, versions,
reload, and a client that aborts its handshake."""

from __future__ import annotations

import os
import shutil
import smtplib
import socket
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from cryptography import x509
from test_tls_helpers import Certs, in_thread, make_certs
from twisted.internet import defer, reactor, threads
from twisted.internet.interfaces import IListeningPort
from twisted.logger import globalLogPublisher

from slimta_tx import MaildirBus, Policy, ServerTLS, Session, SmtpEdge
from slimta_tx.cli.tls import reload_certificates
from slimta_tx.starttls import wrap_implicit

MESSAGE = b"From: a@sender.test\r\nTo: u@example.com\r\nSubject: tls\r\n\r\nover TLS\r\n"
TIMEOUT = 10.0


@dataclass
class Server:
    edge: SmtpEdge
    context: ServerTLS
    maildir: Path
    port: int = 0
    implicit_port: int = 0
    sessions: list[Session] | None = None
    nodelay: list[bool] | None = None

    def messages(self) -> list[bytes]:
        new = self.maildir / "new"
        return [p.read_bytes() for p in sorted(new.iterdir())] if new.exists() else []


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("tls-certs"))


def client_context(certs: Certs, **kw: Any) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(certs.ca_file))
    for name, value in kw.items():
        setattr(ctx, name, value)
    return ctx


@pytest.fixture
def server(certs: Certs, tmp_path: Path) -> Iterator[Server]:
    cert = certs.leaf("localhost", "127.0.0.1", stem="server", combined=False)
    context = ServerTLS(str(cert), str(cert.with_suffix(".key")), client_ca=str(certs.ca_file))
    yield from _serve(context, tmp_path)


def _serve(context: ServerTLS, tmp_path: Path, **tls: Any) -> Iterator[Server]:
    maildir = tmp_path / "Maildir"
    edge = SmtpEdge(
        MaildirBus(str(maildir), reactor=reactor, fsync=False),
        Policy(hostname="mx.test", accepted_domains=("example.com",)),
        reactor=reactor,
    )
    edge.enable_tls(context, **tls)
    sessions: list[Session] = []
    nodelay: list[bool] = []

    def on_mail(session: Session, reply: Any, *extra: Any) -> None:
        sessions.append(session)
        for proto in edge.connections:
            if proto.session is session:
                nodelay.append(proto.transport.getTcpNoDelay())  # type: ignore[union-attr]

    edge.set_validator("MAIL", on_mail)
    ports: list[IListeningPort] = [
        reactor.listenTCP(0, edge, interface="127.0.0.1"),  # type: ignore[attr-defined]
        reactor.listenTCP(0, wrap_implicit(edge), interface="127.0.0.1"),  # type: ignore[attr-defined]
    ]
    server = Server(edge, context, maildir, sessions=sessions, nodelay=nodelay)
    server.port, server.implicit_port = (p.getHost().port for p in ports)  # type: ignore[attr-defined]
    yield server
    for port in ports:
        port.stopListening()


def send_starttls(port: int, ctx: ssl.SSLContext, host: str = "127.0.0.1") -> dict[str, Any]:
    with smtplib.SMTP(host, port, timeout=TIMEOUT) as smtp:
        smtp.ehlo("client.test")
        advertised = smtp.has_extn("starttls")
        code, _ = smtp.starttls(context=ctx)
        smtp.ehlo("client.test")
        after = smtp.has_extn("starttls")
        smtp.sendmail("a@sender.test", ["u@example.com"], MESSAGE)
        assert smtp.sock is not None
        return {
            "starttls_code": code,
            "advertised": advertised,
            "advertised_after": after,
            "version": smtp.sock.version(),  # type: ignore[attr-defined]
        }


@pytest_twisted.inlineCallbacks
def test_smtplib_starttls_delivers_into_maildir(server: Server, certs: Certs) -> Any:
    """smtplib: EHLO, STARTTLS (verified against the CA), EHLO again, send; the Maildir copy
    says 'with ESMTPS (TLSv1.3 <cipher>)' and STARTTLS is offered only before TLS."""
    result = yield in_thread(send_starttls, server.port, client_context(certs))
    assert result["starttls_code"] == 220
    assert result["advertised"] and not result["advertised_after"]
    [message] = server.messages()
    assert b"with ESMTPS (TLSv1.3 TLS_" in message
    assert message.endswith(MESSAGE)
    tls = server.sessions[0].tls  # type: ignore[index]
    assert tls is not None and tls.version == "TLSv1.3" and not tls.client_certificate
    assert server.nodelay == [True]


def send_implicit(port: int, ctx: ssl.SSLContext) -> dict[str, Any]:
    with smtplib.SMTP_SSL("127.0.0.1", port, timeout=TIMEOUT, context=ctx) as smtp:
        code, _ = smtp.ehlo("client.test")
        advertised = smtp.has_extn("starttls")
        smtp.sendmail("a@sender.test", ["u@example.com"], MESSAGE)
        return {"ehlo": code, "advertised": advertised}


@pytest_twisted.inlineCallbacks
def test_smtp_ssl_on_implicit_listener(server: Server, certs: Certs) -> Any:
    """SMTP_SSL on a TLS-wrapped listener (what --tls-listen opens): banner inside TLS,
    no STARTTLS offered, mail delivered."""
    result = yield in_thread(send_implicit, server.implicit_port, client_context(certs))
    assert result == {"ehlo": 250, "advertised": False}
    assert len(server.messages()) == 1
    assert server.nodelay == [True]  # Nagle off under the TLS wrapper too


@pytest_twisted.inlineCallbacks
def test_smtp_ssl_with_enable_tls_immediately(certs: Certs, tmp_path: Path) -> Any:
    """enable_tls(ctx, immediately=True): every connection is TLS from the first byte."""
    cert = certs.leaf("localhost", "127.0.0.1", stem="immediate")
    gen = _serve(ServerTLS(str(cert)), tmp_path, immediately=True)
    server = next(gen)
    try:
        result = yield in_thread(send_implicit, server.port, client_context(certs))
    finally:
        gen.close()
    assert result == {"ehlo": 250, "advertised": False}
    assert len(server.messages()) == 1


@pytest_twisted.inlineCallbacks
def test_twisted_esmtp_client_requiring_tls(server: Server, certs: Certs) -> Any:
    """Twisted's ESMTP client with requireTransportSecurity=True delivers (it only sends
    after STARTTLS succeeded)."""
    from twisted.internet.ssl import Certificate, optionsForClientTLS
    from twisted.mail.smtp import ESMTPSenderFactory

    trust = Certificate.loadPEM(certs.ca_file.read_bytes())
    options = optionsForClientTLS("localhost", trustRoot=trust)
    done: defer.Deferred[Any] = defer.Deferred()
    factory = ESMTPSenderFactory(
        None,
        None,
        "a@sender.test",
        ["u@example.com"],
        BytesIO(MESSAGE.replace(b"\r\n", b"\n")),  # this client turns LF into CRLF
        done,
        contextFactory=options,
        requireAuthentication=False,
        requireTransportSecurity=True,
        retries=0,
    )
    reactor.connectTCP("127.0.0.1", server.port, factory)  # type: ignore[attr-defined]
    accepted, _ = yield done.addTimeout(TIMEOUT, reactor)
    assert accepted == 1
    [message] = server.messages()
    assert b"with ESMTPS" in message


@pytest_twisted.inlineCallbacks
def test_swaks_tls_delivers(server: Server, certs: Certs) -> Any:
    """swaks --tls --tls-verify (a Perl client on IO::Socket::SSL) delivers into the Maildir."""
    from twisted.internet.utils import getProcessOutputAndValue

    swaks = shutil.which("swaks")
    if swaks is None:
        if os.environ.get("CI") == "true":
            pytest.fail("swaks is missing (.ci/services installs it)")
        pytest.skip("swaks not installed: apt-get install swaks libio-socket-ssl-perl")
    args = [
        "--server",
        "127.0.0.1",
        "--port",
        str(server.port),
        "--tls",
        "--tls-verify",
        "--tls-ca-path",
        str(certs.ca_file),
        "--tls-sni",
        "localhost",
        "--ehlo",
        "swaks.test",
        "--from",
        "a@sender.test",
        "--to",
        "u@example.com",
        "--body",
        "hello from swaks",
    ]
    out, err, code = yield getProcessOutputAndValue(swaks, args, env=dict(os.environ)).addTimeout(
        TIMEOUT * 3, reactor
    )
    text = out.decode() + err.decode()
    assert code == 0, text
    assert "220 2.0.0 Ready to start TLS" in text
    [message] = server.messages()
    assert b"hello from swaks" in message
    assert b"with ESMTPS" in message


def inject_after_starttls(port: int, ctx: ssl.SSLContext) -> dict[str, Any]:
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        reader = sock.makefile("rb")
        assert reader.readline().startswith(b"220 ")
        sock.sendall(b"EHLO client.test\r\n")
        while not reader.readline().startswith(b"250 "):
            pass
        # The attack: a command right behind STARTTLS, in the same packet.
        sock.sendall(b"STARTTLS\r\nNOOP\r\nMAIL FROM:<evil@attacker.test>\r\n")
        # Everything the server wrote back in plaintext (a reply to NOOP would be here, or
        # would break the handshake below).
        reply = sock.recv(4096)
        tls = ctx.wrap_socket(sock, server_hostname="localhost")
        tls_reader = tls.makefile("rb")
        tls.sendall(b"EHLO client.test\r\n")
        lines = []
        while True:
            line = tls_reader.readline()
            lines.append(line)
            if line[3:4] == b" ":
                break
        tls.sendall(b"RCPT TO:<u@example.com>\r\nQUIT\r\n")
        rest = [tls_reader.readline(), tls_reader.readline()]
        return {"reply": reply, "after": lines, "rest": rest}


@pytest_twisted.inlineCallbacks
def test_plaintext_injected_after_starttls_is_not_answered(server: Server, certs: Certs) -> Any:
    """Over a real socket: 'STARTTLS\\r\\nNOOP\\r\\nMAIL ...' in one write. Only the 220 comes
    back in plaintext; inside TLS the first reply is to EHLO, and no transaction exists."""
    result = yield in_thread(inject_after_starttls, server.port, client_context(certs))
    assert result["reply"] == b"220 2.0.0 Ready to start TLS\r\n"
    assert result["after"][0].startswith(b"250-mx.test Hello client.test")
    assert result["rest"][0] == b"503 5.5.1 Need MAIL before RCPT\r\n"
    assert result["rest"][1].startswith(b"221 ")


def implicit_peer(port: int, ctx: ssl.SSLContext, name: str | None) -> dict[str, Any]:
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as raw:
        with ctx.wrap_socket(raw, server_hostname=name) as tls:
            banner = tls.makefile("rb").readline()
            der = tls.getpeercert(binary_form=True)
            assert der is not None
            cert = x509.load_der_x509_certificate(der)
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
            return {
                "banner": banner,
                "names": san.value.get_values_for_type(x509.DNSName),
                "version": tls.version(),
                "cipher": tls.cipher()[0],  # type: ignore[index]
            }


@pytest_twisted.inlineCallbacks
def test_sni_picks_certificate_by_name(certs: Certs, tmp_path: Path) -> Any:
    """A certificate directory serves each name its own certificate (exact name, then a
    wildcard file); unknown names and no SNI get the default certificate."""
    directory = tmp_path / "certdir"
    directory.mkdir()
    by_name = Certs(certs.ca, directory, certs.ca_file)
    by_name.leaf("mail.example.org")
    wildcard = by_name.leaf("*.example.net")
    wildcard.rename(directory / "*.example.net.pem")
    default = certs.leaf("mx.test", stem="sni-default")
    gen = _serve(ServerTLS(str(default), certificate_dir=str(directory)), tmp_path)
    server = next(gen)
    try:
        verify = client_context(certs)
        org = yield in_thread(implicit_peer, server.implicit_port, verify, "mail.example.org")
        net = yield in_thread(implicit_peer, server.implicit_port, verify, "smtp.example.net")
        loose = client_context(certs, check_hostname=False)
        other = yield in_thread(implicit_peer, server.implicit_port, loose, "other.test")
        none = yield in_thread(implicit_peer, server.implicit_port, loose, None)
    finally:
        gen.close()
    assert org["names"] == ["mail.example.org"]
    assert org["banner"].startswith(b"220 mx.test")
    assert net["names"] == ["*.example.net"]
    assert other["names"] == ["mx.test"]
    assert none["names"] == ["mx.test"]


def send_with_client_cert(port: int, ctx: ssl.SSLContext) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=TIMEOUT) as smtp:
        smtp.starttls(context=ctx)
        smtp.ehlo("partner.test")
        smtp.mail("a@sender.test")
        smtp.rset()


@pytest_twisted.inlineCallbacks
def test_client_certificates_are_verified_and_exposed(
    server: Server, certs: Certs, tmp_path: Path
) -> Any:
    """With a client CA: a partner's certificate from that CA is 'verified'; one from another
    CA is presented but not verified (the handshake still succeeds); none is none."""
    import trustme

    good = certs.ca.issue_cert("partner.example.com", common_name="partner.example.com")
    stranger = trustme.CA().issue_cert("stranger.example.com")
    contexts = []
    for issued in (good, stranger, None):
        ctx = client_context(certs)
        if issued is not None:
            path = tmp_path / f"client-{len(contexts)}.pem"
            path.write_bytes(
                issued.private_key_pem.bytes()
                + b"".join(blob.bytes() for blob in issued.cert_chain_pems)
            )
            ctx.load_cert_chain(str(path))
        contexts.append(ctx)
    for ctx in contexts:
        yield in_thread(send_with_client_cert, server.port, ctx)
    infos = [session.tls for session in server.sessions]  # type: ignore[union-attr]
    assert [(i.client_certificate, i.client_certificate_verified) for i in infos] == [  # type: ignore[union-attr]
        (True, True),
        (True, False),
        (False, False),
    ]
    assert (infos[0].client_subject or "").startswith("CN=partner.example.com,")  # type: ignore[union-attr]
    # The certificate itself, for checks on its names or fingerprint:
    peer = server.sessions[0].extra["tls_peer_certificate"]  # type: ignore[index]
    assert isinstance(peer, x509.Certificate)
    assert "tls_peer_certificate" not in server.sessions[2].extra  # type: ignore[index]


@pytest_twisted.inlineCallbacks
def test_version_and_cipher_policy(certs: Certs, tmp_path: Path) -> Any:
    """TLS 1.2 clients get in by default (with the ciphers chosen); with min_version '1.3'
    a TLS 1.2-only client's handshake fails."""
    cert = certs.leaf("localhost", "127.0.0.1", stem="policy")
    tls12 = client_context(certs, maximum_version=ssl.TLSVersion.TLSv1_2)
    gen = _serve(ServerTLS(str(cert), ciphers="ECDHE+CHACHA20"), tmp_path)
    server = next(gen)
    try:
        result = yield in_thread(implicit_peer, server.implicit_port, tls12, "localhost")
    finally:
        gen.close()
    assert result["version"] == "TLSv1.2"
    assert "CHACHA20" in result["cipher"]
    gen = _serve(ServerTLS(str(cert), min_version="1.3"), tmp_path / "b")
    server = next(gen)
    try:
        with pytest.raises(ssl.SSLError):
            yield in_thread(implicit_peer, server.implicit_port, tls12, "localhost")
    finally:
        gen.close()


def hold_connection_across_reload(port: int, ctx: ssl.SSLContext, reload: Any) -> list[Any]:
    with smtplib.SMTP("127.0.0.1", port, timeout=TIMEOUT) as smtp:
        smtp.starttls(context=ctx)
        assert smtp.sock is not None
        before = smtp.sock.getpeercert()["serialNumber"]  # type: ignore[attr-defined]
        reload()
        code = smtp.noop()[0]
        with smtplib.SMTP("127.0.0.1", port, timeout=TIMEOUT) as second:
            second.starttls(context=ctx)
            assert second.sock is not None
            after = second.sock.getpeercert()["serialNumber"]  # type: ignore[attr-defined]
        return [before, code, after]


@pytest_twisted.inlineCallbacks
def test_reload_serves_new_certificate_without_dropping(server: Server, certs: Certs) -> Any:
    """After the files change and reload runs, new connections get the new certificate while
    a connection opened before keeps working; a broken file keeps the old one in use."""
    cert = Path(server.context.certificate or "")
    key = cert.with_suffix(".key")

    def swap_and_reload() -> None:
        certs.leaf("localhost", "127.0.0.1", stem="server", combined=False)
        threads.blockingCallFromThread(reactor, reload_certificates, server.context)

    result = yield in_thread(
        hold_connection_across_reload, server.port, client_context(certs), swap_and_reload
    )
    before, noop, after = result
    assert noop == 250
    assert before != after
    # A key that does not match: reload refuses, the current certificate stays.
    key.write_bytes(certs.ca.issue_cert("other.test").private_key_pem.bytes())
    assert reload_certificates(server.context) is False
    again = yield in_thread(
        implicit_peer, server.implicit_port, client_context(certs), "localhost"
    )
    assert again["names"] == ["localhost"]


def abort_handshake(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        reader = sock.makefile("rb")
        reader.readline()
        sock.sendall(b"EHLO client.test\r\n")
        while not reader.readline().startswith(b"250 "):
            pass
        sock.sendall(b"STARTTLS\r\n")
        reply = reader.readline()
        sock.sendall(b"this is not a TLS ClientHello\r\n")
        sock.recv(1024)  # the server's alert, or EOF
        return reply


@pytest_twisted.inlineCallbacks
def test_aborted_handshake_is_logged_and_others_are_served(server: Server, certs: Certs) -> Any:
    """A client that sends garbage instead of a ClientHello loses only its own connection
    (logged with the reason); the next client delivers over TLS as usual."""
    failed: defer.Deferred[dict[str, Any]] = defer.Deferred()

    def observe(event: dict[str, Any]) -> None:
        if "handshake failed" in event.get("log_format", "") and not failed.called:
            failed.callback(event)

    globalLogPublisher.addObserver(observe)
    try:
        reply = yield in_thread(abort_handshake, server.port)
        event = yield failed.addTimeout(TIMEOUT, reactor)
    finally:
        globalLogPublisher.removeObserver(observe)
    assert reply == b"220 2.0.0 Ready to start TLS\r\n"
    assert event["why"]
    result = yield in_thread(send_starttls, server.port, client_context(certs))
    assert result["starttls_code"] == 220
    assert len(server.messages()) == 1


@pytest_twisted.inlineCallbacks
def test_sessions_taken_with_accept_get_tls(certs: Certs, tmp_path: Path) -> Any:
    """With edge.accept() (connections wait until taken), STARTTLS and implicit TLS still
    complete: the session records TLS, stops offering STARTTLS, and the 465 banner arrives."""
    cert = certs.leaf("localhost", "127.0.0.1", stem="accept")
    gen = _serve(ServerTLS(str(cert)), tmp_path)
    server = next(gen)
    ctx = client_context(certs)
    try:
        taken = server.edge.accept()
        starttls_client = in_thread(send_starttls, server.port, ctx)
        held = yield taken
        ended = held()
        starttls_result = yield starttls_client
        yield ended
        taken = server.edge.accept()
        implicit_client = in_thread(send_implicit, server.implicit_port, ctx)
        held = yield taken
        held()
        implicit_result = yield implicit_client
    finally:
        gen.close()
    assert starttls_result["advertised"] and not starttls_result["advertised_after"]
    assert implicit_result == {"ehlo": 250, "advertised": False}
    assert [s.security for s in server.sessions] == ["TLS", "TLS"]  # type: ignore[union-attr]
    assert len(server.messages()) == 2

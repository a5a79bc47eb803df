"""Twisted's own SMTP client (``twisted.mail.smtp``), used the way its docs show, against an
edge on 127.0.0.1: the rules docs/embedding.md gives a Twisted user ("Sending with Twisted's
client") hold.

- Give it the message with LF line ends: it turns every LF into CRLF itself (and stuffs dots).
  A CRLF message reaches the edge as CR CR LF and is refused ``550 5.5.2`` (bare CR); with
  ``--bare-newline normalize`` it is taken, but with a stray CR at the end of every line.
- ``sendmail()`` tries STARTTLS whenever the server offers it and checks the certificate
  against the host it was given and the system's trusted CAs; it does not fall back to
  plaintext. ``ESMTPSenderFactory`` takes the context to use, or none.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import trustme
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.mail.smtp import ESMTPSenderFactory, SMTPConnectError, SMTPDeliveryError, sendmail

from slimta_tx import BareNewlinePolicy, Policy, ServerTLS, SmtpEdge
from slimta_tx.testing import RecordingBus

TIMEOUT = 30
MESSAGE = b"From: alice@sender.test\r\nSubject: hi\r\n\r\nhello\r\n.a line with a dot\r\n"
LF_MESSAGE = MESSAGE.replace(b"\r\n", b"\n")


@dataclass
class Edge:
    edge: SmtpEdge
    bus: RecordingBus
    port: int


async def start(policy: Policy, tls: ServerTLS | None = None) -> Edge:
    bus = RecordingBus()
    edge = SmtpEdge(bus, policy, reactor=reactor)
    if tls is not None:
        edge.enable_tls(tls)
    port = await edge.listen(TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1"))
    return Edge(edge, bus, port.getHost().port)


POLICY = Policy(hostname="mx.example.com", accepted_domains=("example.com",))


@pytest_twisted.async_yield_fixture
async def plain() -> AsyncIterator[Edge]:
    running = await start(POLICY)
    yield running
    await running.edge.close()


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> tuple[trustme.CA, Path, Path]:
    authority = trustme.CA()
    leaf = authority.issue_cert("mx.example.com")
    directory = tmp_path_factory.mktemp("certs")
    cert, key = directory / "cert.pem", directory / "key.pem"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    return authority, cert, key


@pytest_twisted.async_yield_fixture
async def with_tls(ca: tuple[trustme.CA, Path, Path]) -> AsyncIterator[Edge]:
    """An edge offering STARTTLS with a certificate for mx.example.com from a private CA."""
    _, cert, key = ca
    running = await start(POLICY, ServerTLS(str(cert), str(key)))
    yield running
    await running.edge.close()


def send(port: int, message: bytes, **kwargs: Any) -> defer.Deferred[Any]:
    d: defer.Deferred[Any] = sendmail(
        "127.0.0.1", "alice@sender.test", ["bob@example.com"], message, port=port, **kwargs
    )
    return d.addTimeout(TIMEOUT, reactor)


@pytest_twisted.ensureDeferred
async def test_sendmail_with_lf_line_ends_delivers_the_message_exactly(plain: Edge) -> None:
    """sendmail(LF message): on the wire CRLF, dot-stuffed; stored exactly as meant."""
    accepted, results = await send(plain.port, LF_MESSAGE)
    assert accepted == 1 and results[0][1] == 250
    assert plain.bus.messages[0].data == MESSAGE


@pytest_twisted.ensureDeferred
async def test_sendmail_with_crlf_line_ends_is_refused_as_bare_cr(plain: Edge) -> None:
    """sendmail(CRLF message): Twisted turns each CRLF into CR CR LF; the edge refuses the
    message with 550 5.5.2 after its end (nothing is stored), as it must for a bare CR."""
    with pytest.raises(SMTPDeliveryError) as raised:
        await send(plain.port, MESSAGE)
    assert raised.value.code == 550
    assert b"5.5.2" in raised.value.resp
    assert plain.bus.messages == []


@pytest_twisted.ensureDeferred
async def test_normalize_does_not_repair_crlf_given_to_twisted() -> None:
    """--bare-newline normalize repairs bare LF, not CR CR LF: a bare CR stays content, so
    the message is taken with a stray CR ending every line. The rule stays "give Twisted LF
    line ends"."""
    running = await start(POLICY.evolve(bare_newline=BareNewlinePolicy.NORMALIZE))
    try:
        accepted, _ = await send(running.port, MESSAGE)
        assert accepted == 1
        assert running.bus.messages[0].data == MESSAGE.replace(b"\r\n", b"\r\r\n")
    finally:
        await running.edge.close()


@pytest_twisted.ensureDeferred
async def test_esmtp_sender_factory_with_a_file(plain: Edge) -> None:
    """ESMTPSenderFactory, as Twisted's howto uses it: a file of LF lines, no AUTH, no TLS."""
    done: defer.Deferred[Any] = defer.Deferred()
    factory = ESMTPSenderFactory(
        None,
        None,
        "alice@sender.test",
        ["bob@example.com"],
        BytesIO(LF_MESSAGE),
        done,
        requireAuthentication=False,
        requireTransportSecurity=False,
        retries=0,
    )
    reactor.connectTCP("127.0.0.1", plain.port, factory)  # type: ignore[attr-defined]
    accepted, _ = await done.addTimeout(TIMEOUT, reactor)
    assert accepted == 1
    assert plain.bus.messages[0].data == MESSAGE
    assert plain.bus.messages[0].envelope.security is None


@pytest_twisted.ensureDeferred
async def test_sendmail_checks_the_certificate_when_starttls_is_offered(with_tls: Edge) -> None:
    """The edge offers STARTTLS: sendmail("127.0.0.1", ...) starts TLS and checks the
    certificate for the name "127.0.0.1" against the system's CAs. A private CA's
    certificate for mx.example.com fails that check, and sendmail gives up rather than send
    in plaintext: nothing is delivered."""
    with pytest.raises(SMTPConnectError, match="VerificationError"):
        await send(with_tls.port, LF_MESSAGE)
    assert with_tls.bus.messages == []


@pytest_twisted.ensureDeferred
async def test_esmtp_sender_factory_trusting_the_edges_ca(
    with_tls: Edge, ca: tuple[trustme.CA, Path, Path]
) -> None:
    """With the CA and the certificate's name given (optionsForClientTLS), the message goes
    over TLS."""
    authority, _, _ = ca
    trust = Certificate.loadPEM(authority.cert_pem.bytes())
    done: defer.Deferred[Any] = defer.Deferred()
    factory = ESMTPSenderFactory(
        None,
        None,
        "alice@sender.test",
        ["bob@example.com"],
        BytesIO(LF_MESSAGE),
        done,
        contextFactory=optionsForClientTLS("mx.example.com", trustRoot=trust),
        requireAuthentication=False,
        requireTransportSecurity=True,
        retries=0,
    )
    reactor.connectTCP("127.0.0.1", with_tls.port, factory)  # type: ignore[attr-defined]
    accepted, _ = await done.addTimeout(TIMEOUT, reactor)
    assert accepted == 1
    assert with_tls.bus.messages[0].envelope.security == "TLS"


@pytest_twisted.ensureDeferred
async def test_esmtp_sender_factory_without_a_context_stays_in_plaintext(
    with_tls: Edge,
) -> None:
    """No context and no hostname: Twisted's client does not try STARTTLS (for a test
    server on loopback only)."""
    done: defer.Deferred[Any] = defer.Deferred()
    factory = ESMTPSenderFactory(
        None,
        None,
        "alice@sender.test",
        ["bob@example.com"],
        BytesIO(LF_MESSAGE),
        done,
        requireAuthentication=False,
        requireTransportSecurity=False,
        retries=0,
    )
    reactor.connectTCP("127.0.0.1", with_tls.port, factory)  # type: ignore[attr-defined]
    accepted, _ = await done.addTimeout(TIMEOUT, reactor)
    assert accepted == 1
    assert with_tls.bus.messages[0].envelope.security is None

"""STARTTLS and implicit TLS at the protocol level, over a StringTransport that can start TLS
(issue 3): what is advertised, what is forgotten, what is never answered."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from OpenSSL import SSL
from test_tls_helpers import FakeTLSConnection, TLSDriver, make_certs, make_edge
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure

from slimta_tx import Reply, ServerTLS, Session
from slimta_tx.testing import RecordingBus, connect, parse_replies

MESSAGE = b"Subject: hi\r\n\r\nHello over TLS\r\n.\r\n"


@pytest.fixture(scope="module")
def context(tmp_path_factory: pytest.TempPathFactory) -> ServerTLS:
    certs = make_certs(tmp_path_factory.mktemp("certs"))
    return ServerTLS(str(certs.leaf("mx.test")))


def started(d: TLSDriver) -> bool:
    return d.transport.tls_context is not None


def test_no_context_no_starttls(context: ServerTLS) -> None:
    """Without a TLS context STARTTLS is neither advertised nor accepted (502 5.5.1)."""
    d = TLSDriver(make_edge())
    assert "STARTTLS" not in d.ehlo_keywords()
    assert d.cmd("STARTTLS") == ("502", "5.5.1 Command not implemented")
    assert not started(d)


def test_starttls_advertised_on_plaintext_only(context: ServerTLS) -> None:
    """STARTTLS is in the EHLO reply before TLS, and gone from it once TLS is up."""
    d = TLSDriver(make_edge(context))
    assert "STARTTLS" in d.ehlo_keywords()
    assert d.starttls() == [("220", "2.0.0 Ready to start TLS")]
    assert d.transport.tls_context is context
    assert d.handshake() == []
    assert "STARTTLS" not in d.ehlo_keywords()


def test_plaintext_after_starttls_is_never_answered(context: ServerTLS) -> None:
    """'STARTTLS\\r\\nNOOP\\r\\n' in one packet from a trusted client (not held to the
    pipelining discipline): only the 220 goes out, the NOOP is dropped and nothing is answered
    after the handshake either (CVE-2011-0411)."""
    d = TLSDriver(make_edge(context), peer=("127.0.0.1", 41000))
    d.ehlo_keywords()
    d.proto.dataReceived(b"STARTTLS\r\nNOOP\r\nMAIL FROM:<evil@attacker.test>\r\n")
    assert d.transport.plaintext == b"220 2.0.0 Ready to start TLS\r\n"
    assert d.transport.value() == b""
    assert d.handshake() == []
    # The injected MAIL did not start a transaction either.
    assert d.proto.session.envelope is None
    d.ehlo_keywords()
    assert d.cmd("RCPT TO:<u@example.com>") == ("503", "5.5.1 Need MAIL before RCPT")


def test_commands_pipelined_after_starttls_end_the_session(context: ServerTLS) -> None:
    """From an untrusted client the same packet is improper pipelining (RFC 3207: STARTTLS
    ends a group): 554 5.5.0 and the connection closes; TLS never starts."""
    d = TLSDriver(make_edge(context))
    d.ehlo_keywords()
    replies = d.send(b"STARTTLS\r\nNOOP\r\nMAIL FROM:<evil@attacker.test>\r\n")
    assert replies == [("554", "5.5.0 Error: SMTP protocol synchronization")]
    assert d.transport.tls_context is None
    assert d.transport.disconnecting


def test_injection_split_across_writes_is_dropped_too(context: ServerTLS) -> None:
    """Plaintext that arrives after the STARTTLS line, before TLS starts, is discarded even
    when the STARTTLS validator answers later (input is paused meanwhile)."""
    from twisted.internet.defer import Deferred

    pending: list[Deferred[None]] = []

    def slow(session: Session, reply: Reply, *extra: Any) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        pending.append(d)
        return d

    edge = make_edge(context)
    edge.set_validator("STARTTLS", slow)
    d = TLSDriver(edge)
    d.ehlo_keywords()
    assert d.send(b"STARTTLS\r\n") == []
    assert d.send(b"NOOP\r\n") == []  # arrives while the validator thinks
    pending[0].callback(None)
    assert d.transport.plaintext == b"220 2.0.0 Ready to start TLS\r\n"
    assert d.handshake() == []


def test_starttls_forgets_what_was_learned(context: ServerTLS) -> None:
    """After STARTTLS the EHLO name and any authentication are gone: the client must EHLO
    again before MAIL (RFC 3207 4.2)."""
    d = TLSDriver(make_edge(context))
    d.ehlo_keywords()
    d.proto.session.authed = "someone"  # as if AUTH had succeeded in plaintext
    assert d.starttls()[0][0] == "220"
    d.handshake()
    session = d.proto.session
    assert (session.ehlo_as, session.extended_smtp, session.authed) == (None, False, None)
    assert d.cmd("MAIL FROM:<a@sender.test>") == ("503", "5.5.1 Send EHLO or HELO first")
    d.ehlo_keywords()
    assert d.cmd("MAIL FROM:<a@sender.test>")[0] == "250"


def test_second_starttls_is_refused(context: ServerTLS) -> None:
    """STARTTLS inside TLS is 503 5.5.1 and starts nothing."""
    d = TLSDriver(make_edge(context))
    d.ehlo_keywords()
    assert d.starttls()[0][0] == "220"
    d.handshake()
    d.ehlo_keywords()
    assert d.cmd("STARTTLS") == ("503", "5.5.1 TLS already active")


def test_starttls_with_argument_is_a_syntax_error(context: ServerTLS) -> None:
    """STARTTLS takes no parameters: 501 5.5.4, and TLS does not start."""
    d = TLSDriver(make_edge(context))
    d.ehlo_keywords()
    assert d.cmd("STARTTLS now") == ("501", "5.5.4 Syntax: STARTTLS (no parameters)")
    assert not started(d)


def test_starttls_not_inside_a_transaction(context: ServerTLS) -> None:
    """STARTTLS after MAIL is a bad sequence (503), not a way to keep the envelope."""
    d = TLSDriver(make_edge(context))
    d.ehlo_keywords()
    d.cmd("MAIL FROM:<a@sender.test>")
    assert d.cmd("STARTTLS")[0] == "503"
    assert not started(d)


def test_transport_without_tls_gets_454(context: ServerTLS) -> None:
    """A transport that cannot start TLS answers 454 4.7.0 (try again later)."""
    edge = make_edge(context)
    proto: Any
    proto, transport = connect(edge)
    assert isinstance(transport, StringTransport)
    proto.dataReceived(b"EHLO c\r\n")
    proto.dataReceived(b"STARTTLS\r\n")
    replies = parse_replies(transport.value())
    assert replies[-1] == ("454", "4.7.0 TLS not available due to temporary reason")


def test_starttls_validator_may_refuse(context: ServerTLS) -> None:
    """The STARTTLS validator can answer 454 instead; the session stays as it was."""
    edge = make_edge(context)
    edge.set_validator(
        "STARTTLS",
        lambda s, r, *extra: r.set("454", "TLS not available due to temporary reason", "4.7.0"),
    )
    d = TLSDriver(edge)
    d.ehlo_keywords()
    assert d.cmd("STARTTLS")[0] == "454"
    assert not started(d)
    assert d.cmd("MAIL FROM:<a@sender.test>")[0] == "250"


def test_require_tls_refuses_mail_until_tls(context: ServerTLS) -> None:
    """require_tls: MAIL before STARTTLS is 530 5.7.0; after it, mail flows."""
    bus = RecordingBus()
    edge = make_edge(context, bus=bus, require_tls=True)
    d = TLSDriver(edge)
    d.ehlo_keywords()
    assert edge.tls_required(d.proto.session)
    assert d.cmd("MAIL FROM:<a@sender.test>") == (
        "530",
        "5.7.0 Must issue a STARTTLS command first",
    )
    assert d.starttls()[0][0] == "220"
    d.handshake()
    assert not edge.tls_required(d.proto.session)
    d.ehlo_keywords()
    assert d.cmd("MAIL FROM:<a@sender.test>")[0] == "250"


def test_mx_accepts_plaintext_without_require_tls(context: ServerTLS) -> None:
    """A public MX (require_tls off) still takes plaintext mail (RFC 3207 section 4)."""
    bus = RecordingBus()
    d = TLSDriver(make_edge(context, bus=bus))
    d.ehlo_keywords()
    replies = d.send(b"MAIL FROM:<a@sender.test>\r\nRCPT TO:<u@example.com>\r\nDATA\r\n")
    assert [code for code, _ in replies] == ["250", "250", "354"]
    assert d.send(MESSAGE)[0][0] == "250"
    assert bus.messages[0].envelope.security is None


def test_tls_facts_reach_validators_and_received_header(context: ServerTLS) -> None:
    """After the handshake, validators see session.tls and the Received: header says
    'with ESMTPS (version cipher)'."""
    bus = RecordingBus()
    edge = make_edge(context, bus=bus)
    seen: list[Any] = []
    edge.set_validator("MAIL", lambda session, reply, *extra: seen.append(session.tls))
    d = TLSDriver(edge)
    d.ehlo_keywords()
    assert d.starttls()[0][0] == "220"
    d.handshake(
        FakeTLSConnection("TLSv1.2", "ECDHE-RSA-AES256-GCM-SHA384", server_name=b"mx.test")
    )
    d.ehlo_keywords()
    d.send(b"MAIL FROM:<a@sender.test>\r\nRCPT TO:<u@example.com>\r\nDATA\r\n")
    assert d.send(MESSAGE)[0][0] == "250"
    assert seen[0].version == "TLSv1.2"
    assert seen[0].server_name == "mx.test"
    assert seen[0].client_certificate is False
    envelope = bus.messages[0].envelope
    assert envelope.protocol == "ESMTPS"
    header = envelope.received_header().decode()
    assert "with ESMTPS (TLSv1.2 ECDHE-RSA-AES256-GCM-SHA384)" in header


def test_implicit_tls_banner_waits_for_handshake(context: ServerTLS) -> None:
    """enable_tls(immediately=True): TLS starts at connect, the banner comes after the
    handshake (inside TLS), and STARTTLS is neither advertised nor accepted."""
    banners: list[Any] = []
    edge = make_edge(context, immediately=True)
    edge.set_validator("BANNER", lambda session, reply, *extra: banners.append(session.tls))
    d = TLSDriver(edge)
    assert d.banner == []
    assert d.transport.plaintext == b""
    assert d.transport.tls_context is context
    assert d.handshake() == [("220", "mx.test ESMTP slimta_tx")]
    assert banners[0] is not None  # the BANNER validator already sees TLS
    assert "STARTTLS" not in d.ehlo_keywords()
    assert d.cmd("STARTTLS") == ("503", "5.5.1 TLS already active")


def test_failed_handshake_is_logged_with_reason(context: ServerTLS) -> None:
    """A handshake that fails closes that connection and logs why."""
    events: list[dict[str, Any]] = []
    d = TLSDriver(make_edge(context))
    d.ehlo_keywords()
    assert d.starttls()[0][0] == "220"
    error = SSL.Error([("SSL routines", "", "wrong version number")])
    globalLogPublisher.addObserver(events.append)
    try:
        d.proto.connectionLost(Failure(error))
    finally:
        globalLogPublisher.removeObserver(events.append)
    failed = [e for e in events if "handshake failed" in e.get("log_format", "")]
    assert len(failed) == 1
    assert "wrong version number" in failed[0]["why"]
    assert d.edge.connections == set()


def test_enable_tls_rejects_a_non_context() -> None:
    """enable_tls with something that is not a TLS server context is a TypeError at once."""
    with pytest.raises(TypeError, match="not a TLS server context"):
        make_edge(object())


def test_starttls_listed_in_help(context: ServerTLS, tmp_path: Path) -> None:
    """HELP lists STARTTLS once TLS is enabled."""
    d = TLSDriver(make_edge(context))
    assert "STARTTLS" in d.cmd("HELP")[1]


def test_require_tls_refuses_auth_until_tls(context: ServerTLS) -> None:
    """require_tls: AUTH before STARTTLS is 530 5.7.0 (credentials never looked at); after
    STARTTLS and a new EHLO the same AUTH succeeds."""
    import base64

    from slimta_tx.auth import Auth
    from slimta_tx.auth.checkers import from_strcred

    edge = make_edge(context, require_tls=True)
    edge.enable_authentication(Auth([from_strcred("memory:alice:s3cret-pw")]))
    d = TLSDriver(edge)
    d.ehlo_keywords()
    plain = "AUTH PLAIN " + base64.b64encode(b"\0alice\0s3cret-pw").decode()
    assert d.cmd(plain) == ("530", "5.7.0 Must issue a STARTTLS command first")
    assert d.starttls()[0][0] == "220"
    d.handshake()
    d.ehlo_keywords()
    assert d.cmd(plain)[0] == "235"
    assert d.proto.session.authed == "alice"


def test_client_that_never_completes_the_handshake_is_dropped(context: ServerTLS) -> None:
    """On an implicit-TLS connection a client that never finishes the handshake is closed
    after the command timeout; no banner was ever produced for it."""
    from twisted.internet.task import Clock

    clock = Clock()
    edge = make_edge(context, clock=clock, immediately=True)
    d = TLSDriver(edge)
    assert d.transport.tls_context is context and d.banner == []
    clock.advance(edge.policy.command_timeout - 1)
    assert not d.transport.disconnecting
    clock.advance(1)
    assert d.transport.disconnecting
    assert b"220 " not in d.transport.value()

"""AUTH end to end over 127.0.0.1 with real clients: smtplib over STARTTLS and implicit
TLS, swaks (PLAIN, LOGIN, CRAM-MD5 with --tls), and Twisted's ESMTP client. The edge trusts
no network, so only an authenticated client may relay; a Maildir-free RecordingBus keeps
what arrived with its envelope."""

from __future__ import annotations

import os
import shutil
import smtplib
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from test_auth_helpers import CHEAP
from test_tls_helpers import Certs, in_thread, make_certs
from twisted.internet import defer, reactor
from twisted.internet.interfaces import IListeningPort

from slimta_tx import Policy, ServerTLS, SmtpEdge
from slimta_tx.auth import Auth, AuthLimits, PasswordFileChecker, SecretChecker
from slimta_tx.auth.passwd import set_password
from slimta_tx.starttls import wrap_implicit
from slimta_tx.testing import RecordingBus

MESSAGE = b"From: a@example.org\r\nTo: friend@elsewhere.test\r\nSubject: auth\r\n\r\nhello\r\n"
TIMEOUT = 15.0


@dataclass
class Server:
    edge: SmtpEdge
    bus: RecordingBus
    certs: Certs
    port: int = 0
    implicit_port: int = 0


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("auth-certs"))


@pytest.fixture
def server(certs: Certs, tmp_path: Path) -> Iterator[Server]:
    """alice is in an Argon2id password file (PLAIN/LOGIN only); carol's secret comes from a
    secret_func, so CRAM-MD5 and SCRAM work for her."""
    passwd = tmp_path / "passwd"
    set_password(str(passwd), "alice", "alice-pw", CHEAP)
    auth = Auth(
        [
            PasswordFileChecker(str(passwd), reactor, hasher=CHEAP),
            SecretChecker({"carol": "carol-pw"}.get),
        ],
        limits=AuthLimits(failure_delay=0.05),
    )
    bus = RecordingBus()
    edge = SmtpEdge(bus, Policy(hostname="mx.test", trusted_networks=()), reactor=reactor)
    cert = certs.leaf("localhost", "127.0.0.1", stem="server", combined=False)
    edge.enable_tls(ServerTLS(str(cert), str(cert.with_suffix(".key"))))
    edge.enable_authentication(auth)
    ports: list[IListeningPort] = [
        reactor.listenTCP(0, edge, interface="127.0.0.1"),  # type: ignore[attr-defined]
        reactor.listenTCP(0, wrap_implicit(edge), interface="127.0.0.1"),  # type: ignore[attr-defined]
    ]
    server = Server(edge, bus, certs)
    server.port, server.implicit_port = (p.getHost().port for p in ports)  # type: ignore[attr-defined]
    yield server
    for port in ports:
        port.stopListening()


def client_context(certs: Certs) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(certs.ca_file))


def delivered(server: Server) -> list[tuple[str | None, str]]:
    return [(m.envelope.authed, m.envelope.protocol) for m in server.bus.messages]


@pytest_twisted.inlineCallbacks
def test_smtplib_starttls_login_plain_and_relay(server: Server) -> Any:
    """smtplib: STARTTLS, then AUTH PLAIN for a password-file user, then relay to another
    domain; the envelope records alice and ESMTPSA. Before AUTH the relay is refused."""

    def run() -> tuple[str, str]:
        with smtplib.SMTP("127.0.0.1", server.port, timeout=TIMEOUT) as smtp:
            smtp.ehlo("client.test")
            before = smtp.esmtp_features.get("auth", "")
            smtp.starttls(context=client_context(server.certs))
            smtp.ehlo("client.test")
            after = smtp.esmtp_features.get("auth", "")
            with pytest.raises(smtplib.SMTPRecipientsRefused):
                smtp.sendmail("a@example.org", ["friend@elsewhere.test"], MESSAGE)
            smtp.user, smtp.password = "alice", "alice-pw"
            code, _ = smtp.auth("PLAIN", smtp.auth_plain)
            assert code == 235
            smtp.sendmail("a@example.org", ["friend@elsewhere.test"], MESSAGE)
            return before, after

    before, after = yield in_thread(run)
    assert before.split() == ["SCRAM-SHA-256", "CRAM-MD5"]
    assert after.split() == ["SCRAM-SHA-256", "CRAM-MD5", "PLAIN", "LOGIN"]
    assert delivered(server) == [("alice", "ESMTPSA")]


@pytest_twisted.inlineCallbacks
def test_smtplib_implicit_tls_login(server: Server) -> Any:
    """smtplib.SMTP_SSL (port 465 style): login() picks CRAM-MD5 for carol; AUTH LOGIN
    works for alice on another connection; a wrong password is SMTPAuthenticationError 535
    (smtplib tries CRAM-MD5, PLAIN and LOGIN in turn: three failures, under the limit)."""

    def run() -> tuple[int, int]:
        ctx = client_context(server.certs)
        with smtplib.SMTP_SSL(
            "127.0.0.1", server.implicit_port, timeout=TIMEOUT, context=ctx
        ) as s:
            s.ehlo("client.test")
            code, _ = s.login("carol", "carol-pw")
            s.sendmail("a@example.org", ["friend@elsewhere.test"], MESSAGE)
        with smtplib.SMTP_SSL(
            "127.0.0.1", server.implicit_port, timeout=TIMEOUT, context=ctx
        ) as s:
            s.ehlo("client.test")
            s.user, s.password = "alice", "alice-pw"
            login_code, _ = s.auth("LOGIN", s.auth_login, initial_response_ok=False)
        with smtplib.SMTP_SSL(
            "127.0.0.1", server.implicit_port, timeout=TIMEOUT, context=ctx
        ) as s:
            s.ehlo("client.test")
            with pytest.raises(smtplib.SMTPAuthenticationError) as info:
                s.login("carol", "nope")
            assert info.value.smtp_code == 535
        return code, login_code

    codes = yield in_thread(run)
    assert codes == (235, 235)
    assert delivered(server) == [("carol", "ESMTPSA")]


@pytest_twisted.inlineCallbacks
def test_smtplib_plaintext_plain_is_538(server: Server) -> Any:
    """Without TLS smtplib's login() can only use CRAM-MD5 (works), and an explicit AUTH PLAIN
    is refused with 538 before any password is checked."""

    def run() -> tuple[int, bytes, int]:
        with smtplib.SMTP("127.0.0.1", server.port, timeout=TIMEOUT) as smtp:
            smtp.ehlo("client.test")
            code, text = smtp.docmd("AUTH", "PLAIN AGFsaWNlAGFsaWNlLXB3")
            login, _ = smtp.login("carol", "carol-pw")
            smtp.sendmail("a@example.org", ["friend@elsewhere.test"], MESSAGE)
            return code, text, login

    code, text, login = yield in_thread(run)
    assert (code, text) == (
        538,
        b"5.7.11 Encryption required for requested authentication mechanism",
    )
    assert login == 235
    assert delivered(server) == [("carol", "ESMTPA")]


def swaks_or_skip() -> str:
    swaks = shutil.which("swaks")
    if swaks is None:
        if os.environ.get("CI") == "true":
            pytest.fail("swaks is missing (.ci/services installs it)")
        pytest.skip("swaks not installed: apt-get install swaks libnet-ssleay-perl")
    return swaks


@pytest.mark.parametrize(
    ("mechanism", "user", "password"),
    [
        ("PLAIN", "alice", "alice-pw"),
        ("LOGIN", "alice", "alice-pw"),
        ("CRAM-MD5", "carol", "carol-pw"),
    ],
)
@pytest_twisted.inlineCallbacks
def test_swaks_auth_over_tls(server: Server, mechanism: str, user: str, password: str) -> Any:
    """swaks --tls --auth MECH authenticates and relays; a wrong password makes swaks fail."""
    from twisted.internet.utils import getProcessOutputAndValue

    swaks = swaks_or_skip()
    base = [
        "--server", "127.0.0.1", "--port", str(server.port), "--tls",
        "--ehlo", "swaks.test", "--from", "a@example.org", "--to", "friend@elsewhere.test",
        "--auth", mechanism, "--auth-user", user, "--body", "hello from swaks",
    ]  # fmt: skip
    out, err, code = yield getProcessOutputAndValue(
        swaks, [*base, "--auth-password", password], env=dict(os.environ)
    ).addTimeout(TIMEOUT * 2, reactor)
    text = (out + err).decode()
    assert code == 0, text
    assert "235 2.7.0 Authentication successful" in text
    assert delivered(server) == [(user, "ESMTPSA")]
    out, err, code = yield getProcessOutputAndValue(
        swaks, [*base, "--auth-password", "wrong"], env=dict(os.environ)
    ).addTimeout(TIMEOUT * 2, reactor)
    assert code != 0
    assert "535 5.7.8" in (out + err).decode()
    assert len(server.bus.messages) == 1


@pytest_twisted.inlineCallbacks
def test_twisted_esmtp_client_authenticates(server: Server) -> Any:
    """Twisted's ESMTP client (STARTTLS required, authentication required) logs in with
    CRAM-MD5 and delivers to another domain."""
    from twisted.internet.ssl import Certificate, optionsForClientTLS
    from twisted.mail.smtp import ESMTPSenderFactory

    trust = Certificate.loadPEM(server.certs.ca_file.read_bytes())
    done: defer.Deferred[Any] = defer.Deferred()
    factory = ESMTPSenderFactory(
        b"carol",
        b"carol-pw",
        "a@example.org",
        ["friend@elsewhere.test"],
        BytesIO(MESSAGE.replace(b"\r\n", b"\n")),
        done,
        contextFactory=optionsForClientTLS("localhost", trustRoot=trust),
        requireAuthentication=True,
        requireTransportSecurity=True,
        retries=0,
    )
    reactor.connectTCP("127.0.0.1", server.port, factory)  # type: ignore[attr-defined]
    accepted, _ = yield done.addTimeout(TIMEOUT, reactor)
    assert accepted == 1
    assert delivered(server) == [("carol", "ESMTPSA")]
    assert b"with ESMTPSA" in server.bus.messages[0].envelope.received_header()

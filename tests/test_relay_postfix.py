"""The relay bus against real next hops on 127.0.0.1: Postfix (SMTP) and Dovecot (LMTP).

Slow-ish (they start processes); under CI=true a missing Postfix or Dovecot fails the run.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import pytest_twisted
import trustme
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.internet.task import deferLater

from slimta_tx.bus.relay import RelayBus, next_hop_endpoint
from slimta_tx.envelope import Envelope
from slimta_tx.spool import Spool
from tests.support.postfix import Dovecot, Postfix, running_dovecot, running_postfix

pytestmark = pytest.mark.slow

CA = trustme.CA()
LEAF = CA.issue_cert("localhost", "127.0.0.1")


@pytest.fixture(scope="module")
def postfix() -> Iterator[Postfix]:
    with running_postfix(LEAF.cert_chain_pems[0].bytes(), LEAF.private_key_pem.bytes()) as pf:
        yield pf


@pytest.fixture(scope="module")
def dovecot() -> Iterator[Dovecot]:
    with running_dovecot() as dv:
        yield dv


def message(subject: str, extra: bytes = b"") -> bytes:
    return (
        f"From: edge@edge.test\r\nSubject: {subject}\r\n\r\n".encode()
        + b"first line\r\n.starts with a dot\r\n..two dots\r\n"
        + extra
    )


def envelope(recipients: list[str], body: bytes, sender: str = "edge@edge.test", **params: Any):
    spool = Spool()
    spool.write(body)
    env = Envelope(sender=sender, mail_params=dict(params))
    for rcpt in recipients:
        env.add_recipient(rcpt, {})
    env.message = spool
    return env


def relay(address: str, **kwargs: Any) -> RelayBus:
    kwargs.setdefault("tls", "none")
    kwargs.setdefault("timeout", 20.0)
    return RelayBus(next_hop_endpoint(reactor, address), reactor, hostname="edge.test", **kwargs)


@inlineCallbacks
def eventually(find: Callable[[], list[bytes]], seconds: float = 15.0) -> Any:
    """Postfix delivers after its 250, in the background: poll its Maildir (bounded)."""
    for _ in range(int(seconds / 0.05)):
        found = find()
        if found:
            return found
        yield deferLater(reactor, 0.05, lambda: None)
    raise AssertionError("nothing delivered in time")


def same_body(stored: bytes, sent: bytes) -> bool:
    """The mailbox copy ends with the sent body (mailboxes store LF line ends)."""
    sent_body = sent.split(b"\r\n\r\n", 1)[1].replace(b"\r\n", b"\n")
    return stored.replace(b"\r\n", b"\n").endswith(b"\n\n" + sent_body)


def with_subject(messages: list[bytes], subject: str) -> list[bytes]:
    return [m for m in messages if f"Subject: {subject}".encode() in m]


@pytest_twisted.inlineCallbacks
def test_postfix_takes_the_message_and_its_queue_id_is_ours(postfix: Postfix) -> Any:
    """Relayed to Postfix: our 250 carries Postfix's queue id; the mailbox gets the message
    byte for byte (dots intact) under our Received: header."""
    subject = secrets.token_hex(6)
    bus = relay(postfix.address)
    body = message(subject)
    env = envelope(["alice@example.test", "bob@example.test"], body)
    reply = yield bus.send(env)
    bus.close()
    assert reply.code == "250", reply
    queue_id = reply.message.rsplit(" ", 1)[-1]
    assert "queued as" in reply.message and queue_id in postfix.log
    for user in ("alice", "bob"):
        (got,) = yield eventually(lambda u=user: with_subject(postfix.delivered(u), subject))
        assert same_body(got, body)
        assert f"id {env.queue_id}".encode() in got  # our Received: header went along


@pytest_twisted.inlineCallbacks
def test_postfix_unknown_user_is_550_5_1_1(postfix: Postfix) -> Any:
    """Postfix's recipient refusal reaches the client with its code and enhanced code."""
    bus = relay(postfix.address)
    reply = yield bus.send(envelope(["carol@example.test"], message("x")))
    bus.close()
    assert (reply.code, reply.enhanced_status_code) == ("550", "5.1.1")
    assert "User unknown" in reply.message


@pytest_twisted.inlineCallbacks
def test_postfix_busy_mailbox_is_temporary(postfix: Postfix) -> Any:
    """A 450 4.2.1 from Postfix is passed on: the client retries later."""
    bus = relay(postfix.address)
    reply = yield bus.send(envelope(["busy@example.test"], message("x")))
    bus.close()
    assert (reply.code, reply.enhanced_status_code) == ("450", "4.2.1")


@pytest_twisted.inlineCallbacks
def test_postfix_mixed_recipients_deliver_to_none(postfix: Postfix) -> Any:
    """One good and one unknown recipient: 550 for the message and no copy for the good one."""
    subject = secrets.token_hex(6)
    bus = relay(postfix.address)
    reply = yield bus.send(
        envelope(["alice@example.test", "carol@example.test"], message(subject))
    )
    assert reply.code == "550" and "delivered to none" in reply.message
    marker = secrets.token_hex(6)
    after = yield bus.send(envelope(["alice@example.test"], message(marker)))
    bus.close()
    assert after.code == "250"
    yield eventually(lambda: with_subject(postfix.delivered("alice"), marker))
    assert with_subject(postfix.delivered("alice"), subject) == []


@pytest_twisted.inlineCallbacks
def test_starttls_required_to_postfix(postfix: Postfix) -> Any:
    """--relay-tls required: the certificate is checked and Postfix records ESMTPS."""
    subject = secrets.token_hex(6)
    trust = Certificate.loadPEM(CA.cert_pem.bytes())
    bus = relay(
        postfix.address, tls="required", tls_options=optionsForClientTLS("localhost", trust)
    )
    reply = yield bus.send(envelope(["bob@example.test"], message(subject)))
    bus.close()
    assert reply.code == "250", reply
    (got,) = yield eventually(lambda: with_subject(postfix.delivered("bob"), subject))
    assert b"with ESMTPS" in got


@pytest_twisted.inlineCallbacks
def test_starttls_required_refuses_an_untrusted_certificate(postfix: Postfix) -> Any:
    """A certificate we do not trust: no delivery, 451 (the client keeps the message)."""
    other_ca = trustme.CA()
    trust = Certificate.loadPEM(other_ca.cert_pem.bytes())
    bus = relay(
        postfix.address, tls="required", tls_options=optionsForClientTLS("localhost", trust)
    )
    reply = yield bus.send(envelope(["bob@example.test"], message("x")))
    bus.close()
    assert reply.code == "451"


@pytest_twisted.inlineCallbacks
def test_pooled_connection_carries_several_messages(postfix: Postfix) -> Any:
    """Three messages in a row use one connection (RSET between them)."""
    bus = relay(postfix.address)
    for _ in range(3):
        reply = yield bus.send(envelope(["bob@example.test"], message("pooled")))
        assert reply.code == "250", reply
    assert bus.pool.opened == 1
    bus.close()


@pytest_twisted.inlineCallbacks
def test_smtputf8_to_postfix(postfix: Postfix) -> Any:
    """An internationalised sender goes through with SMTPUTF8 (Postfix offers it)."""
    bus = relay(postfix.address)
    env = envelope(
        ["alice@example.test"], message("utf8"), sender="élise@edge.test", SMTPUTF8=None
    )
    reply = yield bus.send(env)
    bus.close()
    assert reply.code == "250", reply


@pytest_twisted.inlineCallbacks
def test_large_message_streams_to_postfix(postfix: Postfix) -> Any:
    """A 4 MiB message arrives whole (it streams from the spool file)."""
    subject = secrets.token_hex(6)
    bulk = b"".join(b"%07d " % i + b"x" * 70 + b"\r\n" for i in range(4 * 1024 * 1024 // 80))
    body = message(subject, bulk)
    bus = relay(postfix.address)
    reply = yield bus.send(envelope(["alice@example.test"], body))
    bus.close()
    assert reply.code == "250", reply
    (got,) = yield eventually(lambda: with_subject(postfix.delivered("alice"), subject))
    assert same_body(got, body)


@pytest_twisted.inlineCallbacks
def test_too_big_for_postfix_is_refused_before_sending(postfix: Postfix) -> Any:
    """Above Postfix's SIZE (10240000): 552 5.3.4 from us, Postfix never sees the data."""
    bus = relay(postfix.address)
    reply = yield bus.send(envelope(["alice@example.test"], b"x" * 10_300_000 + b"\r\n"))
    bus.close()
    assert (reply.code, reply.enhanced_status_code) == ("552", "5.3.4")


# -- Dovecot LMTP ---------------------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_lmtp_to_dovecot_delivers_to_every_recipient(dovecot: Dovecot) -> Any:
    """LMTP: both recipients accepted after the data; both mailboxes hold the message."""
    subject = secrets.token_hex(6)
    bus = relay(dovecot.address, lmtp=True)
    body = message(subject)
    reply = yield bus.send(envelope(["alice@example.test", "bob@example.test"], body))
    bus.close()
    assert reply.code == "250", reply
    for user in ("alice", "bob"):
        (got,) = with_subject(dovecot.delivered(user), subject)
        assert same_body(got, body)


@pytest_twisted.inlineCallbacks
def test_lmtp_unknown_recipient_delivers_to_none(dovecot: Dovecot) -> Any:
    """Dovecot refuses one recipient at RCPT: 550 5.1.1, and the other gets no copy."""
    subject = secrets.token_hex(6)
    bus = relay(dovecot.address, lmtp=True)
    reply = yield bus.send(
        envelope(["alice@example.test", "carol@example.test"], message(subject))
    )
    bus.close()
    assert (reply.code, reply.enhanced_status_code) == ("550", "5.1.1")
    assert with_subject(dovecot.delivered("alice"), subject) == []


@pytest_twisted.inlineCallbacks
def test_lmtp_over_a_unix_socket(dovecot: Dovecot) -> Any:
    """--relay-lmtp unix:PATH reaches Dovecot's socket."""
    subject = secrets.token_hex(6)
    bus = relay(f"unix:{dovecot.socket_path}", lmtp=True)
    reply = yield bus.send(envelope(["bob@example.test"], message(subject)))
    bus.close()
    assert reply.code == "250", reply
    assert with_subject(dovecot.delivered("bob"), subject)


@pytest_twisted.inlineCallbacks
def test_smtputf8_refused_when_dovecot_lacks_it(dovecot: Dovecot) -> Any:
    """Dovecot's LMTP offers no SMTPUTF8: a message needing it is refused 554 5.6.7."""
    bus = relay(dovecot.address, lmtp=True)
    env = envelope(["bob@example.test"], message("x"), sender="élise@edge.test", SMTPUTF8=None)
    reply = yield bus.send(env)
    bus.close()
    assert (reply.code, reply.enhanced_status_code) == ("554", "5.6.7")

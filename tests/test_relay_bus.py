"""The relay bus against a scripted next hop (StringTransport, Clock): what the client hears."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from zope.interface import implementer

from slimta_tx.bus.relay import RelayBus
from slimta_tx.bus.smtp_client import SmtpClientProtocol
from slimta_tx.envelope import Envelope
from slimta_tx.reply import Reply
from slimta_tx.spool import Spool

EHLO = b"250-nexthop.test\r\n250-PIPELINING\r\n250-SIZE 100000\r\n250 8BITMIME\r\n"


@implementer(IStreamClientEndpoint)
class ScriptedEndpoint:
    """Each connect() builds the client on a StringTransport the test then speaks through."""

    def __init__(self) -> None:
        self.connections: list[tuple[SmtpClientProtocol, StringTransport]] = []
        self.refuse = False

    def connect(self, factory: Any) -> Deferred[Any]:
        if self.refuse:
            return fail(ConnectionRefusedError("refused (test)"))
        proto = factory.buildProtocol(None)
        transport = StringTransport()
        proto.makeConnection(transport)
        self.connections.append((proto, transport))
        return succeed(proto)


class NextHop:
    """Plays the server on the latest connection: ``say`` replies, ``heard`` what came."""

    def __init__(self, endpoint: ScriptedEndpoint) -> None:
        self.endpoint = endpoint

    @property
    def client(self) -> SmtpClientProtocol:
        return self.endpoint.connections[-1][0]

    @property
    def transport(self) -> StringTransport:
        return self.endpoint.connections[-1][1]

    def heard(self) -> bytes:
        transport = self.transport
        while transport.producer is not None:  # pull the whole body
            transport.producer.resumeProducing()
        data = transport.value()
        transport.clear()
        return data

    def say(self, data: bytes) -> None:
        self.client.dataReceived(data)

    def greet(self, ehlo: bytes = EHLO) -> None:
        self.say(b"220 nexthop.test ESMTP\r\n")
        assert self.heard().startswith(b"EHLO ")
        self.say(ehlo)


def make_bus(lmtp: bool = False, **kwargs: Any) -> tuple[RelayBus, NextHop, Clock]:
    clock = Clock()
    endpoint = ScriptedEndpoint()
    kwargs.setdefault("tls", "none")
    bus = RelayBus(endpoint, clock, hostname="edge.test", lmtp=lmtp, timeout=10.0, **kwargs)
    return bus, NextHop(endpoint), clock


def envelope(recipients: list[str], body: bytes = b"Subject: hi\r\n\r\nbody\r\n", **params: Any):
    spool = Spool()
    spool.write(body)
    env = Envelope(sender="alice@edge.test", mail_params=dict(params))
    for rcpt in recipients:
        env.add_recipient(rcpt, {})
    env.message = spool
    return env


def reply_of(d: Deferred[Reply]) -> Reply:
    assert d.called, "the bus has not answered"
    result = d.result  # type: ignore[attr-defined]
    assert isinstance(result, Reply), result
    return result


def test_pipelined_transaction_passes_on_the_queue_id() -> None:
    """MAIL, RCPT, DATA go in one write; the next hop's 250 and queue id become our reply."""
    bus, hop, _ = make_bus()
    env = envelope(["bob@example.test"])
    d = bus.send(env)
    hop.greet()
    size = len(env.received_header()) + env.message.size
    assert (
        hop.heard()
        == (
            f"MAIL FROM:<alice@edge.test> SIZE={size}\r\nRCPT TO:<bob@example.test>\r\nDATA\r\n"
        ).encode()
    )
    hop.say(b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 go\r\n")
    body = hop.heard()
    assert body.startswith(b"Received: from ") and body.endswith(b"\r\nbody\r\n.\r\n")
    hop.say(b"250 2.0.0 Ok: queued as 4XyZ\r\n")
    reply = reply_of(d)
    assert (reply.code, reply.enhanced_status_code) == ("250", "2.0.0")
    assert reply.message == "Ok: queued as 4XyZ"
    assert bus.pool.idle == 1


def test_second_message_reuses_the_connection_with_rset() -> None:
    """A pooled connection is reused: RSET is pipelined in front of MAIL, no new connect."""
    bus, hop, _ = make_bus()
    d = bus.send(envelope(["bob@example.test"]))
    hop.greet()
    hop.heard()
    hop.say(b"250 ok\r\n250 ok\r\n354 go\r\n")
    hop.heard()
    hop.say(b"250 2.0.0 queued as A\r\n")
    reply_of(d)
    d2 = bus.send(envelope(["carol@example.test"]))
    assert hop.heard().startswith(b"RSET\r\nMAIL FROM:<alice@edge.test>")
    hop.say(b"250 ok\r\n250 ok\r\n250 ok\r\n354 go\r\n")
    hop.heard()
    hop.say(b"250 2.0.0 queued as B\r\n")
    assert reply_of(d2).message == "queued as B"
    assert len(hop.endpoint.connections) == 1


def test_dead_pooled_connection_is_replaced_once() -> None:
    """A reused connection answering 421 to RSET is dropped and the message goes on a new one."""
    bus, hop, _ = make_bus()
    d = bus.send(envelope(["bob@example.test"]))
    hop.greet()
    hop.heard()
    hop.say(b"250 ok\r\n250 ok\r\n354 go\r\n")
    hop.heard()
    hop.say(b"250 queued as A\r\n")
    reply_of(d)
    d2 = bus.send(envelope(["bob@example.test"]))
    hop.heard()
    hop.say(b"421 4.4.2 idle too long\r\n")
    hop.client.connectionLost(None)
    assert len(hop.endpoint.connections) == 2
    hop.greet()
    assert hop.heard().startswith(b"MAIL FROM:")  # fresh connection: no RSET
    hop.say(b"250 ok\r\n250 ok\r\n354 go\r\n")
    hop.heard()
    hop.say(b"250 queued as B\r\n")
    assert reply_of(d2).code == "250"


def test_refused_connection_is_451_4_4_1() -> None:
    """Next hop down: 451 4.4.1, the client keeps the message."""
    bus, hop, _ = make_bus()
    hop.endpoint.refuse = True
    reply = reply_of(bus.send(envelope(["bob@example.test"])))
    assert (reply.code, reply.enhanced_status_code) == ("451", "4.4.1")


def test_silence_after_the_data_is_451_4_4_1_and_the_connection_dropped() -> None:
    """No answer to the final dot within the timeout: 451 4.4.1, connection not reused."""
    bus, hop, clock = make_bus()
    d = bus.send(envelope(["bob@example.test"]))
    hop.greet()
    hop.heard()
    hop.say(b"250 ok\r\n250 ok\r\n354 go\r\n")
    hop.heard()
    clock.advance(10.5)
    reply = reply_of(d)
    assert (reply.code, reply.enhanced_status_code) == ("451", "4.4.1")
    assert hop.transport.disconnecting
    assert bus.pool.idle == 0 and bus.pool.size == 0


def test_greeting_refusal_is_temporary() -> None:
    """A 554 greeting refuses us, not the client's message: 451."""
    bus, hop, _ = make_bus()
    d = bus.send(envelope(["bob@example.test"]))
    hop.say(b"554 5.7.1 go away\r\n")
    reply = reply_of(d)
    assert reply.code == "451" and "554 go away" in reply.message


@pytest.mark.parametrize(
    ("answers", "code", "esc"),
    [
        (b"550 5.7.1 sender blocked\r\n503 5.5.1 no\r\n503 5.5.1 no\r\n", "550", "5.7.1"),
        (b"250 ok\r\n550 user unknown\r\n554 5.5.1 no valid recipients\r\n", "550", "5.1.0"),
        (b"250 ok\r\n452 4.2.2 full\r\n554 5.5.1 no valid recipients\r\n", "452", "4.2.2"),
        (b"250 ok\r\n250 ok\r\n554 5.3.0 not now\r\n", "554", "5.3.0"),
        (b"250 ok\r\n250 ok\r\n421 4.3.2 shutting down\r\n", "451", "4.3.2"),
    ],
)
def test_refusals_before_the_data_are_passed_on(answers: bytes, code: str, esc: str) -> None:
    """The next hop's refusal of MAIL, RCPT or DATA is ours, with its class and x.y.z."""
    bus, hop, _ = make_bus()
    d = bus.send(envelope(["bob@example.test"]))
    hop.greet()
    hop.heard()
    hop.say(answers)
    reply = reply_of(d)
    assert (reply.code, reply.enhanced_status_code) == (code, esc)


def test_rejected_final_dot_is_passed_on() -> None:
    """A 5xx after the data (e.g. content filter) reaches the client as is."""
    bus, hop, _ = make_bus()
    d = bus.send(envelope(["bob@example.test"]))
    hop.greet()
    hop.heard()
    hop.say(b"250 ok\r\n250 ok\r\n354 go\r\n")
    hop.heard()
    hop.say(b"554 5.7.1 spam\r\n")
    assert str(reply_of(d)) == "554 5.7.1 spam"
    assert bus.pool.idle == 1


def test_mixed_recipients_deliver_nothing_and_drop_the_354() -> None:
    """One recipient refused of two: nothing is sent (connection dropped after 354), and the
    permanent refusal is ours, saying nothing was delivered."""
    bus, hop, _ = make_bus()
    d = bus.send(envelope(["bob@example.test", "nobody@example.test"]))
    hop.greet()
    hop.heard()
    hop.say(b"250 ok\r\n250 ok\r\n550 5.1.1 <nobody@example.test>: unknown\r\n354 go\r\n")
    reply = reply_of(d)
    assert (reply.code, reply.enhanced_status_code) == ("550", "5.1.1")
    assert "delivered to none" in reply.message
    assert hop.heard() == b""
    assert hop.transport.disconnecting
    assert bus.pool.size == 0


def test_mixed_with_a_temporary_refusal_is_temporary() -> None:
    """A temporary refusal among permanent ones wins: the client retries."""
    bus, hop, _ = make_bus()
    d = bus.send(envelope(["a@example.test", "b@example.test", "c@example.test"]))
    hop.greet()
    hop.heard()
    hop.say(b"250 ok\r\n550 5.1.1 no\r\n450 4.2.1 busy\r\n250 ok\r\n354 go\r\n")
    reply = reply_of(d)
    assert (reply.code, reply.enhanced_status_code) == ("450", "4.2.1")
    assert reply.message.startswith("<b@example.test>: busy")


def test_lmtp_per_recipient_results() -> None:
    """LMTP: one reply per recipient after the data; all accepted is 250."""
    bus, hop, _ = make_bus(lmtp=True)
    d = bus.send(envelope(["a@example.test", "b@example.test"]))
    hop.say(b"220 lmtp ready\r\n")
    assert hop.heard().startswith(b"LHLO edge.test")
    hop.say(b"250-lmtp\r\n250 PIPELINING\r\n")
    hop.heard()
    hop.say(b"250 ok\r\n250 ok\r\n250 ok\r\n354 go\r\n")
    hop.heard()
    hop.say(b"250 2.0.0 <a@example.test> Saved\r\n")
    assert not d.called  # waits for every recipient's reply
    hop.say(b"250 2.0.0 <b@example.test> Saved\r\n")
    assert reply_of(d).code == "250"


@pytest.mark.parametrize(
    ("finals", "code"),
    [
        (b"250 2.0.0 saved\r\n552 5.2.2 <b@example.test> over quota\r\n", "552"),
        (b"452 4.2.2 quota\r\n552 5.2.2 over quota\r\n", "452"),
    ],
)
def test_lmtp_mixed_after_the_data(finals: bytes, code: str) -> None:
    """LMTP mixed results after the data: a temporary refusal if any, else the permanent one;
    the text tells how many recipients already took it."""
    bus, hop, _ = make_bus(lmtp=True)
    d = bus.send(envelope(["a@example.test", "b@example.test"]))
    hop.say(b"220 lmtp\r\n")
    hop.heard()
    hop.say(b"250-lmtp\r\n250 PIPELINING\r\n")
    hop.heard()
    hop.say(b"250 ok\r\n250 ok\r\n250 ok\r\n354 go\r\n")
    hop.heard()
    hop.say(finals)
    reply = reply_of(d)
    assert reply.code == code
    if code == "552":
        assert "took the message for 1 of 2" in reply.message


def test_smtputf8_message_refused_when_next_hop_lacks_it() -> None:
    """A message needing SMTPUTF8 is refused (554 5.6.7) before any MAIL is sent."""
    bus, hop, _ = make_bus()
    d = bus.send(envelope(["bob@example.test"], SMTPUTF8=None))
    hop.greet()
    assert str(reply_of(d)) == "554 5.6.7 Next hop does not support SMTPUTF8"
    assert hop.heard() == b""


def test_8bitmime_refused_when_next_hop_lacks_it() -> None:
    """BODY=8BITMIME to a 7-bit next hop is refused with 554 5.6.3 (no downgrade here)."""
    bus, hop, _ = make_bus()
    d = bus.send(envelope(["bob@example.test"], BODY="8BITMIME"))
    hop.greet(b"250-nexthop.test\r\n250 PIPELINING\r\n")
    assert reply_of(d).enhanced_status_code == "5.6.3"


def test_too_big_for_next_hop_is_552() -> None:
    """A message above the next hop's SIZE is refused with 552 5.3.4 without sending it."""
    bus, hop, _ = make_bus()
    d = bus.send(envelope(["bob@example.test"], body=b"x" * 100_001 + b"\r\n"))
    hop.greet()
    assert reply_of(d).code == "552"
    assert hop.heard() == b""


def test_without_pipelining_commands_go_one_by_one_and_stop_early() -> None:
    """No PIPELINING: each command waits for the previous reply; a refused RCPT means no DATA."""
    bus, hop, _ = make_bus()
    env = envelope(["bob@example.test"])
    d = bus.send(env)
    hop.greet(b"250-nexthop.test\r\n250 SIZE\r\n")
    size = len(env.received_header()) + env.message.size
    assert hop.heard() == b"MAIL FROM:<alice@edge.test> SIZE=%d\r\n" % size
    hop.say(b"250 ok\r\n")
    assert hop.heard() == b"RCPT TO:<bob@example.test>\r\n"
    hop.say(b"550 5.1.1 unknown\r\n")
    assert hop.heard() == b""
    assert reply_of(d).code == "550"
    assert bus.pool.idle == 1


def test_auth_plain_refused_without_tls() -> None:
    """Credentials are not sent in clear unless allowed: 451 4.7.0, nothing sent."""
    bus, hop, _ = make_bus(credentials=("u", "p"))
    d = bus.send(envelope(["bob@example.test"]))
    hop.greet(b"250-nexthop.test\r\n250 AUTH PLAIN\r\n")
    reply = reply_of(d)
    assert (reply.code, reply.enhanced_status_code) == ("451", "4.7.0")
    assert b"AUTH" not in hop.heard()


def test_auth_login_when_plain_not_offered() -> None:
    """AUTH LOGIN exchange with base64 user and password, then the transaction."""
    bus, hop, _ = make_bus(credentials=("user", "secret"), allow_plaintext_auth=True)
    d = bus.send(envelope(["bob@example.test"]))
    hop.greet(b"250-nexthop.test\r\n250 AUTH LOGIN\r\n")
    assert hop.heard() == b"AUTH LOGIN\r\n"
    hop.say(b"334 VXNlcm5hbWU6\r\n")
    assert hop.heard() == b"dXNlcg==\r\n"
    hop.say(b"334 UGFzc3dvcmQ6\r\n")
    assert hop.heard() == b"c2VjcmV0\r\n"
    hop.say(b"235 2.7.0 ok\r\n")
    assert hop.heard().startswith(b"MAIL FROM:")
    hop.say(b"250 ok\r\n")
    assert not d.called

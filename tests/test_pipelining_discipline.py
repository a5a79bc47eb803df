"""Improper pipelining (RFC 2920 3.1, Postfix 3.9's ``smtpd_forbid_unauth_pipelining``): a
client that sends ahead where it must wait gets 554 5.5.0 and is disconnected; what it sent
ahead is never acted on. Legitimate pipelining (a group closed by DATA, content plus the next
group after the 354, BDAT chunks) is untouched. Protocol level; real clients are in
tests/test_pipelining_e2e.py."""

from __future__ import annotations

import base64

import pytest
from smtp_driver import Driver
from test_auth_helpers import Driver as AuthDriver
from test_auth_helpers import memory_auth
from twisted.internet.defer import Deferred

from slimta_tx import Policy, Reply
from slimta_tx.testing import PendingBus
from tests.support.logs import captured_events

SYNC = ("554", "5.5.0 Error: SMTP protocol synchronization")
GROUP = b"MAIL FROM:<a@b.test>\r\nRCPT TO:<u@example.com>\r\nDATA\r\n"
UNTRUSTED = ("192.0.2.1", 40000)


def hostile_driver(**policy: object) -> Driver:
    return Driver(
        policy=Policy(hostname="mx.test", accepted_domains=("example.com",), **policy),  # type: ignore[arg-type]
        peer=UNTRUSTED,
    )


def refused(d: Driver, data: bytes) -> list[tuple[str, str]]:
    """Send ``data``; the replies up to and including the 554, which must close the session."""
    replies = d.send(data)
    assert replies[-1] == SYNC, replies
    assert d.closed
    return replies


# -- hostile shapes ---------------------------------------------------------------------------


def test_body_right_behind_data_is_refused_and_nothing_is_stored() -> None:
    """The issue's report: content sent right behind DATA, before the 354. The group before
    it is answered; DATA gets 554 5.5.0 instead of 354; the body is never read as anything."""
    d = hostile_driver()
    d.greet()
    replies = refused(d, GROUP + b"Subject: early\r\n\r\nbody\r\n.\r\nQUIT\r\n")
    assert [code for code, _ in replies] == ["250", "250", "554"]
    assert d.bus.messages == []
    assert d.proto.session.envelope is None


def test_commands_after_data_before_the_354_are_refused() -> None:
    d = hostile_driver()
    d.greet()
    assert d.codes(b"MAIL FROM:<a@b.test>\r\nRCPT TO:<u@example.com>\r\n") == ["250", "250"]
    refused(d, b"DATA\r\nRSET\r\n")


def test_content_that_arrives_while_the_data_validator_decides_is_refused() -> None:
    """DATA read alone, then the body arrives before the (asynchronous) DATA validator has
    answered, so before any 354 could have been sent: refused when the 354 would go out."""
    d = hostile_driver()
    waiting: list[Deferred[None]] = []

    def slow(session: object, reply: Reply, *extra: object) -> Deferred[None]:
        waiting.append(Deferred())
        return waiting[-1]

    d.edge.set_validator("DATA", slow)
    d.greet()
    assert d.codes(b"MAIL FROM:<a@b.test>\r\nRCPT TO:<u@example.com>\r\n") == ["250", "250"]
    assert d.send(b"DATA\r\n") == []
    assert d.send(b"Subject: early\r\n\r\nbody\r\n.\r\n") == []
    waiting[0].callback(None)
    assert d.read() == [SYNC]
    assert d.closed
    assert d.bus.messages == []


def test_smuggled_second_message_after_the_real_end_is_refused() -> None:
    """What an upstream relays when it took ``LF . LF`` for content: the attacker's MAIL,
    RCPT, DATA and forged content in one stream after the real end. The real message is
    stored; the forged one gets 554 at its DATA and never reaches the bus."""
    d = hostile_driver()
    d.greet()
    assert d.codes(GROUP) == ["250", "250", "354"]
    smuggled = (
        b"Subject: real\r\n\r\nhello\r\n.\r\n"
        b"MAIL FROM:<ceo@example.com>\r\nRCPT TO:<victim@example.com>\r\nDATA\r\n"
        b"Subject: wire the money\r\n\r\nforged\r\n.\r\n"
    )
    replies = refused(d, smuggled)
    assert [code for code, _ in replies] == ["250", "250", "250", "554"]
    assert [m.data for m in d.bus.messages] == [b"Subject: real\r\n\r\nhello\r\n"]


@pytest.mark.parametrize(
    ("before", "data"),
    [
        (b"", b"EHLO client.test\r\nMAIL FROM:<a@b.test>\r\n"),
        (b"", b"HELO client.test\r\nMAIL FROM:<a@b.test>\r\n"),
        (b"EHLO client.test\r\n", b"NOOP\r\nMAIL FROM:<a@b.test>\r\n"),
        (b"EHLO client.test\r\n", b"VRFY someone\r\nRSET\r\n"),
        (b"EHLO client.test\r\n", b"EHLO again.test\r\nRSET\r\n"),
    ],
)
def test_commands_after_a_command_that_must_be_last(before: bytes, data: bytes) -> None:
    """RFC 2920 3.1: EHLO, HELO, NOOP, VRFY (and DATA) end a group. Nothing after them
    is answered."""
    d = hostile_driver()
    if before:
        d.send(before)
    replies = refused(d, data)
    assert len(replies) == 1


def test_bytes_split_mid_line_after_ehlo_count_too() -> None:
    """Anything buffered counts, even the start of a line not yet complete."""
    d = hostile_driver()
    refused(d, b"EHLO client.test\r\nMA")


def test_the_log_names_the_command_and_the_first_word_only() -> None:
    """The log says what was sent ahead by its first word: never a SASL payload or a body."""
    d = hostile_driver()
    secret = base64.b64encode(b"\0alice\0s3cret-pw")
    with captured_events() as events:
        refused(d, b"EHLO client.test\r\nAUTH PLAIN " + secret + b"\r\n")
    lines = [e for e in events if e.get("event") == "smtp.reject"]
    assert len(lines) == 1
    assert lines[0]["reason"] == "pipelining"
    assert lines[0]["detail"].startswith("sent ahead after EHLO: 'AUTH'")
    assert lines[0]["client"] == UNTRUSTED[0]
    assert secret.decode() not in repr(events)
    assert all(secret.decode() not in repr(e) for e in events)


# -- what stays allowed ---------------------------------------------------------------------


def test_group_closed_by_data_then_content_and_next_group() -> None:
    """RFC 2920: MAIL, RCPT, DATA in one write; after the 354, content plus the next group
    (closed by DATA again), then content plus QUIT. Everything is answered, both stored."""
    d = hostile_driver()
    d.greet()
    assert d.codes(GROUP) == ["250", "250", "354"]
    assert d.codes(b"one\r\n.\r\n" + GROUP) == ["250", "250", "250", "354"]
    assert d.codes(b"two\r\n.\r\nQUIT\r\n") == ["250", "221"]
    assert [m.data for m in d.bus.messages] == [b"one\r\n", b"two\r\n"]


def test_pipelined_bdat_chunks_are_allowed() -> None:
    """RFC 3030: BDAT chunks and the commands after them may be pipelined."""
    d = hostile_driver()
    d.greet()
    wire = b"MAIL FROM:<a@b.test>\r\nRCPT TO:<u@example.com>\r\nBDAT 6\r\nhello\rBDAT 1 LAST\r\n\n"
    assert d.codes(wire + GROUP) == ["250", "250", "250", "250", "250", "250", "354"]
    assert d.bus.messages[0].data == b"hello\r\n"


def test_the_next_group_behind_a_pending_bus_is_allowed() -> None:
    """Content plus the next group while the bus still works: answered in order later."""
    bus = PendingBus()
    d = Driver(bus=bus, peer=UNTRUSTED)
    d.greet()
    d.send(GROUP)
    assert d.send(b"body\r\n.\r\n" + GROUP) == []
    bus.pending[0][2].callback(Reply("250", "stored", "2.6.0"))
    assert [code for code, _ in d.read()] == ["250", "250", "250", "354"]
    assert not d.closed


def test_quit_is_not_checked() -> None:
    """Nothing after QUIT is read: the client gets its 221."""
    d = hostile_driver()
    d.greet()
    assert d.send(b"QUIT\r\nNOOP\r\n") == [("221", "2.0.0 mx.test Bye")]


def test_auth_with_an_initial_response_may_be_followed() -> None:
    """RFC 4954 4: AUTH with an initial response may be followed by the next command."""
    d = AuthDriver(memory_auth())
    d.ehlo()
    token = base64.b64encode(b"\0alice\0s3cret-pw").decode()
    replies = d.send(f"AUTH PLAIN {token}\r\nMAIL FROM:<a@b.test>\r\n".encode())
    assert [code for code, _ in replies] == ["235", "250"]


def test_auth_without_initial_response_must_wait_for_the_334() -> None:
    d = AuthDriver(memory_auth())
    d.ehlo()
    replies = d.send(b"AUTH PLAIN\r\n" + base64.b64encode(b"\0alice\0s3cret-pw") + b"\r\n")
    assert replies == [SYNC]
    assert d.proto.session.authed is None


# -- who is exempt ---------------------------------------------------------------------------


def test_trusted_clients_are_not_checked() -> None:
    """A client in a trusted network (loopback by default) may pipeline loosely."""
    d = Driver(peer=("127.0.0.1", 40000))
    d.greet()
    assert d.codes(GROUP + b"body\r\n.\r\n") == ["250", "250", "354", "250"]


def test_authenticated_clients_are_not_checked() -> None:
    d = AuthDriver(memory_auth())
    d.ehlo()
    assert d.one("AUTH PLAIN " + base64.b64encode(b"\0alice\0s3cret-pw").decode())[0] == "235"
    replies = d.send(
        b"MAIL FROM:<a@b.test>\r\nRCPT TO:<x@elsewhere.test>\r\nDATA\r\nbody\r\n.\r\n"
    )
    assert [code for code, _ in replies] == ["250", "250", "354", "250"]


def test_the_check_can_be_turned_off() -> None:
    """``Policy(forbid_improper_pipelining=False)`` (``--allow-improper-pipelining``)."""
    d = hostile_driver(forbid_improper_pipelining=False)
    assert d.codes(b"EHLO client.test\r\n" + GROUP + b"body\r\n.\r\n") == [
        "250",
        "250",
        "250",
        "354",
        "250",
    ]

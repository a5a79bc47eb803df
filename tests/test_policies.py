"""Sender/recipient lists, per-client connection limits and the early-talker greeting delay."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from smtp_driver import Driver
from twisted.internet.task import Clock

from slimta_tx import Policy, SmtpEdge
from slimta_tx.policies import (
    AddressList,
    ConnectionLimits,
    EarlyTalkerPolicy,
    ListError,
    recipient_list,
    sender_list,
)
from slimta_tx.testing import RecordingBus

POLICY = Policy(hostname="mx.test", accepted_domains=("example.com", ".example.com"))

RULES = """
# senders
spammer@example.net        REJECT
example.org                REJECT   No mail from example.org
friend@example.org         OK
.bad.test                  550 5.7.0 Whole tree refused
postmaster@                OK
/^bounce-[0-9]+@/          REJECT
<>                         OK
*                          450 4.7.1 Unknown sender, try later
"""


def edge_with(*policies: Any, policy: Policy = POLICY) -> tuple[SmtpEdge, Clock]:
    clock = Clock()
    edge = SmtpEdge(RecordingBus(), policy, reactor=clock)
    for p in policies:
        p.install(edge)
    return edge, clock


# -- lists ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "verdict"),
    [
        ("spammer@example.net", "550 5.7.1 Access denied"),
        ("SPAMMER@Example.NET", "550 5.7.1 Access denied"),
        ("anyone@example.org", "550 5.7.1 No mail from example.org"),
        ("friend@example.org", "OK"),  # exact address beats its domain
        ("x@mail.bad.test", "550 5.7.0 Whole tree refused"),
        ("x@a.b.bad.test", "550 5.7.0 Whole tree refused"),
        ("x@bad.test", "450 4.7.1 Unknown sender, try later"),  # .bad.test: subdomains only
        ("postmaster@anywhere.test", "OK"),
        ("bounce-123@lists.test", "550 5.7.1 Access denied"),
        ("bounce-abc@lists.test", "450 4.7.1 Unknown sender, try later"),
        ("", "OK"),  # the null sender
        ("someone@else.test", "450 4.7.1 Unknown sender, try later"),
    ],
)
def test_most_specific_rule_wins(address: str, verdict: str) -> None:
    """Exact address, then domain, then parent domains, then local part, then patterns in
    order, then '*'; case does not matter."""
    rule = AddressList(text=RULES).match(address)
    assert rule is not None
    shown = "OK" if rule.refusal is None else str(rule.refusal)
    assert shown == verdict


def test_sender_list_refuses_at_mail_with_the_address_named() -> None:
    """A refused sender gets the rule's reply at MAIL, naming the address; others pass."""
    edge, clock = edge_with(sender_list(text=RULES))
    d = Driver(edge=edge, clock=clock)
    d.greet()
    assert d.cmd("MAIL FROM:<x@mail.bad.test>") == (
        "550",
        "5.7.0 <x@mail.bad.test>: Sender address rejected: Whole tree refused",
    )
    assert d.cmd("MAIL FROM:<friend@example.org>")[0] == "250"


def test_recipient_list_of_known_users(tmp_path: Path) -> None:
    """A recipient list with '*' refusing everyone else: only listed users are accepted, and
    the relay rule still comes first (a refused relay is not made acceptable by the list)."""
    users = tmp_path / "users"
    users.write_text("alice@example.com OK\nbob@example.com OK\n* 550 5.1.1 No such user\n")
    edge, clock = edge_with(recipient_list(str(users)))
    d = Driver(edge=edge, clock=clock)
    d.greet()
    replies = d.send(
        b"MAIL FROM:<a@b.test>\r\nRCPT TO:<alice@example.com>\r\nRCPT TO:<eve@example.com>\r\n"
        b"RCPT TO:<x@elsewhere.test>\r\n"
    )
    assert replies[1][0] == "250"
    assert replies[2] == (
        "550",
        "5.1.1 <eve@example.com>: Recipient address rejected: No such user",
    )
    assert replies[3][0] == "554" and "Relay access denied" in replies[3][1]


def test_reload_reads_the_file_again_and_keeps_old_rules_on_a_mistake(tmp_path: Path) -> None:
    """reload() picks up changes; a file with a mistake is reported and the rules in force
    stay."""
    path = tmp_path / "senders"
    path.write_text("a@x.test REJECT\n")
    addresses = AddressList([str(path)])
    assert addresses.match("a@x.test") is not None
    path.write_text("b@x.test REJECT\n")
    assert addresses.reload() is True
    assert addresses.match("a@x.test") is None
    assert addresses.match("b@x.test") is not None
    path.write_text("c@x.test MAYBE\n")
    assert addresses.reload() is False
    assert addresses.match("b@x.test") is not None
    assert addresses.match("c@x.test") is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a@x.test\n", "no action"),
        ("a@x.test MAYBE\n", "unknown action 'MAYBE'"),
        ("/[unclosed/ REJECT\n", "bad pattern"),
        ("/no-end REJECT\n", "closing '/'"),
    ],
)
def test_mistakes_name_file_and_line(tmp_path: Path, text: str, message: str) -> None:
    """A mistake in a list raises ListError naming the file and line."""
    path = tmp_path / "list"
    path.write_text("# fine\n" + text)
    with pytest.raises(ListError, match=message) as caught:
        AddressList([str(path)])
    assert f"{path}:2" in str(caught.value)


def test_an_unreadable_list_is_an_error(tmp_path: Path) -> None:
    """A missing file is a ListError (twistd turns it into a one-line usage error)."""
    with pytest.raises(ListError, match="cannot read"):
        AddressList([str(tmp_path / "missing")])


# -- connection limits --------------------------------------------------------------------


def test_concurrent_connections_per_address_are_limited() -> None:
    """The third simultaneous connection from one address gets 421 4.7.0 and is closed;
    another address is not affected; when one ends, a new one is allowed."""
    edge, clock = edge_with(ConnectionLimits(max_connections=2))
    first = Driver(edge=edge, clock=clock, peer=("192.0.2.1", 1))
    Driver(edge=edge, clock=clock, peer=("192.0.2.1", 2))
    third = Driver(edge=edge, clock=clock, peer=("192.0.2.1", 3))
    assert third.banner == [("421", "4.7.0 mx.test Too many connections from 192.0.2.1")]
    assert third.closed
    third.proto.connectionLost(None)  # a refused connection does not free a slot
    assert Driver(edge=edge, clock=clock, peer=("192.0.2.2", 1)).banner[0][0] == "220"
    assert Driver(edge=edge, clock=clock, peer=("192.0.2.1", 4)).banner[0][0] == "421"
    first.cmd("QUIT")
    first.proto.connectionLost(None)
    assert Driver(edge=edge, clock=clock, peer=("192.0.2.1", 5)).banner[0][0] == "220"


def test_ipv6_clients_are_counted_per_64() -> None:
    """Two addresses in one IPv6 /64 count as one client."""
    edge, clock = edge_with(ConnectionLimits(max_connections=1))
    assert Driver(edge=edge, clock=clock, peer=("2001:db8:1:2::1", 1)).banner[0][0] == "220"
    assert Driver(edge=edge, clock=clock, peer=("2001:db8:1:2::9", 1)).banner[0][0] == "421"
    assert Driver(edge=edge, clock=clock, peer=("2001:db8:1:3::1", 1)).banner[0][0] == "220"


def test_connection_rate_is_limited_in_a_sliding_window() -> None:
    """At most 3 new connections per 10 seconds per address; the window slides (Clock)."""
    edge, clock = edge_with(ConnectionLimits(max_rate=(3, 10.0)))

    def connect() -> str:
        d = Driver(edge=edge, clock=clock, peer=("192.0.2.7", 1))
        code = d.banner[0][0]
        d.proto.connectionLost(None)
        return code

    assert [connect() for _ in range(4)] == ["220", "220", "220", "421"]
    clock.advance(5)
    assert connect() == "421"
    clock.advance(5.1)
    assert [connect() for _ in range(4)] == ["220", "220", "220", "421"]


def test_rate_refusal_text() -> None:
    """The rate refusal is 421 4.7.0 and says to slow down."""
    edge, clock = edge_with(ConnectionLimits(max_rate=(1, 60.0)))
    Driver(edge=edge, clock=clock, peer=("192.0.2.7", 1))
    assert Driver(edge=edge, clock=clock, peer=("192.0.2.7", 2)).banner == [
        ("421", "4.7.0 mx.test Too many connections from 192.0.2.7, slow down")
    ]


def test_trusted_networks_are_exempt_from_limits() -> None:
    """Loopback (a trusted network by default) is never limited."""
    edge, clock = edge_with(ConnectionLimits(max_connections=1, max_rate=(1, 60.0)))
    codes = [Driver(edge=edge, clock=clock, peer=("127.0.0.1", n)).banner[0][0] for n in range(3)]
    assert codes == ["220", "220", "220"]


# -- early talkers --------------------------------------------------------------------------


def test_greeting_waits_for_the_delay() -> None:
    """With a greeting delay, the banner comes only after that many seconds."""
    edge, clock = edge_with(EarlyTalkerPolicy(delay=4.0))
    d = Driver(edge=edge, clock=clock)
    assert d.banner == []
    clock.advance(3.9)
    assert d.read() == []
    clock.advance(0.1)
    assert d.read()[0][0] == "220"
    assert d.cmd("EHLO c.test")[0] == "250"


def test_a_client_that_talks_first_gets_554_and_is_closed() -> None:
    """A client that sends before the greeting gets 554 5.5.1 after the delay (not earlier:
    as postscreen, it waits) and the connection is closed; its commands are not answered."""
    edge, clock = edge_with(EarlyTalkerPolicy(delay=4.0))
    d = Driver(edge=edge, clock=clock)
    assert d.send(b"EHLO spam.test\r\nMAIL FROM:<s@spam.test>\r\n") == []
    assert d.transport.producerState == "paused"
    clock.advance(4)
    assert d.read() == [("554", "5.5.1 Protocol error: talking before the greeting")]
    assert d.closed
    assert d.proto.session.early_talker


def test_without_the_policy_early_talk_is_answered_after_the_banner() -> None:
    """Off by default: a client that talks first is merely noted, then served normally."""
    edge, clock = edge_with()
    seen: list[bool] = []
    edge.set_validator("BANNER", lambda s, r, a: seen.append(s.early_talker))
    d = Driver(edge=edge, clock=clock)
    assert seen == [False]
    assert d.codes(b"EHLO c.test\r\n") == ["250"]


def test_early_talk_during_a_slow_banner_check_is_caught() -> None:
    """Data arriving while another greeting check (e.g. DNS) is still running counts too:
    reading is not paused before the banner."""
    from twisted.internet.defer import Deferred

    edge, clock = edge_with()
    slow: Deferred[None] = Deferred()
    edge.validators.add_check("BANNER", lambda s, r, *a: slow)
    EarlyTalkerPolicy(delay=1.0).install(edge)
    d = Driver(edge=edge, clock=clock)
    d.send(b"HELO now\r\n")
    clock.advance(2)
    slow.callback(None)
    assert d.read() == [("554", "5.5.1 Protocol error: talking before the greeting")]


def test_the_delay_overlaps_other_greeting_checks() -> None:
    """The delay counts from the connection, so slow DNS checks do not add to it."""
    from twisted.internet.defer import Deferred

    edge, clock = edge_with()
    EarlyTalkerPolicy(delay=3.0).install(edge)
    slow: Deferred[None] = Deferred()
    edge.validators.add_check("BANNER", lambda s, r, *a: slow, first=False)
    # Move the slow check before the delay's final wait, as a DNS policy installed earlier.
    checks = edge.validators._checks["BANNER"]
    checks.insert(1, checks.pop())
    d = Driver(edge=edge, clock=clock)
    clock.advance(2)
    slow.callback(None)
    assert d.read() == []
    clock.advance(1)
    assert d.read()[0][0] == "220"


def test_trusted_clients_skip_the_delay() -> None:
    """Trusted networks get the greeting at once."""
    edge, clock = edge_with(EarlyTalkerPolicy(delay=4.0))
    assert Driver(edge=edge, clock=clock, peer=("127.0.0.1", 1)).banner[0][0] == "220"

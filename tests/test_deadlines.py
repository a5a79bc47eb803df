"""Deadlines idle timers cannot give (issue 11): the body transfer, a minimum data rate, the
session. Every test drives the clock (``Clock``); none sleeps."""

from __future__ import annotations

from typing import Any

import pytest
from smtp_driver import Driver
from twisted.logger import formatEvent

from slimta_tx import Policy, Reply
from slimta_tx.testing import PendingBus
from tests.support.logs import captured_events

TOO_SLOW = ("421", "4.4.2 mx.test Data transfer too slow, closing connection")
TOO_LONG = ("421", "4.4.2 mx.test Data transfer time limit reached, closing connection")
SESSION_OVER = ("421", "4.4.2 mx.test Session time limit reached, closing connection")


def policy(**changes: Any) -> Policy:
    base: dict[str, Any] = {"hostname": "mx.test", "accepted_domains": ("example.com",)}
    return Policy(**{**base, **changes})


def drip(d: Driver, data: bytes, every: float, until: float) -> float:
    """Send ``data`` one byte at a time, one every ``every`` seconds, until the session closes
    or ``until`` seconds have passed; return the seconds that passed."""
    elapsed = 0.0
    position = 0
    while not d.closed and elapsed < until:
        d.proto.dataReceived(data[position : position + 1])
        position = (position + 1) % len(data)
        d.clock.advance(every)
        elapsed += every
    return elapsed


def test_defaults_need_no_tuning() -> None:
    """Out of the box: a 10-minute body, 500 bytes/s after 30 s, a one-hour session."""
    p = Policy()
    assert (p.data_deadline, p.min_data_rate, p.data_rate_grace, p.session_deadline) == (
        600.0,
        500,
        30.0,
        3600.0,
    )


@pytest.mark.parametrize(
    "field", ["data_deadline", "min_data_rate", "data_rate_grace", "session_deadline"]
)
def test_negative_limits_are_refused(field: str) -> None:
    with pytest.raises(ValueError, match=field):
        Policy(**{field: -1})


def test_dripping_body_is_cut_after_the_grace_period() -> None:
    """One byte every 2 s (the idle timer never fires): cut just after the 30 s grace period
    with 421 4.4.2, nothing stored, one log line saying why."""
    d = Driver(policy=policy())
    d.start_data()
    with captured_events() as events:
        elapsed = drip(d, b"x" * 50 + b"\r\n", every=2, until=120)
    assert 30 <= elapsed <= 32
    assert d.read() == [TOO_SLOW]
    assert d.closed
    assert d.bus.messages == []
    lines = [formatEvent(e) for e in events if "cut off" in formatEvent(e)]
    assert len(lines) == 1
    assert "body too slow (minimum 500 bytes/s)" in lines[0]
    assert "192.0.2.1" in lines[0]


def test_a_client_at_the_minimum_rate_is_never_cut_by_it() -> None:
    """600 bytes every second for 100 s (above 500 bytes/s): the message is accepted."""
    d = Driver(policy=policy())
    d.start_data()
    line = b"y" * 598 + b"\r\n"
    for _ in range(100):
        assert d.send(line) == []
        d.clock.advance(1)
    assert d.codes(b".\r\n") == ["250"]
    assert len(d.bus.messages) == 1
    assert not d.closed


def test_credit_from_a_fast_start_runs_out_at_the_minimum_rate() -> None:
    """The grace period is a credit, and every ``rate`` bytes buy a second more (Postfix's
    smtpd_min_data_rate model): 20,000 bytes at once at 1,000 bytes/s after a 10 s grace
    last until 30 s, however the client spreads what follows."""
    d = Driver(policy=policy(min_data_rate=1000, data_rate_grace=10, data_timeout=100))
    d.start_data()
    d.send((b"z" * 998 + b"\r\n") * 20)
    d.clock.advance(29)
    assert not d.closed
    d.clock.advance(1.5)
    assert d.read() == [TOO_SLOW]


def test_whole_body_deadline_cuts_a_client_fast_enough_for_the_rate() -> None:
    """A body that keeps above the rate is still cut at data_deadline."""
    d = Driver(policy=policy(data_deadline=60, min_data_rate=10))
    d.start_data()
    for _ in range(59):
        d.send(b"a" * 98 + b"\r\n")
        d.clock.advance(1)
    assert not d.closed
    d.send(b"a" * 98 + b"\r\n")
    d.clock.advance(1)
    assert d.read() == [TOO_LONG]
    assert d.closed
    assert d.bus.messages == []


def test_oversized_body_is_drained_only_until_the_deadline() -> None:
    """Without SIZE=, a too-big body is read to its end before the 552; that drain is bounded
    by the body deadlines like any other transfer."""
    d = Driver(policy=policy(max_message_size=1000, data_deadline=60, min_data_rate=10))
    d.start_data()
    for _ in range(70):
        if d.closed:
            break
        d.send(b"b" * 998 + b"\r\n")
        d.clock.advance(1)
    assert d.read() == [TOO_LONG]


def test_limits_of_zero_turn_them_off() -> None:
    """data_deadline=0, min_data_rate=0: only the idle timer is left."""
    d = Driver(policy=policy(data_deadline=0, min_data_rate=0, session_deadline=0))
    d.start_data()
    drip(d, b"q\r\n", every=10, until=2010)
    assert not d.closed
    assert d.codes(b"\r\n.\r\n") == ["250"]


def test_bdat_chunk_dripped_is_cut() -> None:
    """BDAT's octets are a body transfer too: an accepted chunk dripped is cut."""
    d = Driver(policy=policy())
    d.greet()
    assert d.codes(b"MAIL FROM:<a@sender.test>\r\nRCPT TO:<u@example.com>\r\n") == ["250", "250"]
    d.send(b"BDAT 100000 LAST\r\n")
    drip(d, b"c", every=2, until=120)
    assert d.read() == [TOO_SLOW]
    assert d.bus.messages == []


def test_refused_bdat_chunk_dripped_is_cut() -> None:
    """A refused chunk (BDAT before MAIL) is still read to its end: within the same limits."""
    d = Driver(policy=policy())
    d.greet()
    d.send(b"BDAT 100000\r\n")
    drip(d, b"c", every=2, until=120)
    assert d.read() == [TOO_SLOW]


def test_time_between_bdat_chunks_counts() -> None:
    """The transfer runs from the first chunk to LAST, commands between chunks included."""
    d = Driver(policy=policy(data_deadline=60, min_data_rate=0))
    d.greet()
    d.send(b"MAIL FROM:<a@sender.test>\r\nRCPT TO:<u@example.com>\r\n")
    for _ in range(5):
        assert d.send(b"BDAT 4\r\nabcd") == [("250", "2.0.0 4 octets received")]
        d.clock.advance(11)
    assert d.read() == []
    d.clock.advance(5)
    assert d.read() == [TOO_LONG]


def test_each_message_gets_its_own_grace_and_deadline() -> None:
    """Limits run per body: many messages on one connection, each well within them."""
    d = Driver(policy=policy(data_deadline=20, min_data_rate=1000, data_rate_grace=5))
    d.greet()
    for _ in range(10):
        replies = d.send(b"MAIL FROM:<a@sender.test>\r\nRCPT TO:<u@example.com>\r\nDATA\r\n")
        assert [code for code, _ in replies] == ["250", "250", "354"]
        d.clock.advance(4)
        assert d.send(b"hello\r\n.\r\n")[0][0] == "250"
        d.clock.advance(10)  # between transactions: no body, no body limits
    assert not d.closed


def test_one_deadline_timer_per_session_whatever_the_messages() -> None:
    """The hot path moves one timer: after many messages there is still one deadline timer
    and one idle timer, not one per message."""
    d = Driver(policy=policy())
    d.greet()
    for _ in range(50):
        d.send(b"MAIL FROM:<a@sender.test>\r\nRCPT TO:<u@example.com>\r\nDATA\r\n")
        d.send(b"hi\r\n.\r\n")  # after the 354 (RFC 2920 3.1)
        d.clock.advance(0.5)
    assert len(d.bus.messages) == 50
    assert len(d.clock.getDelayedCalls()) == 2


def test_session_deadline_ends_an_idle_looking_session() -> None:
    """NOOP every 200 s keeps the idle timer happy; the session deadline still ends it."""
    d = Driver(policy=policy(session_deadline=1000))
    d.greet()
    for _ in range(4):
        d.clock.advance(200)
        assert d.cmd("NOOP")[0] == "250"
    d.clock.advance(199)
    assert not d.closed
    d.clock.advance(2)
    assert d.read() == [SESSION_OVER]
    assert d.closed


def test_session_deadline_lets_the_body_in_transfer_finish() -> None:
    """A body under way when the session's time is up is accepted, then the 421 follows."""
    d = Driver(policy=policy(session_deadline=100))
    d.start_data()
    for _ in range(11):
        d.send((b"x" * 998 + b"\r\n") * 10)
        d.clock.advance(10)
    assert not d.closed
    replies = d.send(b".\r\n")
    assert [code for code, _ in replies] == ["250", "421"]
    assert replies[1] == SESSION_OVER
    assert d.closed
    assert len(d.bus.messages) == 1


def test_session_deadline_waits_for_the_bus() -> None:
    """The bus still has the message: its reply goes out, then the 421."""
    bus = PendingBus()
    d = Driver(bus=bus, policy=policy(session_deadline=100))
    d.start_data()
    d.send(b"x\r\n.\r\n")
    d.clock.advance(150)
    assert not d.closed
    bus.pending[0][2].callback(Reply("250", "queued", "2.6.0"))
    assert d.read() == [("250", "2.6.0 queued"), SESSION_OVER]
    assert d.closed


def test_session_deadline_grace_for_the_body_is_bounded() -> None:
    """After the session deadline a body may finish, but not drag on: it is cut at most one
    data deadline later."""
    d = Driver(policy=policy(session_deadline=100, data_deadline=50, min_data_rate=0))
    d.greet()
    d.clock.advance(99)
    d.send(b"MAIL FROM:<a@sender.test>\r\nRCPT TO:<u@example.com>\r\nDATA\r\n")
    for _ in range(45):
        d.send(b"k\r\n")
        d.clock.advance(1)
    assert not d.closed
    replies = []
    for _ in range(10):
        replies += d.send(b"k\r\n")
        d.clock.advance(1)
    replies += d.read()
    assert d.closed
    assert replies == [TOO_LONG]
    assert d.bus.messages == []


def test_session_deadline_in_the_middle_of_the_envelope_closes_at_once() -> None:
    """Between MAIL and DATA nothing is in transfer: the session ends at once."""
    d = Driver(policy=policy(session_deadline=100))
    d.greet()
    assert d.codes(b"MAIL FROM:<a@sender.test>\r\n") == ["250"]
    d.clock.advance(101)
    assert d.read() == [SESSION_OVER]
    assert d.closed

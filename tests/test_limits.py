"""Limits that keep hostile or broken clients from hurting the server (issue 2)."""

from __future__ import annotations

from smtp_driver import Driver

from slimta_tx import Policy
from slimta_tx.testing import PendingBus


def test_command_line_too_long_then_next_command_works() -> None:
    """An over-long command line gets 500 5.5.6; the following command is read normally."""
    d = Driver()
    replies = d.send(b"NOOP " + b"x" * 5000 + b"\r\nNOOP\r\n")
    assert replies == [("500", "5.5.6 Line too long"), ("250", "2.0.0 Ok")]


def test_endless_line_keeps_memory_bounded() -> None:
    """Megabytes with no CRLF: one 500 5.5.6, a small buffer, and the rest never runs."""
    d = Driver()
    replies = d.send(b"MAIL FROM:<" + b"a" * 100_000)
    assert replies == [("500", "5.5.6 Line too long")]
    for _ in range(40):
        assert d.send(b"b" * 100_000 + b"\nQUIT\n") == []
        assert d.proto.reader.buffered <= 1
    # Only a real CRLF ends the skipped line; then commands are read again.
    assert d.send(b"\r\nNOOP\r\n") == [("250", "2.0.0 Ok")]
    assert not d.closed


def test_bare_lf_in_commands_refused() -> None:
    """Commands end with CRLF only: a bare LF inside a line is a 500 5.5.2, not a separator."""
    d = Driver()
    assert d.send(b"NOOP\nNOOP\r\n") == [
        ("500", "5.5.2 Bare CR, LF or NUL in command; lines end with CRLF")
    ]
    assert d.send(b"NOOP\rQUIT\r\n")[0][0] == "500"
    assert not d.closed


def test_nul_and_invalid_utf8_refused() -> None:
    d = Driver()
    assert d.send(b"NO\x00OP\r\n")[0] == (
        "500",
        "5.5.2 Bare CR, LF or NUL in command; lines end with CRLF",
    )
    assert d.send(b"NOOP \xff\xfe\r\n") == [("500", "5.5.2 Command is not valid UTF-8")]


def test_too_many_bad_commands_closes() -> None:
    """After max_bad_commands errors: 421 4.7.0 and the connection closes."""
    d = Driver(policy=Policy(hostname="mx.test", max_bad_commands=3))
    replies = d.send(b"BAD1\r\nBAD2\r\nBAD3\r\nNOOP\r\n")
    assert [code for code, _ in replies] == ["500", "500", "500", "421"]
    assert replies[-1] == ("421", "4.7.0 mx.test Too many errors, closing connection")
    assert d.closed


def test_good_commands_do_not_count_as_errors() -> None:
    d = Driver(policy=Policy(hostname="mx.test", max_bad_commands=2))
    for _ in range(10):
        assert d.cmd("NOOP")[0] == "250"
    assert d.cmd("BAD")[0] == "500"
    assert not d.closed


def test_idle_timeout() -> None:
    """No command for command_timeout seconds: 421 4.4.2 and close."""
    d = Driver(policy=Policy(hostname="mx.test", command_timeout=60))
    d.clock.advance(59)
    assert not d.closed
    d.clock.advance(2)
    assert d.read() == [("421", "4.4.2 mx.test Timeout exceeded, closing connection")]
    assert d.closed


def test_trickled_command_does_not_reset_the_timer() -> None:
    """Partial command bytes do not count as activity: a command must complete in time."""
    d = Driver(policy=Policy(hostname="mx.test", command_timeout=60))
    for _ in range(5):
        d.send(b"N")
        d.clock.advance(15)
    assert d.closed


def test_each_command_restarts_the_timer() -> None:
    d = Driver(policy=Policy(hostname="mx.test", command_timeout=60))
    for _ in range(5):
        d.clock.advance(50)
        assert d.cmd("NOOP")[0] == "250"
    assert not d.closed


def test_the_timeout_counts_from_the_last_command_to_the_second() -> None:
    """The idle timer is restarted lazily (its reactor call fires at the old time and
    re-arms): the client still gets exactly command_timeout from its last command."""
    d = Driver(policy=Policy(hostname="mx.test", command_timeout=60))
    d.clock.advance(50)
    assert d.cmd("NOOP")[0] == "250"
    d.clock.advance(59.5)  # 109.5 s: the first call (due at 60 s) has re-armed for 110 s
    assert not d.closed
    d.clock.advance(0.5)
    assert d.read() == [("421", "4.4.2 mx.test Timeout exceeded, closing connection")]
    assert d.closed


def test_data_timeout_discards_the_message() -> None:
    """Silence during DATA: 421 4.4.2, close, nothing stored. (No minimum rate here: this
    client is slow enough for it, see tests/test_deadlines.py.)"""
    d = Driver(
        policy=Policy(
            hostname="mx.test",
            accepted_domains=("example.com",),
            data_timeout=30,
            min_data_rate=0,
        )
    )
    d.start_data()
    d.send(b"partial\r\n")
    d.clock.advance(20)
    d.send(b"more\r\n")
    d.clock.advance(20)
    assert not d.closed
    d.clock.advance(11)
    assert d.read()[0][0] == "421"
    assert d.closed
    assert d.bus.messages == []


def test_timer_paused_while_the_bus_works() -> None:
    """A slow bus is our delay, not the client's: no timeout while it works."""
    bus = PendingBus()
    d = Driver(
        bus=bus,
        policy=Policy(
            hostname="mx.test",
            accepted_domains=("example.com",),
            command_timeout=10,
            data_timeout=10,
        ),
    )
    d.start_data()
    d.send(b"x\r\n.\r\n")
    d.clock.advance(100)
    assert not d.closed
    from slimta_tx import Reply

    bus.pending[0][2].callback(Reply("250", "ok", "2.6.0"))
    assert d.read() == [("250", "2.6.0 ok")]
    d.clock.advance(9)
    assert not d.closed
    d.clock.advance(2)
    assert d.closed


def test_client_that_never_reads_is_aborted_after_close() -> None:
    """After a closing reply, a client that never reads cannot keep the socket forever."""
    d = Driver()
    aborted = []
    d.transport.abortConnection = lambda: aborted.append(True)  # type: ignore[method-assign]
    d.cmd("QUIT")
    d.clock.advance(31)
    assert aborted == [True]


def test_512_octet_limit_applies_to_plain_commands() -> None:
    """NOOP/EHLO lines past 512 octets (CRLF included) are too long; 512 exactly is fine."""
    d = Driver()
    assert d.cmd("NOOP " + "x" * (510 - 5))[0] == "250"
    assert d.cmd("NOOP " + "x" * (511 - 5)) == ("500", "5.5.6 Line too long")


def test_mail_gets_the_extension_allowance() -> None:
    """MAIL may exceed 512 octets by the SIZE/AUTH=/SMTPUTF8/BODY allowances (RFC 1870, 4954)."""
    d = Driver()
    d.greet()
    local = "a" * 64
    domain = ".".join(["b" * 60] * 3) + ".test"
    params = " SIZE=1000 BODY=8BITMIME " + "SMTPUTF8"
    line = f"MAIL FROM:<{local}@{domain}>{params}"
    assert len(line) < 512
    assert d.cmd(line)[0] == "250"
    d.cmd("RSET")
    assert d.cmd("MAIL FROM:<a@b.test> " + "X-PAD=" + "y" * 700)[0] == "555"


def test_one_abort_timer_per_close_and_none_after_the_close() -> None:
    """Closing schedules a single abort deadline, and a normal close cancels it."""
    d = Driver()
    d.send(b"QUIT\r\nNOOP\r\n")
    assert len(d.clock.getDelayedCalls()) == 1
    d.proto.connectionLost(None)
    assert d.clock.getDelayedCalls() == []

"""The ESMTP command state machine, driven over a StringTransport (issue 2)."""

from __future__ import annotations

import pytest
from smtp_driver import Driver

from slimta_tx import Policy, Reply
from slimta_tx.testing import FailingBus, RecordingBus
from tests.support.logs import captured_events

MESSAGE = b"Subject: test\r\n\r\nHello\r\n"


def test_banner_has_no_enhanced_code() -> None:
    """The greeting is '220 <hostname> ESMTP ...' without an x.y.z (RFC 2034)."""
    d = Driver()
    assert d.banner == [("220", "mx.test ESMTP slimta_tx")]


def test_custom_banner() -> None:
    """set_banner_message changes what every client sees first."""
    d = Driver()
    d.edge.set_banner_message("220", "mail.example.com ESMTP welcome")
    d2 = Driver(edge=d.edge, clock=d.clock)
    assert d2.banner == [("220", "mail.example.com ESMTP welcome")]


@pytest.mark.parametrize(
    ("code", "closes"), [("554", False), ("421", True), ("221", True), ("250", False)]
)
def test_a_banner_other_than_220_takes_its_full_meaning(code: str, closes: bool) -> None:
    """The usual 220 is sent from a copy rendered once per edge; any other greeting is a
    reply like any other: a 554 session answers 503 to all but QUIT (RFC 5321 3.1), a 421 or
    221 greeting closes the connection, and a later change of banner is seen at once."""
    d = Driver()
    d.edge.set_banner_message(code, "mx.test go away")
    d2 = Driver(edge=d.edge, clock=d.clock)
    ((got, text),) = d2.banner
    assert got == code and text.endswith("mx.test go away")  # (an error has its x.0.0 too)
    assert d2.closed is closes
    if code == "554":
        assert d2.cmd("EHLO client.test")[0] == "503"
    d.edge.set_banner_message("220", "mx.test back")
    assert Driver(edge=d.edge, clock=d.clock).banner == [("220", "mx.test back")]


def test_banner_and_quit_validators_still_shape_their_replies() -> None:
    """The 220 and the 221 are sent from copies rendered once per edge unless something could
    change them: with BANNER and QUIT validators the replies are theirs."""
    from slimta_tx.envelope import Session

    d = Driver()

    def banner(session: Session, reply: Reply, *extra: object) -> None:
        reply.message = "mx.test ESMTP hello " + session.address[0]

    def quit_(session: Session, reply: Reply, *extra: object) -> None:
        reply.message = "see you"

    d.edge.set_validator("BANNER", banner)
    d.edge.set_validator("QUIT", quit_)
    d2 = Driver(edge=d.edge, clock=d.clock)
    assert d2.banner == [("220", "mx.test ESMTP hello 192.0.2.1")]
    assert d2.cmd("QUIT") == ("221", "2.0.0 see you")
    assert d2.closed
    d.edge.set_validator("BANNER", None)
    d.edge.set_validator("QUIT", None)
    d3 = Driver(edge=d.edge, clock=d.clock)
    assert d3.banner == [("220", "mx.test ESMTP slimta_tx")]
    assert d3.cmd("QUIT") == ("221", "2.0.0 mx.test Bye")


def test_ehlo_advertises_extensions_without_enhanced_codes() -> None:
    """EHLO lists PIPELINING, SIZE n, 8BITMIME, ENHANCEDSTATUSCODES, SMTPUTF8, CHUNKING,
    BINARYMIME, DSN."""
    d = Driver()
    code, text = d.cmd("EHLO client.test")
    lines = text.split("\n")
    assert code == "250"
    assert lines[0] == "mx.test Hello client.test"
    assert lines[1:] == [
        "PIPELINING",
        f"SIZE {25 * 1024 * 1024}",
        "8BITMIME",
        "ENHANCEDSTATUSCODES",
        "SMTPUTF8",
        "CHUNKING",
        "BINARYMIME",
        "DSN",
    ]


def test_size_zero_means_unlimited() -> None:
    """With no size limit, SIZE is advertised without a number."""
    d = Driver(policy=Policy(hostname="mx.test", max_message_size=0))
    assert "SIZE" in d.cmd("EHLO c")[1].split("\n")


def test_helo_is_plain_smtp() -> None:
    """HELO gets one line with no extensions, and MAIL parameters are refused after it."""
    d = Driver()
    assert d.cmd("HELO client.test") == ("250", "mx.test Hello client.test")
    assert d.cmd("MAIL FROM:<a@b.test> SIZE=10") == (
        "555",
        "5.5.4 MAIL parameters are not allowed after HELO",
    )
    assert d.cmd("MAIL FROM:<a@b.test>")[0] == "250"


@pytest.mark.parametrize("line", ["EHLO", "EHLO ", "HELO", "EHLO two words"])
def test_greeting_needs_one_argument(line: str) -> None:
    """EHLO/HELO without a single hostname argument: 501 5.5.4."""
    d = Driver()
    code, text = d.cmd(line)
    assert code == "501" and text.startswith("5.5.4 ")


@pytest.mark.parametrize(
    ("commands", "expected"),
    [
        (["MAIL FROM:<a@b.test>"], "Send EHLO or HELO first"),
        (["EHLO c", "RCPT TO:<u@example.com>"], "Need MAIL before RCPT"),
        (["EHLO c", "DATA"], "Need MAIL before DATA"),
        (
            ["EHLO c", "MAIL FROM:<a@b.test>", "DATA"],
            "Need RCPT before DATA (no valid recipients)",
        ),
        (["EHLO c", "MAIL FROM:<a@b.test>", "MAIL FROM:<a@b.test>"], "Nested MAIL command"),
        (["RCPT TO:<u@example.com>"], "Send EHLO or HELO first"),
    ],
)
def test_sequence_errors(commands: list[str], expected: str) -> None:
    """Commands out of order get 503 5.5.1 with a reason."""
    d = Driver()
    for line in commands[:-1]:
        assert d.cmd(line)[0] == "250"
    assert d.cmd(commands[-1]) == ("503", f"5.5.1 {expected}")


def test_data_refused_when_every_recipient_was_refused() -> None:
    """A rejected RCPT does not count: DATA is still out of sequence."""
    d = Driver()
    d.greet()
    d.cmd("MAIL FROM:<a@b.test>")
    assert d.cmd("RCPT TO:<u@elsewhere.test>")[0] == "554"
    assert d.cmd("DATA")[0] == "503"


@pytest.mark.parametrize("reset", ["RSET", "EHLO again.test", "HELO again.test"])
def test_rset_ehlo_helo_reset_the_transaction(reset: str) -> None:
    """After RSET, EHLO or HELO a new MAIL is allowed and old recipients are gone."""
    d = Driver()
    d.greet()
    d.cmd("MAIL FROM:<a@b.test>")
    d.cmd("RCPT TO:<first@example.com>")
    assert d.cmd(reset)[0] == "250"
    assert d.codes(b"MAIL FROM:<c@d.test>\r\nRCPT TO:<second@example.com>\r\nDATA\r\n") == [
        "250",
        "250",
        "354",
    ]
    d.send(MESSAGE + b".\r\n")
    (message,) = d.bus.messages
    assert message.envelope.sender == "c@d.test"
    assert message.envelope.recipients == ["second@example.com"]


def test_rset_with_argument_is_a_syntax_error() -> None:
    d = Driver()
    assert d.cmd("RSET now") == ("501", "5.5.4 Syntax: RSET")


@pytest.mark.parametrize("line", ["NOOP", "NOOP anything at all", "noop"])
def test_noop(line: str) -> None:
    """NOOP answers 250 2.0.0 with or without an argument, in any state."""
    assert Driver().cmd(line) == ("250", "2.0.0 Ok")


def test_quit_closes() -> None:
    """QUIT gets 221 2.0.0 and the server closes the connection."""
    d = Driver()
    assert d.cmd("QUIT") == ("221", "2.0.0 mx.test Bye")
    assert d.closed


def test_vrfy_and_help() -> None:
    """VRFY answers 252 (never discloses users); HELP answers 214."""
    d = Driver()
    assert d.cmd("VRFY root")[0] == "252"
    assert d.cmd("VRFY") == ("501", "5.5.4 Syntax: VRFY address")
    code, text = d.cmd("HELP")
    assert code == "214" and "MAIL" in text


def test_unknown_and_unimplemented_commands() -> None:
    """Unknown verbs: 500 5.5.2. Known but not offered (EXPN, TURN, ...): 502 5.5.1."""
    d = Driver()
    assert d.cmd("FOO bar") == ("500", "5.5.2 Command not recognized")
    for verb in ("EXPN list", "TURN", "ETRN example.com", "STARTTLS", "AUTH PLAIN"):
        assert d.cmd(verb) == ("502", "5.5.1 Command not implemented")


def test_lowercase_commands_work() -> None:
    """Verbs are case-insensitive."""
    d = Driver()
    assert d.cmd("ehlo c")[0] == "250"
    assert d.cmd("mail from:<a@b.test>")[0] == "250"


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("MAIL FROM:<a@b.test> FOO=bar", ("555", "5.5.4 Unsupported MAIL parameter FOO")),
        ("MAIL FROM:<a@b.test> SIZE=abc", ("501", "5.5.4 Syntax: SIZE=<number>")),
        (
            "MAIL FROM:<a@b.test> BODY=BINARY",
            ("501", "5.5.4 Syntax: BODY=7BIT, 8BITMIME or BINARYMIME"),
        ),
        ("MAIL FROM:<a@b.test> SMTPUTF8=yes", ("501", "5.5.4 SMTPUTF8 takes no value")),
        ("MAIL FROM:a@b.test", ("501", "5.5.4 Syntax: FROM:<address> [parameters]")),
        ("MAIL TO:<a@b.test>", ("501", "5.5.4 Syntax: FROM:<address> [parameters]")),
        ("MAIL FROM:<a@@b>", ("501", "5.1.7 Bad sender address syntax")),
        ("MAIL FROM:<üser@b.test>", ("553", "5.6.7 Non-ASCII address requires SMTPUTF8")),
    ],
)
def test_mail_argument_errors(line: str, expected: tuple[str, str]) -> None:
    d = Driver()
    d.greet()
    assert d.cmd(line) == expected


def test_size_over_the_limit_is_refused_at_mail() -> None:
    """MAIL ... SIZE= above the limit: 552 5.3.4 (RFC 1870)."""
    d = Driver(policy=Policy(hostname="mx.test", max_message_size=1000))
    d.greet()
    assert d.cmd("MAIL FROM:<a@b.test> SIZE=1001")[0:1] == ("552",)
    assert d.cmd("MAIL FROM:<a@b.test> SIZE=1000")[0] == "250"


def test_mail_parameters_are_recorded() -> None:
    """SIZE, BODY and SMTPUTF8 reach the envelope; UTF-8 addresses work with SMTPUTF8."""
    d = Driver()
    d.greet()
    assert d.cmd("MAIL FROM:<jörg@bücher.test> SIZE=20 BODY=8BITMIME SMTPUTF8")[0] == "250"
    assert d.cmd("RCPT TO:<émile@example.com>")[0] == "250"
    d.cmd("DATA")
    d.send(MESSAGE + b".\r\n")
    env = d.bus.messages[0].envelope
    assert env.sender == "jörg@bücher.test"
    assert env.recipients == ["émile@example.com"]
    assert env.mail_params == {"SIZE": "20", "BODY": "8BITMIME", "SMTPUTF8": None}


def test_rcpt_parameters_are_refused() -> None:
    """RCPT parameters other than DSN's get 555 5.5.4; with DSN turned off, those too."""
    d = Driver()
    d.greet()
    d.cmd("MAIL FROM:<a@b.test>")
    assert d.cmd("RCPT TO:<u@example.com> XFOO=1") == (
        "555",
        "5.5.4 Unsupported RCPT parameter XFOO",
    )
    d = Driver(policy=Policy(hostname="mx.test", accepted_domains=("example.com",), dsn=False))
    d.greet()
    d.cmd("MAIL FROM:<a@b.test>")
    assert d.cmd("RCPT TO:<u@example.com> NOTIFY=NEVER") == (
        "555",
        "5.5.4 Unsupported RCPT parameter NOTIFY",
    )


def test_null_sender_accepted_but_not_as_recipient() -> None:
    d = Driver()
    d.greet()
    assert d.cmd("MAIL FROM:<>")[0] == "250"
    assert d.cmd("RCPT TO:<>") == ("501", "5.1.3 Bad recipient address syntax")


class TestRelay:
    """No open relay: only trusted networks, accepted domains or authenticated clients."""

    def test_untrusted_client_to_foreign_domain(self) -> None:
        d = Driver()
        d.greet()
        d.cmd("MAIL FROM:<a@b.test>")
        assert d.cmd("RCPT TO:<victim@elsewhere.test>") == (
            "554",
            "5.7.1 <victim@elsewhere.test>: Relay access denied",
        )

    def test_accepted_domain_and_subdomain_pattern(self) -> None:
        policy = Policy(hostname="mx.test", accepted_domains=("example.com", ".example.org"))
        d = Driver(policy=policy)
        d.greet()
        d.cmd("MAIL FROM:<a@b.test>")
        assert d.cmd("RCPT TO:<u@EXAMPLE.com>")[0] == "250"
        assert d.cmd("RCPT TO:<u@mx.example.org>")[0] == "250"
        assert d.cmd("RCPT TO:<u@example.org>")[0] == "554"
        assert d.cmd("RCPT TO:<u@notexample.com>")[0] == "554"

    def test_trusted_client_may_relay(self) -> None:
        d = Driver(peer=("127.0.0.1", 5000))
        d.greet()
        d.cmd("MAIL FROM:<a@b.test>")
        assert d.cmd("RCPT TO:<u@anywhere.test>")[0] == "250"

    def test_trusted_ipv6_client(self) -> None:
        d = Driver(peer=("::1", 5000))
        d.greet()
        d.cmd("MAIL FROM:<a@b.test>")
        assert d.cmd("RCPT TO:<u@anywhere.test>")[0] == "250"

    def test_postmaster_always_accepted(self) -> None:
        d = Driver()
        d.greet()
        d.cmd("MAIL FROM:<a@b.test>")
        assert d.cmd("RCPT TO:<Postmaster>")[0] == "250"

    def test_authenticated_client_may_relay(self) -> None:
        d = Driver()
        d.greet()
        d.proto.session.authed = "alice"
        d.cmd("MAIL FROM:<a@b.test>")
        assert d.cmd("RCPT TO:<u@anywhere.test>")[0] == "250"


def test_too_many_recipients() -> None:
    """Past max_recipients: 452 4.5.3, and the accepted ones still get the message."""
    d = Driver(
        policy=Policy(hostname="mx.test", accepted_domains=("example.com",), max_recipients=2)
    )
    d.greet()
    d.cmd("MAIL FROM:<a@b.test>")
    assert d.cmd("RCPT TO:<1@example.com>")[0] == "250"
    assert d.cmd("RCPT TO:<2@example.com>")[0] == "250"
    assert d.cmd("RCPT TO:<3@example.com>") == ("452", "4.5.3 Too many recipients")
    d.cmd("DATA")
    assert d.send(MESSAGE + b".\r\n")[0][0] == "250"
    assert d.bus.messages[0].envelope.recipients == ["1@example.com", "2@example.com"]


class TestData:
    def test_message_reaches_the_bus_exactly(self) -> None:
        """Dot-unstuffed bytes, envelope and session facts reach the bus; 250 2.6.0 with id."""
        d = Driver()
        d.start_data()
        replies = d.send(b"Subject: x\r\n\r\n..leading dot\r\n.\r\n")
        (message,) = d.bus.messages
        assert replies == [("250", f"2.6.0 Message queued as {message.envelope.queue_id}")]
        assert message.data == b"Subject: x\r\n\r\n.leading dot\r\n"
        env = message.envelope
        assert (env.client_ip, env.ehlo_as, env.protocol) == ("192.0.2.1", "client.test", "ESMTP")
        assert env.receiver == "mx.test"

    def test_received_header(self) -> None:
        """Received: names the client, its IP literal, us, the protocol, queue id and rcpt."""
        d = Driver()
        d.start_data()
        d.send(MESSAGE + b".\r\n")
        env = d.bus.messages[0].envelope
        header = env.received_header().decode()
        assert header.startswith("Received: from client.test (unknown [192.0.2.1])\r\n")
        assert "\tby mx.test (slimta_tx)\r\n\twith ESMTP\r\n" in header
        assert f"\tid {env.queue_id}\r\n\tfor <u@example.com>; " in header
        assert header.endswith("+0000\r\n")

    def test_data_with_argument(self) -> None:
        d = Driver()
        d.greet()
        d.codes(b"MAIL FROM:<a@b.test>\r\nRCPT TO:<u@example.com>\r\n")
        assert d.cmd("DATA now") == ("501", "5.5.4 Syntax: DATA")

    def test_too_big_drains_then_refuses_and_session_goes_on(self) -> None:
        """Over the limit: read to the end, then 552 5.3.4; nothing stored; next mail works."""
        d = Driver(
            policy=Policy(
                hostname="mx.test", accepted_domains=("example.com",), max_message_size=100
            )
        )
        d.start_data()
        assert d.send(b"x" * 80 + b"\r\n") == []
        assert d.send(b"y" * 80 + b"\r\n") == []
        assert d.send(b".\r\n") == [("552", "5.3.4 Message too big for system")]
        assert d.bus.messages == []
        assert d.codes(b"MAIL FROM:<a@b.test>\r\nRCPT TO:<u@example.com>\r\nDATA\r\n") == [
            "250",
            "250",
            "354",
        ]
        assert d.codes(b"small\r\n.\r\n") == ["250"]

    def test_bare_lf_rejected_after_the_real_end(self) -> None:
        """Default policy: a bare LF makes the message 550 5.5.2, after its real end only."""
        d = Driver()
        d.start_data()
        assert d.send(b"line one\nline two\r\n.\nMAIL FROM:<x@y.test>\r\n") == []
        assert d.send(b".\r\n") == [
            ("550", "5.5.2 Message contains bare CR or LF; lines must end with CRLF")
        ]
        assert d.bus.messages == []

    def test_bare_lf_normalized(self) -> None:
        """Policy 'normalize': bare LF is stored as CRLF; only CRLF.CRLF ends the data."""
        d = Driver(
            policy=Policy(
                hostname="mx.test", accepted_domains=("example.com",), bare_newline="normalize"
            )
        )
        d.start_data()
        assert d.codes(b"a\nb\n.\nc\r\n.\r\n") == ["250"]
        assert d.bus.messages[0].data == b"a\r\nb\r\n\r\nc\r\n"

    def test_long_line_refused_after_the_end(self) -> None:
        d = Driver()
        d.start_data()
        assert d.codes(b"x" * 1200 + b"\r\n.\r\n") == ["500"]
        assert d.bus.messages == []

    def test_client_drops_mid_data(self) -> None:
        """A connection lost before the final dot stores nothing."""
        d = Driver()
        d.start_data()
        d.send(b"Subject: half\r\n\r\nbody\r\n")
        d.proto.connectionLost(None)
        assert d.bus.messages == []

    def test_bus_reply_is_passed_on(self) -> None:
        """Whatever the bus replies goes to the client as is."""
        d = Driver(bus=RecordingBus(Reply("554", "Content rejected by filter", "5.7.1")))
        d.start_data()
        assert d.send(MESSAGE + b".\r\n") == [("554", "5.7.1 Content rejected by filter")]

    def test_bus_exception_is_451(self) -> None:
        d = Driver(bus=FailingBus(RuntimeError("bus failure (test)")))
        d.start_data()
        assert d.send(MESSAGE + b".\r\n") == [
            ("451", "4.3.0 Temporary local problem, try again later")
        ]
        assert d.cmd("NOOP")[0] == "250"

    def test_bus_returning_nonsense_is_451(self) -> None:
        """A bus must return a Reply; anything else fails closed with 451."""

        class Broken:
            def send(self, envelope: object) -> None:
                return None

        d = Driver(bus=Broken())
        d.start_data()
        assert d.codes(MESSAGE + b".\r\n") == ["451"]

    def test_bus_failures_are_logged(self) -> None:
        """An exception, a failed Deferred and a non-Reply each log a failure and give 451."""

        class Raising:
            def send(self, envelope: object) -> None:
                raise RuntimeError("raised at once")

        class Nonsense:
            def send(self, envelope: object) -> int:
                return 42

        for bus in (Raising(), FailingBus(RuntimeError("failed Deferred")), Nonsense()):
            with captured_events() as events:
                d = Driver(bus=bus)
                d.start_data()
                assert d.codes(MESSAGE + b".\r\n") == ["451"]
                assert d.cmd("NOOP")[0] == "250"
            failures = [e for e in events if "log_failure" in e]
            assert [e["log_format"] for e in failures] == ["{peer}: step failed"], bus

    def test_bus_answering_later(self) -> None:
        """A bus Deferred that fires later: reading waits, then the reply and what follows."""
        from slimta_tx.testing import PendingBus

        bus = PendingBus()
        d = Driver(bus=bus)
        d.start_data()
        assert d.send(MESSAGE + b".\r\nNOOP\r\n") == []
        (_, _, deferred) = bus.pending[0]
        deferred.callback(Reply("250", "Later", "2.6.0"))
        assert d.read() == [("250", "2.6.0 Later"), ("250", "2.0.0 Ok")]

    def test_bus_deferred_waiting_on_another(self) -> None:
        """A fired Deferred whose callback returned an unfired one has no reply yet: the
        session waits for the inner one, then answers."""
        from twisted.internet.defer import Deferred, succeed

        inner: Deferred[Reply] = Deferred()

        class Chained:
            def send(self, envelope: object) -> Deferred[Reply]:
                return succeed(None).addCallback(lambda _: inner)

        d = Driver(bus=Chained())
        d.start_data()
        assert d.send(MESSAGE + b".\r\nNOOP\r\n") == []
        inner.callback(Reply("250", "Inner", "2.6.0"))
        assert d.read() == [("250", "2.6.0 Inner"), ("250", "2.0.0 Ok")]

    def test_transaction_log_line(self) -> None:
        """One info event per transaction, as Logger.info would emit it, with its fields."""
        from twisted.logger import LogLevel, formatEvent

        with captured_events() as events:
            d = Driver()
            d.start_data()
            (_reply,) = d.send(MESSAGE + b".\r\n")
        (event,) = [e for e in events if "queue_id" in e]
        queue_id = d.bus.messages[0].envelope.queue_id
        assert event["log_level"] is LogLevel.info
        assert event["log_namespace"] == "slimta_tx.factory.SmtpEdge"
        assert event["log_source"] is d.edge
        assert event["log_logger"].source is d.edge
        assert isinstance(event["log_time"], float)
        text = formatEvent(event)
        assert text.startswith(
            f"192.0.2.1 helo=client.test from=<a@sender.test> rcpts=1 size={len(MESSAGE)} "
            f"id={queue_id} result=250 2.6.0 "
        ), text
        assert text.endswith("s")

    def test_several_messages_per_connection(self) -> None:
        d = Driver()
        d.greet()
        for i in range(3):
            assert d.codes(b"MAIL FROM:<a@b.test>\r\nRCPT TO:<u@example.com>\r\nDATA\r\n") == [
                "250",
                "250",
                "354",
            ]
            assert d.codes(b"n=%d\r\n.\r\n" % i) == ["250"]
        assert [m.data for m in d.bus.messages] == [b"n=0\r\n", b"n=1\r\n", b"n=2\r\n"]


def test_refused_ehlo_keeps_the_session_as_it_was() -> None:
    """RFC 5321 4.1.4: after a refused EHLO the server stays in its state; the earlier
    greeting and the open transaction survive."""
    d = Driver()
    d.greet()
    d.cmd("MAIL FROM:<a@b.test>")

    def refuse(session: object, reply: Reply, name: str) -> None:
        reply.set("550", "Go away", "5.7.1")

    d.edge.set_validator("EHLO", refuse)
    assert d.cmd("EHLO other.test") == ("550", "5.7.1 Go away")
    assert d.proto.session.ehlo_as == "client.test"
    assert d.proto.session.extended_smtp
    assert d.cmd("RCPT TO:<u@example.com>")[0] == "250"

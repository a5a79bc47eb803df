"""CHUNKING (RFC 3030): BDAT chunks, read exactly, never parsed as commands."""

from __future__ import annotations

import pytest
from smtp_driver import Driver
from twisted.internet.defer import Deferred

from slimta_tx import Policy, Reply

ENVELOPE = b"MAIL FROM:<a@b.test>\r\nRCPT TO:<u@example.com>\r\n"


def bdat(data: bytes, last: bool = False) -> bytes:
    return b"BDAT %d%s\r\n%s" % (len(data), b" LAST" if last else b"", data)


def ready(**policy: object) -> Driver:
    d = Driver(
        policy=Policy(hostname="mx.test", accepted_domains=("example.com",), **policy)  # type: ignore[arg-type]
    )
    d.greet()
    assert d.codes(ENVELOPE) == ["250", "250"]
    return d


def test_one_chunk_is_stored_as_sent() -> None:
    """BDAT LAST ends the message; chunk content is not dot-unstuffed."""
    d = ready()
    body = b"Subject: x\r\n\r\n..two dots stay two\r\n.\r\nthe line above is content\r\n"
    replies = d.send(bdat(body, last=True))
    (message,) = d.bus.messages
    assert replies == [("250", f"2.6.0 Message queued as {message.envelope.queue_id}")]
    assert message.data == body


def test_several_chunks_answered_in_order_in_one_write() -> None:
    """Pipelined chunks: one 250 per chunk, the bus reply for LAST, all in one write."""
    d = ready()
    d.writes.clear()
    replies = d.send(bdat(b"Subject: x\r\n") + bdat(b"\r\nhel") + bdat(b"lo\r\n", last=True))
    assert [r[0] for r in replies] == ["250", "250", "250"]
    assert replies[0] == ("250", "2.0.0 12 octets received")
    assert replies[1] == ("250", "2.0.0 5 octets received")
    assert len(d.writes) == 1
    assert d.bus.messages[0].data == b"Subject: x\r\n\r\nhello\r\n"


def test_chunk_octets_are_never_commands() -> None:
    """A chunk full of SMTP commands is content: nothing in it is answered or executed."""
    d = ready()
    inside = b"QUIT\r\nRSET\r\nMAIL FROM:<evil@x.test>\r\nRCPT TO:<victim@example.com>\r\n"
    replies = d.send(bdat(inside, last=True) + b"NOOP\r\n")
    assert [code for code, _ in replies] == ["250", "250"]
    assert replies[1] == ("250", "2.0.0 Ok")
    assert d.bus.messages[0].data == inside
    assert not d.closed


def test_a_chunk_fed_one_byte_at_a_time() -> None:
    d = ready()
    wire = bdat(b"Subject: y\r\n\r\nbody\r\n", last=True) + b"NOOP\r\n"
    replies = []
    for i in range(len(wire)):
        replies += d.send(wire[i : i + 1])
    assert [code for code, _ in replies] == ["250", "250"]
    assert d.bus.messages[0].data == b"Subject: y\r\n\r\nbody\r\n"


def test_empty_last_chunk_ends_the_message() -> None:
    d = ready()
    assert d.codes(bdat(b"Subject: z\r\n\r\nx\r\n") + b"BDAT 0 LAST\r\n") == ["250", "250"]
    assert d.bus.messages[0].data == b"Subject: z\r\n\r\nx\r\n"


@pytest.mark.parametrize(
    ("before", "expected"),
    [
        (b"", "Send EHLO or HELO first"),
        (b"EHLO c\r\n", "Need MAIL before BDAT"),
        (b"EHLO c\r\nMAIL FROM:<a@b.test>\r\n", "Need RCPT before BDAT (no valid recipients)"),
    ],
)
def test_bdat_out_of_sequence_still_consumes_its_octets(before: bytes, expected: str) -> None:
    """503 5.5.1, and the chunk (here: commands) is read and dropped, never executed."""
    d = Driver()
    for line in before.splitlines(keepends=True):
        d.send(line)  # one at a time: a client waits for the reply to EHLO
    replies = d.send(bdat(b"QUIT\r\n") + b"NOOP\r\n")
    assert replies == [("503", f"5.5.1 {expected}"), ("250", "2.0.0 Ok")]
    assert not d.closed


def test_data_and_rcpt_are_refused_after_bdat() -> None:
    """RFC 3030: DATA after BDAT in one transaction is 503; so is RCPT."""
    d = ready()
    assert d.codes(bdat(b"part\r\n")) == ["250"]
    assert d.cmd("DATA") == ("503", "5.5.1 DATA not allowed after BDAT")
    assert d.cmd("RCPT TO:<v@example.com>") == ("503", "5.5.1 RCPT not allowed after BDAT")
    assert d.codes(bdat(b"rest\r\n", last=True)) == ["250"]
    assert d.bus.messages[0].data == b"part\r\nrest\r\n"
    assert d.bus.messages[0].envelope.recipients == ["u@example.com"]


def test_rset_abandons_a_chunked_message() -> None:
    d = ready()
    d.send(bdat(b"part one\r\n"))
    assert d.cmd("RSET")[0] == "250"
    assert d.codes(b"BDAT 5 LAST\r\nabcde") == ["503"]
    assert d.codes(ENVELOPE + bdat(b"fresh\r\n", last=True)) == ["250", "250", "250"]
    assert [m.data for m in d.bus.messages] == [b"fresh\r\n"]


def test_too_big_is_refused_at_the_chunk_and_ends_the_transaction() -> None:
    """Past the size limit: 552 5.3.4 at that chunk; later chunks are read and get 503."""
    d = ready(max_message_size=100)
    assert d.codes(bdat(b"x" * 60 + b"\r\n")) == ["250"]
    assert d.send(bdat(b"y" * 60 + b"\r\n")) == [("552", "5.3.4 Message too big for system")]
    assert d.codes(bdat(b"z\r\n", last=True) + b"NOOP\r\n") == ["503", "250"]
    assert d.bus.messages == []


def test_bare_lf_in_a_chunk_is_refused_at_last() -> None:
    """The DATA rules apply: a bare LF (a possible fake end for a DATA next hop) is 550."""
    d = ready()
    assert d.codes(bdat(b"a\n.\nMAIL FROM:<x@y.test>\r\n")) == ["250"]
    assert d.send(bdat(b"end\r\n", last=True)) == [
        ("550", "5.5.2 Message contains bare CR or LF; lines must end with CRLF")
    ]
    assert d.bus.messages == []


def test_bad_bdat_syntax_closes_to_stay_in_step() -> None:
    """With no parsable size the octets cannot be skipped: 421 and close."""
    for argument in (b"", b" abc", b" 10 NOW", b" -5"):
        d = ready()
        replies = d.send(b"BDAT" + argument + b"\r\nQUIT\r\n")
        assert [code for code, _ in replies] == ["421"]
        assert d.closed


def test_data_validator_decides_the_first_chunk() -> None:
    """The DATA validator runs before the first chunk is taken (here asynchronously)."""
    d = ready()
    pending: list[tuple[Reply, Deferred[None]]] = []

    def later(session: object, reply: Reply) -> Deferred[None]:
        waiting: Deferred[None] = Deferred()
        pending.append((reply, waiting))
        return waiting

    d.edge.set_validator("DATA", later)
    assert d.send(bdat(b"QUIT\r\n", last=True) + b"NOOP\r\n") == []
    reply, waiting = pending.pop()
    reply.set("554", "No mail from you today", "5.7.1")
    waiting.callback(None)
    assert d.read() == [("554", "5.7.1 No mail from you today"), ("250", "2.0.0 Ok")]
    assert d.bus.messages == []


def test_connection_lost_mid_chunk_stores_nothing() -> None:
    d = ready()
    d.send(b"BDAT 100 LAST\r\nonly part of it")
    d.proto.connectionLost(None)
    assert d.bus.messages == []


def test_silence_mid_chunk_times_out() -> None:
    d = ready(data_timeout=30)
    d.send(b"BDAT 100 LAST\r\npartial")
    d.clock.advance(31)
    assert d.read()[0][0] == "421"
    assert d.closed


def test_chunking_switched_off() -> None:
    """Not advertised; a BDAT anyway gets 502 and its octets are still dropped."""
    d = Driver(
        policy=Policy(hostname="mx.test", accepted_domains=("example.com",), chunking=False)
    )
    assert "CHUNKING" not in d.cmd("EHLO c")[1].split("\n")
    d.codes(ENVELOPE)
    assert d.send(bdat(b"QUIT\r\n", last=True) + b"NOOP\r\n") == [
        ("502", "5.5.1 Command not implemented"),
        ("250", "2.0.0 Ok"),
    ]


@pytest.mark.parametrize(
    ("line", "code"),
    [
        (b"a" * 998 + b"\r\n", "250"),  # 1000 octets with CRLF: the longest line
        (b"a" * 999 + b"\r\n", "500"),
        (b"." + b"a" * 997 + b"\r\n", "250"),  # no stuffing in BDAT: the dot is content
        (b"." + b"a" * 998 + b"\r\n", "500"),
        (b"a" * 998, "250"),  # a last line without CRLF counts the CRLF a next hop adds
        (b"a" * 999, "500"),
    ],
)
def test_line_limit_in_bdat_is_on_the_line_as_sent(line: bytes, code: str) -> None:
    """BDAT content is stored as sent, so the 1000-octet limit (RFC 5321 4.5.3.1.6, CRLF
    included) is on the line as sent; cut anywhere across chunks it is the same verdict."""
    body = b"Subject: x\r\n\r\n" + line
    for cut in (0, 1, len(body) // 2, len(body) - 2, len(body) - 1):
        d = ready()
        first, second = body[:cut], body[cut:]
        replies = d.send((bdat(first) if first else b"") + bdat(second, last=True))
        assert replies[-1][0] == code, (cut, replies)
        if code == "500":
            assert replies[-1] == ("500", "5.5.6 Line too long in message")
        else:
            assert d.bus.messages[0].data == body

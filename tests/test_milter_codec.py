"""The milter wire format, sans I/O: packets, negotiation, responses, the milter's own reply,
the message's header section and the edits milters ask for."""

from __future__ import annotations

import struct

import pytest

from slimta_tx.milter import codec, parse_milter
from slimta_tx.milter.codec import (
    PacketReader,
    ProtocolError,
    Response,
    parse_optneg,
    parse_response,
)
from slimta_tx.milter.config import Milter
from slimta_tx.milter.message import BodyWriter, Edits, HeadTooBig, read_head, rewrite, split_field
from slimta_tx.spool import Spool
from tests.support.milter_server import change_header, insert_header, resp, z


def spool_of(data: bytes) -> Spool:
    spool = Spool(memory_limit=64)
    spool.write(data)
    return spool


def test_packets_are_length_command_data() -> None:
    """Every packet: a 32-bit big-endian length (command byte included), command, data."""
    assert codec.packet(b"Q") == b"\x00\x00\x00\x01Q"
    assert codec.helo_packet("client.test") == b"\x00\x00\x00\x0dHclient.test\x00"
    assert codec.optneg_packet() == b"\x00\x00\x00\x0dO" + struct.pack(">III", 6, 0x1FF, 0x1FFFFF)


def test_connect_packet_carries_family_port_and_address() -> None:
    """CONNECT: host name, family '4'/'6', port in network order, address."""
    packet = codec.connect_packet("[192.0.2.1]", b"4", 40000, "192.0.2.1")
    assert packet[4:] == b"C[192.0.2.1]\x004" + struct.pack(">H", 40000) + b"192.0.2.1\x00"
    assert codec.connect_packet("x", b"U", 0, "")[4:] == b"Cx\x00U"


def test_macro_packet_names_its_event() -> None:
    """Macros: 'D', the event's command byte, then name/value pairs; a NUL cannot end a
    value early (replaced)."""
    packet = codec.macro_packet(b"M", [("{mail_addr}", "a@b.test"), ("i", "Q\0ID")])
    assert packet[4:] == b"DM{mail_addr}\x00a@b.test\x00i\x00Q?ID\x00"


def test_reader_splits_packets_across_reads() -> None:
    """Packets cut anywhere are put back together; several in one read come out in order."""
    reader = PacketReader()
    stream = resp(b"c") + resp(b"h", z("X-A", "1")) + resp(b"a")
    out = []
    for i in range(len(stream)):
        out += reader.feed(stream[i : i + 1])
    assert out == [(b"c", b""), (b"h", b"X-A\x001\x00"), (b"a", b"")]
    assert reader.buffered == 0


def test_reader_keeps_a_partial_packet_after_whole_ones() -> None:
    """Whole packets and the start of the next in one read; a big packet in many pieces."""
    reader = PacketReader()
    big = resp(b"b", b"x" * 200_000)
    assert reader.feed(resp(b"c") + resp(b"a") + big[:10]) == [(b"c", b""), (b"a", b"")]
    out = []
    for i in range(10, len(big), 4096):
        out += reader.feed(big[i : i + 4096] + (resp(b"t") if i + 4096 >= len(big) else b""))
    assert out == [(b"b", b"x" * 200_000), (b"t", b"")]
    assert reader.buffered == 0


def test_simple_responses_and_macro_data() -> None:
    """A continue is a continue each time; macro values are NUL-terminated, NULs replaced."""
    assert parse_response(b"c", b"") == parse_response(b"c", b"") == Response("continue")
    with pytest.raises(ProtocolError):
        parse_response(b"c", b"x")
    assert codec.macro_data([("j", "mx"), ("{a\0}", "\0é")]) == "j\0mx\0{a?}\0?é\0".encode()


@pytest.mark.parametrize("length", [0, codec.MAX_PACKET + 1, 0xFFFFFFFF])
def test_reader_refuses_bad_lengths_before_buffering(length: int) -> None:
    """A zero or oversized length fails at once (nothing waits to buffer gigabytes)."""
    with pytest.raises(ProtocolError):
        PacketReader().feed(struct.pack(">I", length) + b"c")


def test_negotiation_reply_with_macro_lists() -> None:
    """The milter's version, actions and flags, and its own macro lists per stage."""
    data = struct.pack(">III", 6, 0x21, 0x80 | 0x400000)
    data += struct.pack(">I", 2) + z("{auth_authen} i")
    data += struct.pack(">I", 99) + z("ignored")
    negotiated = parse_optneg(b"O", data)
    assert (negotiated.version, negotiated.actions) == (6, 0x21)
    assert negotiated.protocol == 0x80  # bits nobody offered are dropped
    assert negotiated.macros == {b"M": ("{auth_authen}", "i")}


@pytest.mark.parametrize(
    ("command", "data", "why"),
    [
        (b"c", struct.pack(">III", 6, 0, 0), "expected the negotiation reply"),
        (b"O", b"\0\0\0\6", "need 12"),
        (b"O", struct.pack(">III", 7, 0, 0), "protocol version 7"),
        (b"O", struct.pack(">III", 1, 0, 0), "protocol version 1"),
        (b"O", struct.pack(">III", 6, 0x400, 0), "more than offered"),
        (b"O", struct.pack(">III", 6, 0, 0) + b"\0\0\0\1abc", "NUL"),
    ],
)
def test_negotiation_refusals(command: bytes, data: bytes, why: str) -> None:
    """A milter that cannot be used says so at the negotiation (as Postfix checks)."""
    with pytest.raises(ProtocolError, match=why):
        parse_optneg(command, data)


def test_responses_decode() -> None:
    """Each response kind, with its data."""
    assert parse_response(b"c", b"").kind == "continue"
    assert parse_response(b"p", b"").kind == "progress"
    header = parse_response(*_split(insert_header(0, "X-Spam", "yes")))
    assert (header.kind, header.index, header.name, header.value) == (
        "insert_header",
        0,
        b"X-Spam",
        b"yes",
    )
    changed = parse_response(*_split(change_header(2, "Subject", "")))
    assert (changed.kind, changed.index, changed.value) == ("change_header", 2, b"")
    rcpt = parse_response(b"2", z("<x@y.test>", "NOTIFY=NEVER ORCPT=rfc822;x@y.test"))
    assert (rcpt.kind, rcpt.address, rcpt.args) == (
        "add_rcpt",
        "<x@y.test>",
        ("NOTIFY=NEVER", "ORCPT=rfc822;x@y.test"),
    )
    assert parse_response(b"e", z("<new@s.test>")).args == ()
    assert parse_response(b"q", z("virus")).text == "virus"
    assert parse_response(b"b", b"\0raw\r\n").data == b"\0raw\r\n"


@pytest.mark.parametrize(
    ("command", "data"),
    [
        (b"c", b"x"),  # data after a simple response
        (b"h", b"X-A\0no-terminator"),
        (b"h", z("X-A", "1") + b"extra"),
        (b"i", b"\0\0"),  # no index
        (b"y", z("250 2.0.0 not a refusal")),
        (b"Z", b""),
    ],
)
def test_malformed_responses(command: bytes, data: bytes) -> None:
    with pytest.raises(ProtocolError):
        parse_response(command, data)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("550 5.7.1 Spam", ("550", "Spam", "5.7.1")),
        ("451 Try later", ("451", "Try later", None)),
        ("550-5.7.1 Line one\r\n550 5.7.1 Line two", ("550", "Line one\nLine two", "5.7.1")),
        ("554 5.7.1 100%% spam", ("554", "100% spam", "5.7.1")),
    ],
)
def test_milter_replies_that_pass(text: str, expected: tuple[str, str, str | None]) -> None:
    """The milter's own reply reaches the client: code, enhanced code, text, multi-line."""
    reply = codec.parse_reply_text(text.encode())
    assert reply is not None
    assert (reply.code, reply.message, reply.enhanced_status_code) == expected


@pytest.mark.parametrize(
    "text",
    [
        "250 2.0.0 ok",  # not a refusal
        "550",  # no separator
        "55O bad",
        "550 4.7.1 class mismatch",
        "550-one\r\n451 two",  # codes differ
        "550-one\n550 two",  # bare LF
        "550 one\r\n550 two",  # first line says it is the last
        "550 5.7 short",
    ],
)
def test_milter_replies_that_fail_the_sanity_check(text: str) -> None:
    assert codec.parse_reply_text(text.encode()) is None


def _split(packet: bytes) -> tuple[bytes, bytes]:
    return packet[4:5], packet[5:]


# -- the message: header section, edits, rewrite ---------------------------------------------


MESSAGE = (
    b"Received: from a\r\n\tby b\r\n"
    b"From: Alice <a@example.com>\r\n"
    b"Subject: one\r\n"
    b"subject: two\r\n"
    b"\r\n"
    b"body line\r\n"
)


def test_head_splits_fields_and_finds_the_body() -> None:
    """Folded fields stay one field; the blank line is neither header nor body."""
    head = read_head(spool_of(MESSAGE))
    assert head.fields[0] == b"Received: from a\r\n\tby b\r\n"
    assert len(head.fields) == 4 and head.separator
    assert MESSAGE[head.body_offset :] == b"body line\r\n"
    assert split_field(head.fields[0], leading_space=False) == (b"Received", b"from a\n\tby b")
    assert split_field(head.fields[1], leading_space=True) == (b"From", b" Alice <a@example.com>")


def test_head_without_blank_line_or_with_a_non_header_line() -> None:
    head = read_head(spool_of(b"Subject: x\r\n"))
    assert head.fields == [b"Subject: x\r\n"] and not head.separator
    head = read_head(spool_of(b"Subject: x\r\nnot a header\r\nmore\r\n"))
    assert head.fields == [b"Subject: x\r\n"] and head.body_offset == 12


def test_head_limits() -> None:
    """Over 1 MiB of header section or 10,000 fields: refused, not held in memory."""
    with pytest.raises(HeadTooBig):
        read_head(spool_of(b"X: " + b"a" * 2000 + b"\r\n\r\n"), max_size=1000)
    with pytest.raises(HeadTooBig):
        read_head(spool_of(b"X: 1\r\n" * 11 + b"\r\n"), max_fields=10)


def test_edits_follow_sendmail_index_rules() -> None:
    """insert 0 is the top; change N is the Nth field of that name (0 counts as 1), an empty
    value deletes, a missing field is added at the end."""
    head = read_head(spool_of(MESSAGE))
    edits = Edits(list(head.fields), leading_space=False)
    edits.insert(0, b"DKIM-Signature", b"v=1;\n\tb=abc")
    edits.change(2, b"Subject", b"")  # the second Subject (any case) goes
    edits.change(0, b"SUBJECT", b"new")
    edits.change(1, b"X-Missing", b"added")
    edits.add(b"X-Spam", b"no")
    edits.insert(99, b"X-Last", b"z")
    assert edits.fields == [
        b"DKIM-Signature: v=1;\r\n\tb=abc\r\n",
        b"Received: from a\r\n\tby b\r\n",
        b"From: Alice <a@example.com>\r\n",
        b"SUBJECT: new\r\n",
        b"X-Missing: added\r\n",
        b"X-Spam: no\r\n",
        b"X-Last: z\r\n",
    ]
    with pytest.raises(ProtocolError):
        edits.add(b"Bad Name", b"x")


def test_rewrite_with_a_replaced_body() -> None:
    """The edited fields, the blank line, then the new body; bare LF becomes CRLF, across
    chunk boundaries too, and the last line gets its CRLF."""
    original = spool_of(MESSAGE)
    head = read_head(original)
    body = BodyWriter(Spool())
    for piece in (b"new\r", b"\nline\nlast"):
        body.write(piece)
    target = Spool()
    written = rewrite(target, head, body.finish(), original)
    assert target.read() == MESSAGE[: head.body_offset] + b"new\r\nline\r\nlast\r\n"
    assert target.read()[written.body_offset :] == b"new\r\nline\r\nlast\r\n"


def test_body_writer_limit() -> None:
    writer = BodyWriter(Spool(), max_size=10)
    with pytest.raises(ProtocolError):
        writer.write(b"x" * 11)


# -- the --milter syntax ----------------------------------------------------------------------


def test_milter_spec_forms() -> None:
    """Plain, with settings, and Postfix's braces; times with units."""
    assert parse_milter("inet:127.0.0.1:11332") == Milter("inet:127.0.0.1:11332")
    milter = parse_milter(
        "{ inet:[::1]:8891, connect_timeout=5s, command_timeout=1m, content_timeout=2.5,"
        " default_action=accept, max_connections=7, name=dkim }"
    )
    assert milter.address == ("inet", "::1", 8891)
    assert (milter.connect_timeout, milter.command_timeout, milter.content_timeout) == (
        5.0,
        60.0,
        2.5,
    )
    assert (milter.default_action, milter.max_connections, milter.name) == ("accept", 7, "dkim")
    assert parse_milter("unix:/run/x.sock,default_action=reject").address == (
        "unix",
        "/run/x.sock",
        0,
    )


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("tcp:1.2.3.4:5", "inet:HOST:PORT or unix:PATH"),
        ("inet:1.2.3.4", "needs a host and a port"),
        ("inet:host:0", "needs a host and a port"),
        ("unix:", "needs a path"),
        ("inet:h:1,default_action=maybe", "tempfail, accept or reject"),
        ("inet:h:1,command_timeout=soon", "takes seconds"),
        ("inet:h:1,command_timeout=0", "more than 0"),
        ("inet:h:1,max_connections=0", "at least 1"),
        ("inet:h:1,colour=blue", "unknown milter setting"),
        ("inet:h:1,timeout", "NAME=VALUE"),
        ("{ inet:h:1", "unbalanced"),
    ],
)
def test_milter_spec_errors(text: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        parse_milter(text)

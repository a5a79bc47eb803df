"""The relay bus's SMTP client: reply parsing, dot-stuffing, pipelined writes, timeouts."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from slimta_tx.bus.smtp_client import (
    DotStuffer,
    Extensions,
    NextHopClosed,
    NextHopProtocolError,
    NextHopTimeout,
    ReplyParser,
    SmtpClientProtocol,
)
from slimta_tx.data import DataDecoder, DataResult


def test_reply_parser_splits_multiline_and_enhanced_codes() -> None:
    """A multi-line reply arriving in pieces becomes one Reply; the x.y.z goes to its field."""
    parser = ReplyParser()
    assert parser.feed(b"250-2.1.0 first\r\n250 2.1") == []
    (reply,) = parser.feed(b".0 second\r\n")
    assert (reply.code, reply.enhanced_status_code) == ("250", "2.1.0")
    assert reply.message == "first\nsecond"


def test_reply_parser_keeps_text_without_enhanced_code() -> None:
    """A reply with no enhanced code keeps its text whole and has no code of its own."""
    (reply,) = ReplyParser().feed(b"220 nexthop.test ESMTP ready\r\n")
    assert reply.enhanced_status_code is None
    assert reply.message == "nexthop.test ESMTP ready"


@pytest.mark.parametrize(
    "wire", [b"hello\r\n", b"250-a\r\n251 b\r\n", b"2" * 5000, b"250 ok\r\n!!\r\n"]
)
def test_reply_parser_refuses_garbage(wire: bytes) -> None:
    """Non-replies, a code change inside a reply and endless lines are protocol errors."""
    with pytest.raises(NextHopProtocolError):
        ReplyParser().feed(wire)


def test_extensions_from_ehlo_reply() -> None:
    """EHLO keywords and their parameters: SIZE limit and AUTH mechanisms are read."""
    (reply,) = ReplyParser().feed(
        b"250-nexthop.test\r\n250-PIPELINING\r\n250-SIZE 1000\r\n250-AUTH PLAIN login\r\n"
        b"250 8BITMIME\r\n"
    )
    ext = Extensions.parse(reply)
    assert "pipelining" in ext and "8BITMIME" in ext and "SMTPUTF8" not in ext
    assert ext.max_size == 1000
    assert ext.auth_mechanisms == {"PLAIN", "LOGIN"}
    assert Extensions.parse(ReplyParser().feed(b"250-x\r\n250 SIZE 0\r\n")[0]).max_size is None


def _stuff(chunks: list[bytes]) -> bytes:
    stuffer = DotStuffer()
    return b"".join(stuffer.encode(c) for c in chunks) + stuffer.finish()


def test_dot_stuffing_across_chunk_boundaries() -> None:
    """Dots at line starts are doubled even when a chunk ends right before the dot."""
    assert _stuff([b".a\r\n", b".b\r\n.", b"\r\n"]) == b"..a\r\n..b\r\n..\r\n.\r\n"


def test_dot_stuffing_adds_missing_final_crlf() -> None:
    """A body not ending in CRLF gets one before the terminating dot; empty body: just '.'."""
    assert _stuff([b"no newline"]) == b"no newline\r\n.\r\n"
    assert _stuff([]) == b".\r\n"


@given(st.lists(st.sampled_from([b"a", b".", b"\r\n", b"..", b"x.y", b"\r\n.\r\n"]), max_size=30))
def test_dot_stuffing_round_trips_through_our_decoder(parts: list[bytes]) -> None:
    """Whatever CRLF body goes in, the server-side decoder gets exactly it back."""
    body = b"".join(parts)
    if body and not body.endswith(b"\r\n"):
        body += b"\r\n"
    out = bytearray()
    decoder = DataDecoder(out.extend)
    wire = _stuff([body[i : i + 3] for i in range(0, len(body), 3)])
    assert decoder.feed(wire) == b""
    assert decoder.result is DataResult.OK
    assert bytes(out) == body


def _client(timeout: float = 5.0) -> tuple[SmtpClientProtocol, StringTransport, Clock]:
    clock = Clock()
    client = SmtpClientProtocol(clock, timeout)
    transport = StringTransport()
    client.makeConnection(transport)
    return client, transport, clock


def test_pipelined_group_is_one_write_and_replies_come_in_order() -> None:
    """MAIL, RCPT, DATA go out in one write; each Deferred gets its own reply."""
    client, transport, _ = _client()
    writes: list[bytes] = []
    transport.write = writes.append  # type: ignore[method-assign]
    ds = client.send_lines([b"MAIL FROM:<a@x>", b"RCPT TO:<b@y>", b"DATA"])
    assert writes == [b"MAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nDATA\r\n"]
    client.dataReceived(b"250 2.1.0 ok\r\n550 5.1.1 no\r\n354 go\r\n")
    codes = [d.result.code for d in ds]  # type: ignore[attr-defined]
    assert codes == ["250", "550", "354"]


def test_silence_times_out_and_fails_every_waiter() -> None:
    """No reply within the timeout: every waiter fails with NextHopTimeout, connection aborted."""
    client, transport, clock = _client(timeout=5.0)
    ds = client.send_lines([b"MAIL FROM:<a@x>", b"RCPT TO:<b@y>"])
    clock.advance(4.9)
    client.dataReceived(b"250 ok\r\n")  # progress restarts the timer
    clock.advance(4.9)
    assert not ds[1].called
    clock.advance(0.2)
    ds[1].addErrback(lambda f: f.trap(NextHopTimeout))
    assert ds[0].result.code == "250"  # type: ignore[attr-defined]
    assert transport.disconnecting


def test_no_timer_while_idle() -> None:
    """An idle pooled connection has no pending timeout (the pool's idle timer handles it)."""
    client, _, clock = _client()
    d = client.command(b"NOOP")
    client.dataReceived(b"250 ok\r\n")
    assert d.called
    assert clock.getDelayedCalls() == []


def test_lost_connection_fails_waiters() -> None:
    """A lost connection fails what was waiting and anything asked afterwards."""
    client, _, _ = _client()
    d = client.command(b"NOOP")
    client.connectionLost(None)
    failures: list[object] = []
    d.addErrback(failures.append)
    client.expect().addErrback(failures.append)
    assert len(failures) == 2
    assert all(f.check(NextHopClosed) for f in failures)  # type: ignore[attr-defined]


def test_body_streams_as_transport_pulls() -> None:
    """The body goes out in writes of about 64 KiB, one per pull, dot-stuffed, then the dot."""
    client, transport, _ = _client()
    pulled: list[int] = []
    piece = b".x" + b"y" * (40 * 1024 - 4) + b"\r\n"

    def chunks():
        for i in range(3):
            pulled.append(i)
            yield piece

    done = client.send_body(chunks())
    # StringTransport pulls from a non-streaming producer only when asked.
    producer = transport.producer
    assert producer is not None and pulled == []
    producer.resumeProducing()
    assert pulled == [0, 1] and not done.called
    producer.resumeProducing()
    assert pulled == [0, 1, 2] and done.called
    assert transport.value() == (b"." + piece) * 3 + b".\r\n"
    assert transport.producer is None

"""A small pipelining ESMTP/LMTP client: what the relay bus speaks to its next hop.

Twisted's own SMTP client sends one command at a time and has no per-recipient LMTP replies,
so this is a fresh one, in layers:

- :class:`ReplyParser` (sans-I/O): wire bytes -> :class:`~slimta_tx.reply.Reply` objects, the
  enhanced status code split off;
- :class:`Extensions`: the EHLO/LHLO keywords and their parameters;
- :class:`DotStuffer` (sans-I/O): message bytes -> DATA bytes, chunk by chunk, with the
  terminating ``CRLF . CRLF``;
- :class:`SmtpClientProtocol`: writes command lines (a pipelined group in one ``write``), hands
  replies to waiters in order, streams a body from an iterator of chunks as the transport asks
  for more (so a large message never sits in memory), and fails every waiter on a timeout or a
  lost connection.

The sequencing of a transaction (which commands, what the replies mean) lives in
:mod:`slimta_tx.bus.relay`.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, cast

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import (
    IConsumer,
    IDelayedCall,
    IPullProducer,
    IReactorTime,
    ITCPTransport,
)
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from slimta_tx.reply import Reply

__all__ = [
    "DotStuffer",
    "Extensions",
    "NextHopClosed",
    "NextHopError",
    "NextHopProtocolError",
    "NextHopTimeout",
    "ReplyParser",
    "SmtpClientProtocol",
]

MAX_REPLY_LINE = 4096
WRITE_SIZE = 64 * 1024  # the body goes out in writes of about this size
MAX_REPLY_LINES = 200
_REPLY_LINE = re.compile(rb"^([2-5][0-9][0-9])([ -]|$)(.*)$", re.DOTALL)
_ESC = re.compile(r"^([245]\.\d{1,3}\.\d{1,3})(?:\s+|$)")


class NextHopError(Exception):
    """The conversation with the next hop failed (not a reply from it)."""


class NextHopTimeout(NextHopError):
    """The next hop did not answer (or read) within the timeout."""


class NextHopClosed(NextHopError):
    """The connection to the next hop was lost."""


class NextHopProtocolError(NextHopError):
    """The next hop sent something that is not an SMTP reply."""


class ReplyParser:
    """Incremental reply parser: ``feed(bytes)`` returns the replies completed so far."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._code: bytes | None = None
        self._lines: list[str] = []

    def feed(self, data: bytes) -> list[Reply]:
        self._buffer += data
        replies: list[Reply] = []
        while True:
            end = self._buffer.find(b"\n")
            if end < 0:
                if len(self._buffer) > MAX_REPLY_LINE:
                    raise NextHopProtocolError("reply line too long")
                return replies
            raw = bytes(self._buffer[:end]).rstrip(b"\r")
            del self._buffer[: end + 1]
            reply = self._line(raw)
            if reply is not None:
                replies.append(reply)

    def _line(self, raw: bytes) -> Reply | None:
        match = _REPLY_LINE.match(raw)
        if match is None:
            raise NextHopProtocolError(f"not an SMTP reply: {raw[:80]!r}")
        code, sep, text = match.groups()
        if self._code is not None and code != self._code:
            raise NextHopProtocolError("reply code changed inside a multi-line reply")
        self._code = code
        self._lines.append(text.decode("utf-8", "replace"))
        if len(self._lines) > MAX_REPLY_LINES:
            raise NextHopProtocolError("reply has too many lines")
        if sep == b"-":
            return None
        lines, self._lines, self._code = self._lines, [], None
        return make_reply(code.decode("ascii"), lines)


def make_reply(code: str, lines: list[str]) -> Reply:
    """A :class:`Reply` from raw reply lines, the enhanced status code split off each line."""
    esc: str | None = None
    first = _ESC.match(lines[0])
    if first is not None and first.group(1)[0] == code[0]:
        esc = first.group(1)
        lines = [line[len(esc) :].lstrip() if line.startswith(esc) else line for line in lines]
    return Reply(code, "\n".join(lines), esc)


@dataclass
class Extensions:
    """What the next hop said it supports, from its EHLO/LHLO reply."""

    keywords: dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, reply: Reply) -> Extensions:
        keywords: dict[str, str] = {}
        for line in reply.message.split("\n")[1:]:
            word, _, params = line.strip().partition(" ")
            if word:
                keywords[word.upper()] = params.strip()
        return cls(keywords)

    def __contains__(self, keyword: str) -> bool:
        return keyword.upper() in self.keywords

    @property
    def max_size(self) -> int | None:
        """The SIZE limit (RFC 1870), or None when absent or 0 (no limit)."""
        if "SIZE" not in self.keywords:
            return None
        try:
            size = int(self.keywords["SIZE"] or "0")
        except ValueError:
            return None
        return size or None

    @property
    def auth_mechanisms(self) -> set[str]:
        if "AUTH" in self.keywords:
            return set(self.keywords["AUTH"].upper().split())
        return set()


class DotStuffer:
    """Message bytes -> DATA bytes (RFC 5321 4.5.2), one chunk at a time.

    A dot is doubled at the start of every line; a line starts after any LF (the spool holds
    CRLF lines, but stuffing after a bare LF too costs nothing and leaves no way to smuggle an
    end of data past a lenient next hop). :meth:`finish` adds the missing CRLF, if any, and the
    terminating ``.`` line.
    """

    def __init__(self) -> None:
        self._line_start = True
        self._tail = b""

    def encode(self, chunk: bytes) -> bytes:
        if not chunk:
            return b""
        out = chunk.replace(b"\n.", b"\n..")
        if self._line_start and chunk[:1] == b".":
            out = b"." + out
        self._line_start = chunk.endswith(b"\n")
        self._tail = (self._tail + chunk)[-2:]
        return out

    def finish(self) -> bytes:
        if self._tail in (b"", b"\r\n"):
            return b".\r\n"
        return b"\r\n.\r\n"


class _Verbatim:
    """A :class:`DotStuffer` that changes nothing and adds nothing (BDAT)."""

    def encode(self, chunk: bytes) -> bytes:
        return chunk

    def finish(self) -> bytes:
        return b""


@implementer(IPullProducer)
class _BodyProducer:
    """Writes the next chunk each time the transport's buffer has room (pull producer)."""

    def __init__(
        self, client: SmtpClientProtocol, chunks: Iterator[bytes], stuff: bool = True
    ) -> None:
        self.client = client
        self.chunks = chunks
        # BDAT content goes as it is (RFC 3030): no stuffing, no end marker.
        self.stuffer: DotStuffer | _Verbatim = DotStuffer() if stuff else _Verbatim()
        self.done: Deferred[None] = Deferred()

    def resumeProducing(self) -> None:
        if self.done.called:
            return
        transport = self.client.transport
        assert transport is not None
        # Small pieces (the Received: header, a small message, the final dot) are joined into
        # one write: one system call for a typical message instead of one per piece.
        out: list[bytes] = []
        size = 0
        finished = False
        try:
            while size < WRITE_SIZE:
                chunk = next(self.chunks, None)
                if chunk is None:
                    out.append(self.stuffer.finish())
                    finished = True
                    break
                out.append(self.stuffer.encode(chunk))
                size += len(out[-1])
        except Exception:
            self._end(Failure())
            return
        self.client.touch()
        transport.write(b"".join(out))
        if finished:
            self._end(None)

    def stopProducing(self) -> None:
        self._end(Failure(NextHopClosed("connection lost while sending the message")))

    def _end(self, failure: Failure | None) -> None:
        if self.done.called:
            return
        transport = self.client.transport
        if transport is not None and self.client.producer is self:
            cast(IConsumer, transport).unregisterProducer()
        self.client.producer = None
        self.client.touch()
        if failure is None:
            self.done.callback(None)
        else:
            self.done.errback(failure)


class SmtpClientProtocol(Protocol):
    """One connection to the next hop. Replies go to waiters in the order they were asked.

    :param clock: an ``IReactorTime`` provider; usually the reactor, when not testing.
    :param timeout: seconds of silence allowed while a reply is awaited or a body is being
        sent; then the connection is aborted and every waiter fails with
        :class:`NextHopTimeout`.
    """

    def __init__(self, clock: IReactorTime, timeout: float) -> None:
        self.clock = clock
        self.timeout = timeout
        self.parser = ReplyParser()
        self.producer: _BodyProducer | None = None
        self.closed = False
        self.tls = False
        self._waiters: deque[Deferred[Reply]] = deque()
        self._unclaimed: deque[Reply] = deque()
        self._failure: Failure | None = None
        self._timer: IDelayedCall | None = None
        self.lost: Deferred[None] = Deferred()

    # -- transport events -------------------------------------------------------------------

    def connectionMade(self) -> None:
        if ITCPTransport.providedBy(self.transport):
            self.transport.setTcpNoDelay(True)

    def dataReceived(self, data: bytes) -> None:
        try:
            replies = self.parser.feed(data)
        except NextHopProtocolError:
            self._fail(Failure())
            self.abort()
            return
        for reply in replies:
            if self._waiters:
                self._waiters.popleft().callback(reply)
            else:
                self._unclaimed.append(reply)
        self.touch()

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.closed = True
        why = reason.getErrorMessage() if reason is not None else "closed"
        self._fail(Failure(NextHopClosed(f"connection to the next hop lost: {why}")))
        if not self.lost.called:
            self.lost.callback(None)

    # -- commands ----------------------------------------------------------------------------

    def expect(self) -> Deferred[Reply]:
        """The next reply not yet claimed."""
        if self._unclaimed:
            return succeed(self._unclaimed.popleft())
        if self._failure is not None:
            return fail(self._failure)
        d: Deferred[Reply] = Deferred()
        self._waiters.append(d)
        self.touch()
        return d

    def send_lines(self, lines: Iterable[bytes]) -> list[Deferred[Reply]]:
        """Write command lines in one ``write``; one reply Deferred per line, in order."""
        lines = list(lines)
        if self._failure is not None:
            return [fail(self._failure) for _ in lines]
        assert self.transport is not None
        self.transport.write(b"".join(line + b"\r\n" for line in lines))
        return [self.expect() for _ in lines]

    def command(self, line: bytes) -> Deferred[Reply]:
        return self.send_lines([line])[0]

    def send_body(self, chunks: Iterable[bytes]) -> Deferred[None]:
        """Stream ``chunks`` dot-stuffed, then ``CRLF . CRLF``; fires when all is written."""
        if self._failure is not None:
            return fail(self._failure)
        assert self.transport is not None
        producer = self.producer = _BodyProducer(self, iter(chunks))
        # A real transport pulls at once: a small body may be all written before this returns.
        cast(IConsumer, self.transport).registerProducer(producer, False)
        return producer.done

    def send_bdat(self, chunks: Iterable[bytes], size: int) -> Deferred[None]:
        """``BDAT <size> LAST`` and the ``size`` octets of ``chunks`` as they are (RFC 3030);
        fires when all is written (the reply comes as usual, through :meth:`expect`)."""
        if self._failure is not None:
            return fail(self._failure)
        assert self.transport is not None
        self.transport.write(b"BDAT %d LAST\r\n" % size)
        producer = self.producer = _BodyProducer(self, iter(chunks), stuff=False)
        cast(IConsumer, self.transport).registerProducer(producer, False)
        return producer.done

    def start_tls(self, creator: Any) -> None:
        """Switch to TLS (after a 220 to STARTTLS). Handshake errors surface as lost."""
        self.transport.startTLS(creator)  # type: ignore[union-attr]
        self.tls = True

    def abort(self) -> None:
        """Drop the connection now (the next hop discards an unfinished transaction)."""
        if self.transport is not None and not self.closed:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def quit(self) -> None:
        """Say QUIT and close, without waiting for much (used for idle connections)."""
        if self.closed or self.transport is None:
            return
        self.transport.write(b"QUIT\r\n")
        self.transport.loseConnection()

    # -- timeouts and failures ------------------------------------------------------------

    @property
    def busy(self) -> bool:
        return bool(self._waiters) or self.producer is not None

    def touch(self) -> None:
        """Restart the silence timer while busy; stop it when idle."""
        if self.busy and self._failure is None:
            if self._timer is not None and self._timer.active():
                self._timer.reset(self.timeout)
            else:
                self._timer = self.clock.callLater(self.timeout, self._timed_out)
        elif self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None

    def _timed_out(self) -> None:
        self._timer = None
        self._fail(Failure(NextHopTimeout(f"no answer from the next hop in {self.timeout}s")))
        self.abort()

    def _fail(self, failure: Failure) -> None:
        if self._failure is None:
            self._failure = failure
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        waiters, self._waiters = self._waiters, deque()
        for d in waiters:
            d.errback(self._failure)
        if self.producer is not None:
            self.producer.stopProducing()

"""CHUNKING (RFC 3030): ``BDAT <size> [LAST]``.

The octets of a chunk follow its command whatever the server answers, so every BDAT whose size
parses is read to its last octet before it is answered (a refused chunk is discarded): the
session never falls out of step and chunk content is never read as commands. A BDAT whose size
cannot be parsed leaves no way to find the next command, so the server answers 421 and closes.

Chunk content is the message as it is (no dot-unstuffing), checked by the same rules as DATA:
bare CR/LF policy, line length, NUL policy, size. A ``BODY=BINARYMIME`` message (RFC 3030) is
octets, not lines: only the size limit applies, and it is stored exactly as sent. The ``DATA``
validator runs before the first chunk of a transaction is taken, as it runs before a ``354``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from slimta_tx.reply import Reply
from slimta_tx.state import State

if TYPE_CHECKING:  # pragma: no cover
    from slimta_tx.protocol import ESMTPServerProtocol

__all__ = ["Chunk", "bdat", "consume"]

# "BDAT" SP chunk-size [ SP end-marker ]; chunk-size = 1*DIGIT, end-marker = "LAST".
_ARGUMENT = re.compile(r"([0-9]{1,15})(?: (LAST))?", re.IGNORECASE)

_NOT_YET = {
    State.CONNECTED: "Send EHLO or HELO first",
    State.READY: "Need MAIL before BDAT",
    State.MAIL: "Need RCPT before BDAT (no valid recipients)",
}


@dataclass
class Chunk:
    """One BDAT chunk being read."""

    size: int
    last: bool
    refusal: Reply | None
    resume: State  # the state to return to when the chunk is refused
    left: int = 0

    def __post_init__(self) -> None:
        self.left = self.size


def bdat(proto: ESMTPServerProtocol, argument: str) -> None:
    match = _ARGUMENT.fullmatch(argument)
    if match is None:
        proto.send(
            Reply(
                "421",
                f"{proto.policy.hostname} Syntax: BDAT <size> [LAST]; closing to stay in step",
                "4.5.4",
            )
        )
        return
    size, last, state = int(match[1]), match[2] is not None, proto.state
    if not proto.policy.chunking:
        # Not offered, but its octets are still read and dropped: never parsed as commands.
        read(proto, Chunk(size, last, Reply("502", "Command not implemented", "5.5.1"), state))
        return
    if state in _NOT_YET:
        read(proto, Chunk(size, last, Reply("503", _NOT_YET[state], "5.5.1"), state))
        return
    if state is State.CHUNKING:
        read(proto, Chunk(size, last, None, state))
        return

    def decided(reply: Reply) -> None:
        if reply.is_positive:
            proto.start_data(unstuff=False)
            envelope = proto.session.envelope
            if envelope is not None and envelope.body == "BINARYMIME" and proto.decoder:
                proto.decoder.binary = True  # octets, not lines (RFC 3030)
            read(proto, Chunk(size, last, None, state))
        else:
            read(proto, Chunk(size, last, reply, state))

    proto.run_step(proto.call_hook("DATA", Reply("354", "Send the chunks")), decided)


def read(proto: ESMTPServerProtocol, chunk: Chunk) -> None:
    """Start reading the chunk's octets (they may already be buffered)."""
    proto.chunk = chunk
    proto.state = State.BDAT
    if chunk.refusal is not None:
        # Its octets are read all the same: within the body deadlines (slimta_tx.deadlines).
        proto.deadlines.transfer_started()
    proto.restart_timer(proto.policy.data_timeout)
    if chunk.left == 0:
        _end_of_chunk(proto)


def consume(proto: ESMTPServerProtocol, data: bytes) -> None:
    """Octets while a chunk is being read; what is past its end goes back to the reader."""
    chunk = proto.chunk
    assert chunk is not None
    take = data[: chunk.left]
    chunk.left -= len(take)
    proto.deadlines.received += len(take)
    if chunk.refusal is None:
        decoder = proto.decoder
        assert decoder is not None
        decoder.feed_chunk(take)
    if len(data) > len(take):
        proto.reader.feed(data[len(take) :])
    if chunk.left == 0:
        _end_of_chunk(proto)


def _end_of_chunk(proto: ESMTPServerProtocol) -> None:
    chunk, proto.chunk = proto.chunk, None
    assert chunk is not None
    if chunk.refusal is not None:
        proto.state = chunk.resume
        proto.finish_command("BDAT", chunk.refusal)
        return
    decoder = proto.decoder
    assert decoder is not None
    spool = proto.spool
    if decoder.too_big or (spool is not None and spool.error is not None):
        # Refused now rather than at LAST: the client stops sending; the transaction is over.
        proto.finish_message()
        return
    if not chunk.last:
        proto.state = State.CHUNKING
        proto.send(Reply("250", f"{chunk.size} octets received", "2.0.0"))
        return
    decoder.finish()
    proto.finish_message()

"""The spooled message as milters see it and as their edits leave it (no I/O but the spool).

:func:`read_head` splits the header section into fields (bounded: a header section over
``MAX_HEAD_SIZE`` bytes or ``MAX_HEAD_FIELDS`` fields is refused, as Exim refuses one over
1 MiB); the body stays in the spool and is streamed from :attr:`Head.body_offset`.
:class:`Edits` applies a milter's header requests in the order they came, with Sendmail's and
Postfix's index rules; :class:`BodyWriter` streams a replacement body into a new spool; and
:func:`rewrite` writes the edited message into a new spool for the next milter and the bus.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

from slimta_tx.milter.codec import CHUNK_SIZE, ProtocolError
from slimta_tx.spool import Spool

__all__ = ["MAX_HEAD_FIELDS", "MAX_HEAD_SIZE", "BodyWriter", "Edits", "Head", "read_head"]

MAX_HEAD_SIZE = 1024 * 1024
MAX_HEAD_FIELDS = 10_000
#: A header field sent to a milter is cut to this (libmilter refuses packets over 64 KiB).
MAX_FIELD_TO_MILTER = CHUNK_SIZE - 1024

_FIELD_NAME = re.compile(rb"[!-9;-~]+[ \t]*:")
_VALID_NAME = re.compile(rb"[!-9;-~]+")
_BARE_LF = re.compile(rb"(?<!\r)\n")


class HeadTooBig(Exception):
    """The header section is over the limits milters are given messages with."""


@dataclass
class Head:
    """The header section: raw fields (each with its CRLFs) and where the body starts."""

    fields: list[bytes]
    body_offset: int
    separator: bool  # a blank line ended the header section


def read_head(
    spool: Spool, max_size: int = MAX_HEAD_SIZE, max_fields: int = MAX_HEAD_FIELDS
) -> Head:
    """Split the header section of ``spool``; HeadTooBig past the limits."""
    head = spool.head(max_size + 2)
    fields: list[bytes] = []
    pos = 0
    while True:
        eol = head.find(b"\r\n", pos)
        if eol < 0:
            if len(head) < spool.size:
                raise HeadTooBig(f"header section over {max_size} bytes")
            line, end = head[pos:], len(head)  # the last line, without CRLF
        else:
            line, end = head[pos:eol], eol + 2
        if line == b"" and eol >= 0:
            return Head(fields, end, True)
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += head[pos:end]
        elif line and _FIELD_NAME.match(line):
            if len(fields) >= max_fields:
                raise HeadTooBig(f"more than {max_fields} header fields")
            fields.append(head[pos:end])
        else:
            return Head(fields, pos, False)  # not a header line: the body starts here
        if eol < 0:
            return Head(fields, end, False)
        pos = end


def split_field(field: bytes, leading_space: bool) -> tuple[bytes, bytes]:
    """``(name, value)`` of a raw field as milters get it: lines joined with ``\\n``, no final
    CRLF, one space after the colon dropped unless the milter asked for it (HDR_LEADSPC)."""
    name, _, value = field.partition(b":")
    value = value.removesuffix(b"\r\n").replace(b"\r\n", b"\n")
    if not leading_space and value.startswith(b" "):
        value = value[1:]
    value = value[:MAX_FIELD_TO_MILTER]
    return name.rstrip(b" \t"), value


def make_field(name: bytes, value: bytes, leading_space: bool) -> bytes:
    """A raw header field from a milter's name and value (``\\n`` between folded lines)."""
    if not _VALID_NAME.fullmatch(name):
        raise ProtocolError(f"invalid header name {name[:80]!r}")
    lines = value.replace(b"\r\n", b"\n").replace(b"\r", b"").split(b"\n")
    folded = [lines[0]] + [
        line if line[:1] in (b" ", b"\t") else b"\t" + line for line in lines[1:]
    ]
    return name + b":" + (b"" if leading_space else b" ") + b"\r\n".join(folded) + b"\r\n"


def _field_name(field: bytes) -> bytes:
    return field.partition(b":")[0].rstrip(b" \t").lower()


class Edits:
    """A milter's header requests applied to the fields, in order.

    - add: at the end of the header section;
    - insert at ``index``: 0 is the top; past the end, at the end;
    - change the ``index``-th field named ``name`` (1 is the first; 0 counts as 1): an empty
      value deletes it; if there is no such field, a non-empty value is added at the end.
    """

    def __init__(self, fields: list[bytes], leading_space: bool) -> None:
        self.fields = fields
        self.leading_space = leading_space
        self.changed = False

    def add(self, name: bytes, value: bytes) -> None:
        self.fields.append(make_field(name, value, self.leading_space))
        self.changed = True

    def insert(self, index: int, name: bytes, value: bytes) -> None:
        field = make_field(name, value, self.leading_space)
        self.fields.insert(min(index, len(self.fields)), field)
        self.changed = True

    def change(self, index: int, name: bytes, value: bytes) -> None:
        wanted = name.lower()
        count = 0
        for position, field in enumerate(self.fields):
            if _field_name(field) == wanted:
                count += 1
                if count == max(index, 1):
                    if value:
                        self.fields[position] = make_field(name, value, self.leading_space)
                    else:
                        del self.fields[position]
                    self.changed = True
                    return
        if value:
            self.add(name, value)


class BodyWriter:
    """Streams a replacement body into ``spool``: bare LF becomes CRLF, a last line gets its
    CRLF, and more than ``max_size`` bytes (0: no limit) is a ProtocolError."""

    def __init__(self, spool: Spool, max_size: int = 0) -> None:
        self.spool = spool
        self.max_size = max_size
        self._tail = b""  # the last two bytes written

    def write(self, data: bytes) -> None:
        out = b""
        if self._tail[-1:] == b"\r" and data[:1] == b"\n":
            out, data = b"\n", data[1:]  # the LF of a CRLF cut between two chunks
        out += _BARE_LF.sub(b"\r\n", data)
        if not out:
            return
        self.spool.write(out)
        self._tail = (self._tail + out)[-2:]
        if self.max_size and self.spool.size > self.max_size:
            raise ProtocolError(f"replacement body over {self.max_size} bytes")

    def finish(self) -> Spool:
        if self.spool.size and self._tail != b"\r\n":
            self.spool.write(b"\r\n")
        return self.spool


def body_chunks(spool: Spool, offset: int, size: int = CHUNK_SIZE) -> Iterator[bytes]:
    """The bytes of ``spool`` from ``offset`` on, in chunks of at most ``size``."""
    skip = offset
    for chunk in spool.chunks(size):
        if skip >= len(chunk):
            skip -= len(chunk)
            continue
        if skip:
            chunk = chunk[skip:]
            skip = 0
        yield chunk


def rewrite(target: Spool, head: Head, body: Spool | None, original: Spool) -> Head:
    """Write the edited fields and the body (``body`` if replaced, else the original's) into
    ``target``; the :class:`Head` of what was written."""
    for field in head.fields:
        target.write(field)
    source = body if body is not None else original
    offset = 0 if body is not None else head.body_offset
    chunks = body_chunks(source, offset)
    first = next(chunks, b"")
    separator = head.separator or (body is not None and bool(first))
    if separator:
        target.write(b"\r\n")
    body_offset = target.size
    if first:
        target.write(first)
    for chunk in chunks:
        target.write(chunk)
    return Head(list(head.fields), body_offset, separator)

"""Command lines out of a byte stream, without I/O.

CRLF is the only line ending. A line longer than the limit is reported once
(:data:`TOO_LONG`) and then skipped up to its CRLF, keeping memory bounded however long
the line: the rest of a giant line is never read as commands.
"""

from __future__ import annotations

from typing import Final

__all__ = ["TOO_LONG", "LineReader"]


class _TooLong:
    def __repr__(self) -> str:
        return "TOO_LONG"


TOO_LONG: Final = _TooLong()


class LineReader:
    """Splits CRLF-terminated lines out of the bytes fed to it.

    :param max_length: the longest line accepted, CRLF excluded.

    Once the complete lines of a chunk have been taken, the chunk itself is let go (only a
    partial line is kept, as a copy): a connection waiting for its next command holds no
    buffer. The chunk a socket read returns comes from a 64 KiB allocation shrunk to fit;
    kept for the life of an idle connection, it splits the heap where the next 64 KiB read
    would fit, and under many connections the heap grows in holes it cannot reuse
    (bench/soak.py measured it: heap growing, the memory in use flat).
    """

    def __init__(self, max_length: int = 512) -> None:
        self.max_length = max_length
        self._buf = b""
        self._pos = 0
        self._discarding = False

    def feed(self, data: bytes) -> None:
        if self._pos:
            self._buf = self._buf[self._pos :]
            self._pos = 0
        self._buf += data

    def next_line(self) -> bytes | _TooLong | None:
        """The next complete line (without CRLF), TOO_LONG, or None when more bytes are needed."""
        buf, pos = self._buf, self._pos
        end = buf.find(b"\r\n", pos)
        if self._discarding:
            if end < 0:
                # Keep a final CR: it may pair with the LF of the next chunk.
                keep = 1 if buf.endswith(b"\r") else 0
                self._buf, self._pos = buf[len(buf) - keep :], 0
                return None
            self._discarding = False
            self._pos = end + 2
            return self.next_line()
        if end < 0:
            if len(buf) - pos > self.max_length + 1:
                self._discarding = True
                keep = 1 if buf.endswith(b"\r") else 0
                self._buf, self._pos = buf[len(buf) - keep :], 0
                return TOO_LONG
            if pos:
                # Keep the partial line alone, not the whole chunk it came in (see _release).
                self._buf, self._pos = buf[pos:], 0
            return None
        if end - pos > self.max_length:
            self._pos = end + 2
            return TOO_LONG
        self._pos = end + 2
        if end + 2 == len(buf):
            self._buf, self._pos = b"", 0  # see _release
        return buf[pos:end]

    def take_rest(self) -> bytes:
        """Everything buffered and not yet returned (used when switching to DATA)."""
        rest = self._buf[self._pos :]
        self._buf, self._pos = b"", 0
        return rest

    def peek(self, size: int = 64) -> bytes:
        """Up to ``size`` buffered bytes not yet returned (left in the buffer)."""
        return self._buf[self._pos : self._pos + size]

    def clear(self) -> None:
        """Forget everything buffered (STARTTLS: plaintext sent after the command is dropped)."""
        self._buf, self._pos = b"", 0
        self._discarding = False

    @property
    def buffered(self) -> int:
        return len(self._buf) - self._pos

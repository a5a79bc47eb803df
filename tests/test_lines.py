"""The command line reader: CRLF-only lines, over-long lines, bounded memory."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from slimta_tx.lines import TOO_LONG, LineReader, _TooLong


def drain(reader: LineReader) -> list[bytes | _TooLong]:
    """Every line the reader can give now."""
    out: list[bytes | _TooLong] = []
    while (line := reader.next_line()) is not None:
        out.append(line)
    return out


def read_all(chunks: list[bytes], max_length: int = 512) -> list[bytes | _TooLong]:
    reader = LineReader(max_length)
    out: list[bytes | _TooLong] = []
    for chunk in chunks:
        reader.feed(chunk)
        out += drain(reader)
    return out


def test_lines_split_on_crlf() -> None:
    """Pipelined commands in one segment come out one by one, without their CRLF."""
    assert read_all([b"EHLO client\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\n"]) == [
        b"EHLO client",
        b"MAIL FROM:<a@b>",
        b"RCPT TO:<c@d>",
    ]


def test_empty_line() -> None:
    """A bare CRLF is an empty line (the protocol answers it as a syntax error)."""
    assert read_all([b"\r\n"]) == [b""]


def test_partial_line_waits_for_its_crlf() -> None:
    """Bytes without a CRLF are kept until the line is complete."""
    reader = LineReader()
    reader.feed(b"NOO")
    assert reader.next_line() is None
    assert reader.buffered == 3
    reader.feed(b"P\r\n")
    assert reader.next_line() == b"NOOP"
    assert reader.next_line() is None
    assert reader.buffered == 0


def test_bare_lf_and_bare_cr_stay_inside_the_line() -> None:
    """Only CRLF ends a command: bare LF or CR are part of the line (and refused later)."""
    assert read_all([b"NOOP\nQUIT\r\n"]) == [b"NOOP\nQUIT"]
    assert read_all([b"NOOP\rQUIT\r\n"]) == [b"NOOP\rQUIT"]
    assert read_all([b"NOOP\n"]) == []


def test_cr_at_a_chunk_boundary() -> None:
    """A CRLF split between two segments still ends the line."""
    assert read_all([b"NOOP\r", b"\nQUIT\r\n"]) == [b"NOOP", b"QUIT"]
    assert read_all([b"NOOP\r", b"\r\n"]) == [b"NOOP\r"]


def test_line_of_max_length_accepted_one_more_refused() -> None:
    """``max_length`` excludes the CRLF; one byte more is TOO_LONG, and the next line is fine."""
    assert read_all([b"a" * 512 + b"\r\nNOOP\r\n"]) == [b"a" * 512, b"NOOP"]
    assert read_all([b"a" * 513 + b"\r\nNOOP\r\n"]) == [TOO_LONG, b"NOOP"]


def test_too_long_reported_once_then_skipped_to_crlf() -> None:
    """A giant line gives one TOO_LONG; its rest is skipped, never read as commands."""
    reader = LineReader(512)
    reader.feed(b"RCPT TO:<" + b"a" * 600)
    assert drain(reader) == [TOO_LONG]
    reader.feed(b"a" * 10000)
    assert drain(reader) == []
    reader.feed(b"QUIT")  # still part of the over-long line
    assert drain(reader) == []
    reader.feed(b"\r\nNOOP\r\n")
    assert drain(reader) == [b"NOOP"]


def test_cr_at_boundary_while_skipping() -> None:
    """The CRLF that ends a skipped line may be split across segments."""
    assert read_all([b"x" * 600 + b"\r", b"\nNOOP\r\n"]) == [TOO_LONG, b"NOOP"]
    assert read_all([b"x" * 600 + b"\r", b"x\r", b"\nNOOP\r\n"]) == [TOO_LONG, b"NOOP"]


def test_megabytes_without_newline_keep_the_buffer_bounded() -> None:
    """Memory stays flat however long a line without CRLF goes on."""
    reader = LineReader(512)
    seen: list[bytes | _TooLong] = []
    for _ in range(160):  # 10 MiB
        reader.feed(b"z" * 65536)
        seen += drain(reader)
        assert reader.buffered <= 1
    assert seen == [TOO_LONG]
    reader.feed(b"\r\nQUIT\r\n")
    assert drain(reader) == [b"QUIT"]


def test_clear_forgets_buffered_lines() -> None:
    """STARTTLS: plaintext pipelined after the command is dropped, not run after the upgrade."""
    reader = LineReader()
    reader.feed(b"STARTTLS\r\nMAIL FROM:<injected@example.com>\r\nRCPT")
    assert reader.next_line() == b"STARTTLS"
    reader.clear()
    assert reader.buffered == 0
    assert reader.next_line() is None
    reader.feed(b"EHLO again\r\n")
    assert drain(reader) == [b"EHLO again"]


def test_clear_ends_skipping_of_a_long_line() -> None:
    """After ``clear()`` a new stream starts clean, even mid-way through a long line."""
    reader = LineReader(16)
    reader.feed(b"y" * 100)
    assert drain(reader) == [TOO_LONG]
    reader.clear()
    reader.feed(b"NOOP\r\n")
    assert drain(reader) == [b"NOOP"]


def test_take_rest_hands_over_unread_bytes() -> None:
    """At DATA the unread bytes (already the body) go to the decoder, and the reader is empty."""
    reader = LineReader()
    reader.feed(b"DATA\r\nSubject: x\r\n\r\nbody")
    assert reader.next_line() == b"DATA"
    assert reader.take_rest() == b"Subject: x\r\n\r\nbody"
    assert reader.buffered == 0
    assert reader.next_line() is None
    assert reader.take_rest() == b""


def test_too_long_repr() -> None:
    """TOO_LONG has a readable repr for logs and assertion messages."""
    assert repr(TOO_LONG) == "TOO_LONG"


def reference(data: bytes, max_length: int) -> list[bytes | _TooLong]:
    """The reader's specification, one pass over the whole stream."""
    *lines, tail = data.split(b"\r\n")
    out: list[bytes | _TooLong] = [TOO_LONG if len(x) > max_length else x for x in lines]
    if len(tail) > max_length + 1:
        out.append(TOO_LONG)
    return out


_PIECES = st.sampled_from([b"\r\n", b"\r", b"\n", b"a", b"bcdef", b"x" * 7, b" "])


@given(st.lists(_PIECES, max_size=40), st.lists(st.integers(0, 300), max_size=10))
def test_any_chunking_gives_the_reference_lines(pieces: list[bytes], cuts: list[int]) -> None:
    """However the stream is segmented, the same lines (and TOO_LONG markers) come out."""
    data = b"".join(pieces)
    bounds = [0, *sorted(min(c, len(data)) for c in cuts), len(data)]
    chunks = [data[a:b] for a, b in itertools.pairwise(bounds)]
    assert read_all(chunks, max_length=8) == reference(data, 8)
    assert read_all([data[i : i + 1] for i in range(len(data))], 8) == reference(data, 8)


def test_a_chunk_is_let_go_once_its_lines_are_taken() -> None:
    """A connection waiting for its next command holds no read buffer: the chunk a read
    returned is released when its last line is taken, and only a partial line is kept, as a
    copy (a chunk held between reads fragments the heap: bench/soak.py, issue 11)."""
    import sys

    chunk = b"NOOP\r\n" * 100 + b"MAIL FROM:<a@"
    chunk = chunk[:]  # a fresh object the test alone refers to
    held = sys.getrefcount(chunk)
    reader = LineReader()
    reader.feed(chunk)
    assert drain(reader) == [b"NOOP"] * 100
    assert reader.buffered == len(b"MAIL FROM:<a@")
    assert sys.getrefcount(chunk) == held
    whole = b"NOOP\r\nRSET\r\n" + b"x" * 10
    whole = whole[:-10]
    held = sys.getrefcount(whole)
    reader = LineReader()
    reader.feed(whole)
    assert drain(reader) == [b"NOOP", b"RSET"]
    assert reader.buffered == 0
    assert sys.getrefcount(whole) == held

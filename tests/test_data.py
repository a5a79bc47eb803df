"""The DATA body decoder: end of data, dot-unstuffing, limits and bare CR/LF policies."""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from slimta_tx.data import BareNewlinePolicy, DataDecoder, DataResult, NulPolicy

END = b"\r\n.\r\n"


class Fed:
    """What a decoder produced for a sequence of chunks."""

    def __init__(self, chunks: Iterable[bytes], **options: object) -> None:
        self.writes: list[bytes] = []
        self.decoder = DataDecoder(self.writes.append, **options)  # type: ignore[arg-type]
        self.rest: bytes | None = None
        chunks = list(chunks)
        for i, chunk in enumerate(chunks):
            rest = self.decoder.feed(chunk)
            if rest is not None:
                # The caller hands everything after the end back to the command reader.
                self.rest = rest + b"".join(chunks[i + 1 :])
                break

    @property
    def output(self) -> bytes:
        return b"".join(self.writes)

    @property
    def result(self) -> DataResult:
        return self.decoder.result

    @property
    def done(self) -> bool:
        return self.decoder.done


def bytewise(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


# -- the basics ---------------------------------------------------------------------------------


def test_simple_message() -> None:
    """The body up to and including the last CRLF is the message; the dot line is not."""
    fed = Fed([b"Subject: hi\r\n\r\nHello\r\n.\r\n"])
    assert fed.done
    assert fed.output == b"Subject: hi\r\n\r\nHello\r\n"
    assert fed.result is DataResult.OK
    assert fed.rest == b""
    assert fed.decoder.size == len(fed.output)


def test_empty_message() -> None:
    """A dot right after the DATA line (whose CRLF counts) is an empty message."""
    fed = Fed([b".\r\n"])
    assert fed.done
    assert fed.output == b""
    assert fed.result is DataResult.OK
    assert fed.rest == b""


def test_not_done_without_the_end() -> None:
    """Until CRLF.CRLF arrives, the decoder reports no end."""
    fed = Fed([b"Subject: hi\r\n", b"\r\nbody\r\n", b".", b"\r"])
    assert not fed.done
    assert fed.rest is None


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b"..leading\r\n", b".leading\r\n"),
        (b"...\r\n", b"..\r\n"),
        (b"..\r\n", b".\r\n"),
        (b"a\r\n..\r\nb\r\n", b"a\r\n.\r\nb\r\n"),
        (b"a.b\r\n", b"a.b\r\n"),
        (b" .x\r\n", b" .x\r\n"),
        (b".x\r\n.y\r\n", b"x\r\ny\r\n"),
    ],
)
def test_dot_unstuffing(body: bytes, expected: bytes) -> None:
    """RFC 5321 4.5.2: one leading dot is removed from every line, and only a leading one."""
    for chunks in ([body + b".\r\n"], bytewise(body + b".\r\n")):
        fed = Fed(chunks)
        assert fed.output == expected
        assert fed.result is DataResult.OK


def test_leftover_after_the_end_is_returned() -> None:
    """Pipelined commands after the end are handed back, not swallowed into the message."""
    fed = Fed([b"body\r\n.\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\n"])
    assert fed.output == b"body\r\n"
    assert fed.rest == b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\n"


def test_only_the_first_end_counts() -> None:
    """A second CRLF.CRLF after the first is leftover, not part of the message."""
    fed = Fed([b"one\r\n.\r\ntwo\r\n.\r\n"])
    assert fed.output == b"one\r\n"
    assert fed.rest == b"two\r\n.\r\n"


def test_feed_after_the_end_is_an_error() -> None:
    """The decoder is single-use: feeding it after the end is a programming error."""
    fed = Fed([b".\r\n"])
    with pytest.raises(RuntimeError):
        fed.decoder.feed(b"more")


MESSAGE = (
    b"From: a@example.com\r\nSubject: test\r\n\r\n"
    b"line one\r\n..stuffed\r\n...\r\nlast\r\n.\r\nQUIT\r\n"
)


def test_end_split_at_every_two_chunk_boundary() -> None:
    """Wherever TCP splits the stream, the message, result and leftover are the same."""
    whole = Fed([MESSAGE])
    assert whole.output.endswith(b"..\r\nlast\r\n")
    for cut in range(len(MESSAGE) + 1):
        split = Fed([MESSAGE[:cut], MESSAGE[cut:]])
        assert (split.output, split.result, split.rest) == (whole.output, whole.result, whole.rest)


def test_byte_by_byte_is_identical_to_one_chunk() -> None:
    """Feeding one byte at a time gives exactly the one-chunk result."""
    whole = Fed([MESSAGE])
    bytes_ = Fed(bytewise(MESSAGE))
    assert (bytes_.output, bytes_.result, bytes_.rest) == (whole.output, whole.result, whole.rest)
    assert whole.rest == b"QUIT\r\n"


# -- limits -------------------------------------------------------------------------------------


def test_message_of_exactly_max_size_is_accepted() -> None:
    """``max_size`` is inclusive: a message of that many bytes (after unstuffing) is fine."""
    body = b"x" * 98 + b"\r\n"
    fed = Fed([b"." + body + END[2:]], max_size=100)
    assert fed.result is DataResult.OK
    assert fed.output == body


def test_over_size_keeps_draining_and_stores_nothing_more() -> None:
    """Past the limit the decoder reads to the real end, writes nothing more, says TOO_BIG."""
    writes: list[bytes] = []
    decoder = DataDecoder(writes.append, max_size=100)
    assert decoder.feed(b"a" * 50 + b"\r\n") is None
    assert decoder.feed(b"b" * 60 + b"\r\n") is None
    assert decoder.too_big
    stored = b"".join(writes)
    assert len(stored) <= 100
    for _ in range(100):
        assert decoder.feed(b"c" * 500 + b"\r\n") is None
    assert b"".join(writes) == stored
    assert decoder.feed(b".\r\nQUIT\r\n") == b"QUIT\r\n"
    assert decoder.result is DataResult.TOO_BIG
    assert b"".join(writes) == stored
    assert decoder.size > 100


def test_zero_max_size_means_no_limit() -> None:
    """``max_size=0`` accepts any size."""
    body = (b"y" * 900 + b"\r\n") * 2000
    fed = Fed([body, END[2:]], max_size=0)
    assert fed.result is DataResult.OK
    assert len(fed.output) == len(body)


@pytest.mark.parametrize("chunking", ["whole", "bytewise"])
def test_line_of_998_octets_plus_crlf_accepted(chunking: str) -> None:
    """RFC 5321 4.5.3.1.6: 1000 octets including CRLF is the longest allowed line."""
    data = b"a" * 998 + b"\r\n" + END[2:]
    fed = Fed([data] if chunking == "whole" else bytewise(data))
    assert fed.result is DataResult.OK
    assert fed.output == b"a" * 998 + b"\r\n"


@pytest.mark.parametrize("chunking", ["whole", "bytewise"])
def test_line_of_999_octets_plus_crlf_refused(chunking: str) -> None:
    """A 1001-octet line (999 + CRLF) is refused after the end, with the session in step."""
    data = b"a" * 999 + b"\r\n" + END[2:] + b"NOOP\r\n"
    fed = Fed([data] if chunking == "whole" else bytewise(data))
    assert fed.done
    assert fed.result is DataResult.LINE_TOO_LONG
    assert fed.rest == b"NOOP\r\n"


def split_everywhere(data: bytes) -> list[list[bytes]]:
    """The data whole, byte by byte, and cut in two at every point."""
    return [[data], bytewise(data), *([data[:cut], data[cut:]] for cut in range(1, len(data)))]


def test_stuffed_dot_does_not_count_towards_the_line_length() -> None:
    """RFC 5321 4.5.3.1.6: 1000 octets "not counting the leading dot duplicated for
    transparency". A 998-octet line that starts with a dot is 999 octets plus CRLF on the wire
    and is accepted, however the stream is cut; 999 octets after unstuffing are refused."""
    fits = b"." + b"a" * 997
    for chunks in split_everywhere(b"." + fits + b"\r\n" + END[2:] + b"NOOP\r\n"):
        fed = Fed(chunks)
        assert (fed.result, fed.output, fed.rest) == (DataResult.OK, fits + b"\r\n", b"NOOP\r\n")
    for chunks in split_everywhere(b"." + fits + b"a\r\n" + END[2:] + b"NOOP\r\n"):
        fed = Fed(chunks)
        assert (fed.result, fed.rest) == (DataResult.LINE_TOO_LONG, b"NOOP\r\n")


def test_only_the_stuffed_dot_is_free() -> None:
    """Two leading dots on the wire are one stored dot: the second one counts."""
    assert Fed([b".." + b"a" * 997 + b"\r\n" + END[2:]]).result is DataResult.OK
    assert Fed([b".." + b"a" * 998 + b"\r\n" + END[2:]]).result is DataResult.LINE_TOO_LONG


def test_a_normalized_bare_lf_counts_as_the_crlf_it_becomes() -> None:
    """Under ``normalize`` the stored line ends with CRLF, and that is what is measured."""
    options = {"bare_newline": "normalize"}
    assert Fed([b"a" * 998 + b"\n" + END[2:]], **options).result is DataResult.OK
    assert Fed([b"a" * 999 + b"\n" + END[2:]], **options).result is DataResult.LINE_TOO_LONG


def test_custom_line_limit_and_no_limit() -> None:
    """``max_line_length`` is configurable; 0 accepts any line length."""
    line = b"z" * 5000 + b"\r\n"
    assert Fed([line + END[2:]], max_line_length=0).result is DataResult.OK
    assert Fed([line + END[2:]], max_line_length=5002).result is DataResult.OK
    assert Fed([line + END[2:]], max_line_length=5001).result is DataResult.LINE_TOO_LONG


@pytest.mark.parametrize("max_line_length", [1000, 0])
def test_ten_megabyte_line_keeps_memory_bounded(max_line_length: int) -> None:
    """10 MB with no newline neither ends the data nor piles up in the decoder."""
    writes: list[bytes] = []
    decoder = DataDecoder(writes.append, max_line_length=max_line_length)
    chunk = b"x" * 65536
    bound = max(max_line_length, 64 * 1024)
    for _ in range(160):
        assert decoder.feed(chunk) is None
        assert len(decoder._pending) <= bound
    assert decoder.raw_size == 160 * 65536
    assert decoder.feed(b"\r\n.\r\nQUIT\r\n") == b"QUIT\r\n"
    if max_line_length:
        assert decoder.result is DataResult.LINE_TOO_LONG
        assert writes == []
    else:
        assert decoder.result is DataResult.OK
        assert b"".join(writes) == b"x" * (160 * 65536) + b"\r\n"


def test_giant_single_chunk_without_newline_is_not_kept() -> None:
    """One 10 MB chunk with no newline is accounted for and dropped, not held."""
    decoder = DataDecoder(lambda _: None)
    assert decoder.feed(b"y" * (10 * 1024 * 1024) + b"\r") is None
    assert len(decoder._pending) <= 1
    assert decoder.line_too_long
    assert decoder.feed(b"\n.\r\n") == b""
    assert decoder.result is DataResult.LINE_TOO_LONG


def test_cr_at_end_of_long_line_still_pairs_with_next_lf() -> None:
    """When a long partial line is dropped, its final CR is kept so CRLF.CRLF is still seen."""
    decoder = DataDecoder(lambda _: None, max_line_length=10)
    assert decoder.feed(b"q" * 50 + b"\r") is None
    assert decoder.feed(b"\n.") is None
    assert decoder.feed(b"\r\nRSET\r\n") == b"RSET\r\n"


# -- bare CR / LF policies ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "body", [b"a\nb\r\n", b"a\rb\r\n", b"a\r\r\n", b"\n\r\n", b"a\r\nb\n\r\n", b"\r\r\n"]
)
def test_reject_policy_refuses_bare_cr_or_lf_after_the_end(body: bytes) -> None:
    """Under ``reject`` a bare CR or LF is drained to the real end and then refused."""
    for chunks in ([body + END[2:] + b"NOOP\r\n"], bytewise(body + END[2:] + b"NOOP\r\n")):
        fed = Fed(chunks, bare_newline="reject")
        assert fed.done
        assert fed.result is DataResult.BARE_NEWLINE
        assert fed.rest == b"NOOP\r\n"


def test_reject_is_the_default_policy() -> None:
    """Without a policy, bare newlines are refused."""
    assert Fed([b"a\nb\r\n.\r\n"]).result is DataResult.BARE_NEWLINE


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b"a\nb\r\n", b"a\r\nb\r\n"),
        (b"a\n\nb\r\n", b"a\r\n\r\nb\r\n"),
        (b"\nx\r\n", b"\r\nx\r\n"),
        (b"a\n..b\r\n", b"a\r\n.b\r\n"),
        (b"a\rb\r\n", b"a\rb\r\n"),
    ],
)
def test_normalize_policy_turns_bare_lf_into_crlf(body: bytes, expected: bytes) -> None:
    """Under ``normalize`` bare LF is a line ending stored as CRLF; bare CR stays content."""
    for chunks in ([body + END[2:]], bytewise(body + END[2:])):
        fed = Fed(chunks, bare_newline=BareNewlinePolicy.NORMALIZE)
        assert fed.result is DataResult.OK
        assert fed.output == expected


def test_policy_accepts_strings_and_refuses_unknown() -> None:
    """The policy may be given by name; an unknown name is an error at construction."""
    assert DataDecoder(lambda _: None, bare_newline="normalize").policy is (
        BareNewlinePolicy.NORMALIZE
    )
    with pytest.raises(ValueError):
        DataDecoder(lambda _: None, bare_newline="strip")


def test_too_big_wins_over_other_refusals_whatever_the_chunking() -> None:
    """A message both too big and holding a bare LF gets the same verdict however it arrives."""
    data = b"a" * 50 + b"\r\n" + b"b" * 60 + b"\n" + b"c\r\n.\r\n"
    results = {Fed([data[:cut], data[cut:]], max_size=100).result for cut in range(len(data))}
    assert results == {DataResult.TOO_BIG}


# -- properties ---------------------------------------------------------------------------------

_PIECES = st.sampled_from(
    [b"\r\n", b"\r", b"\n", b".", b"..", b"a", b"bc", b"\x00", b" ", b"\r\n.", b".\r\n", END]
)


def reference(
    data: bytes, max_size: int, max_line_length: int, policy: str
) -> tuple[bool, bytes, DataResult, bytes]:
    """The decoder's specification written the slow, obvious way: (done, output, result, rest)."""
    full = b"\r\n" + data
    end = full.find(END)
    if end < 0:
        return False, b"", DataResult.OK, b""
    body, rest = full[2 : end + 2], full[end + 5 :]
    has_bare = re.search(rb"(?<!\r)\n|\r(?!\n)", body) is not None
    text = body
    if policy == "normalize":
        text = re.sub(rb"(?<!\r)\n", b"\r\n", body)
        has_bare = False
    output = (b"\r\n" + text).replace(b"\r\n.", b"\r\n")[2:]
    if max_size and len(output) > max_size:
        result = DataResult.TOO_BIG
    elif has_bare:
        result = DataResult.BARE_NEWLINE
    elif max_line_length and re.search(b"[^\\n]{%d}" % max_line_length, output):
        # Lines as stored (unstuffed, normalized), CRLF included: a run of max_line_length
        # octets without LF is a line of max_line_length + 1 octets or more.
        result = DataResult.LINE_TOO_LONG
    else:
        result = DataResult.OK
    return True, output, result, rest


@st.composite
def chunked(draw: st.DrawFn) -> tuple[bytes, list[bytes]]:
    data = b"".join(draw(st.lists(_PIECES, max_size=60)))
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=12)))
    bounds = [0, *cuts, len(data)]
    return data, [data[a:b] for a, b in itertools.pairwise(bounds)]


@given(
    chunked(),
    st.sampled_from([0, 8, 30]),
    st.sampled_from([0, 1, 2, 4, 12, 1000]),
    st.sampled_from(["reject", "normalize"]),
)
def test_any_chunking_matches_the_reference(
    sample: tuple[bytes, list[bytes]], max_size: int, max_line_length: int, policy: str
) -> None:
    """However a stream is chunked, the end, verdict, leftover and (if accepted) the stored
    message equal those of the obvious one-pass specification."""
    data, chunks = sample
    done, output, result, rest = reference(data, max_size, max_line_length, policy)
    options = {"max_size": max_size, "max_line_length": max_line_length, "bare_newline": policy}
    for fed in (Fed(chunks, **options), Fed(bytewise(data), **options)):
        assert fed.done is done
        if done:
            assert fed.rest == rest
            assert fed.result is result
            if result is DataResult.OK:
                assert fed.output == output
                assert fed.decoder.size == len(output)


@given(st.binary(max_size=300), st.binary(max_size=300))
def test_random_bytes_never_end_early(prefix: bytes, suffix: bytes) -> None:
    """The end is found exactly at the first CRLF.CRLF (counting the DATA line's CRLF)."""
    data = prefix + END + suffix
    fed = Fed([data], bare_newline="normalize", max_line_length=0)
    expected_end = (b"\r\n" + data).find(END)
    assert fed.done
    assert fed.rest == (b"\r\n" + data)[expected_end + 5 :]


# -- NUL octets and BINARYMIME ---------------------------------------------------------------


@pytest.mark.parametrize("chunking", ["whole", "bytewise"])
def test_nul_policies(chunking: str) -> None:
    """accept: stored as sent; reject: drained to the real end, then refused; strip: removed
    from what is stored (and from the size)."""
    data = b"a\0b\r\n\0\r\n.\0\r\n" + END[2:] + b"NOOP\r\n"
    chunks = [data] if chunking == "whole" else bytewise(data)
    accepted = Fed(chunks, nul=NulPolicy.ACCEPT)
    assert (accepted.result, accepted.output) == (DataResult.OK, b"a\0b\r\n\0\r\n\0\r\n")
    refused = Fed(chunks, nul="reject")
    assert (refused.result, refused.rest, refused.output) == (DataResult.NUL, b"NOOP\r\n", b"")
    stripped = Fed(chunks, nul="strip")
    assert (stripped.result, stripped.output) == (DataResult.OK, b"ab\r\n\r\n\r\n")
    assert stripped.decoder.size == len(stripped.output)


def test_stripping_nul_never_makes_an_end_of_data() -> None:
    """CRLF NUL . CRLF is content; stripped it is a stored line "." (stuffed again by any
    relay), and the real end is still the only end."""
    fed = Fed([b"a\r\n\0.\r\nb\r\n.\r\nQUIT\r\n"], nul="strip")
    assert (fed.output, fed.rest) == (b"a\r\n.\r\nb\r\n", b"QUIT\r\n")


def test_binary_content_is_octets_not_lines() -> None:
    """BINARYMIME (RFC 3030): NUL, bare CR and LF, lines of any length, stored exactly;
    only the size limit applies."""
    writes: list[bytes] = []
    content = bytes(range(256)) * 40 + b"\n" + b"x" * 5000 + b"\r"
    decoder = DataDecoder(writes.append, unstuff=False, binary=True, nul="reject", max_size=0)
    for i in range(0, len(content), 333):
        decoder.feed_chunk(content[i : i + 333])
    decoder.finish()
    assert (decoder.result, b"".join(writes)) == (DataResult.OK, content)
    small = DataDecoder(writes.append, unstuff=False, binary=True, max_size=100)
    small.feed_chunk(b"\0" * 101)
    assert small.result is DataResult.TOO_BIG

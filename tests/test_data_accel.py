"""The C accelerator of the DATA decoder decodes exactly as the pure-Python decoder does.

``slimta_tx._speedups.scan`` only ever claims clean lines and hands everything else back to
Python, so every test here runs the same input through a decoder with the accelerator and one
without and compares all that a user could notice: the stored bytes (and how the sink saw
them is free to differ), the verdict, the sizes, the end of data and what followed it.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import random
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from slimta_tx import data as data_module
from slimta_tx.data import BareNewlinePolicy, DataDecoder, NulPolicy
from tests.support.decoding import Outcome, decode

ROOT = Path(__file__).resolve().parent.parent

speedups = pytest.importorskip("slimta_tx._speedups") if not os.environ.get("CI") else None
if speedups is None:  # under CI a missing accelerator is a failure, never a skip
    import slimta_tx._speedups as speedups

scan = speedups.scan


def assert_same(chunks: list[bytes], bdat: bool = False, **options: object) -> Outcome:
    fast = decode(chunks, scan, bdat, **options)
    slow = decode(chunks, None, bdat, **options)
    assert fast == slow, (chunks, options)
    return fast


# An alphabet where every dangerous sequence is likely: CR, LF, dots, and a little text.
hostile = st.lists(
    st.sampled_from(
        [b"\r", b"\n", b".", b"\r\n", b"\r\n.", b"\r\n.\r\n", b"a", b"xyz", b"..", b"\0"]
    ),
    max_size=60,
).map(b"".join)
options = st.fixed_dictionaries(
    {
        "bare_newline": st.sampled_from([BareNewlinePolicy.REJECT, BareNewlinePolicy.NORMALIZE]),
        "max_line_length": st.sampled_from([0, 3, 4, 5, 8, 1000]),
        "max_size": st.sampled_from([0, 1, 7, 40, 10_000]),
        "nul": st.sampled_from(list(NulPolicy)),
    }
)


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    edges = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges) if b > a] or [b""]


@settings(max_examples=3000, deadline=None)
@given(hostile, st.lists(st.integers(min_value=0, max_value=500), max_size=8), options)
def test_data_decodes_alike(data: bytes, cuts: list[int], opts: dict[str, object]) -> None:
    """DATA: any input, chunked anyhow, gives the same message, verdict and leftover."""
    assert_same(split(data, cuts), **opts)


@settings(max_examples=1500, deadline=None)
@given(hostile, st.lists(st.integers(min_value=0, max_value=500), max_size=8), options)
def test_bdat_decodes_alike(data: bytes, cuts: list[int], opts: dict[str, object]) -> None:
    """BDAT chunks: no end marker, no unstuffing, the same checks, the same result."""
    assert_same(split(data, cuts), bdat=True, **opts)


def test_random_stress_alike() -> None:
    """20,000 seeded random messages over the hostile alphabet, chunked at random."""
    rng = random.Random(20261124)
    pieces = [b"\r", b"\n", b".", b"\r\n", b"\r\n.", b"\r\n.\r\n", b"a", b"x" * 7, b"..", b"\0"]
    for _ in range(20_000):
        body = b"".join(rng.choice(pieces) for _ in range(rng.randrange(80)))
        cuts = [rng.randrange(len(body) + 1) for _ in range(rng.randrange(5))]
        opts = {
            "bare_newline": rng.choice(list(BareNewlinePolicy)),
            "max_line_length": rng.choice([0, 3, 5, 9, 1000]),
            "max_size": rng.choice([0, 5, 30, 1000]),
            "nul": rng.choice(list(NulPolicy)),
        }
        assert_same(split(body, cuts), bdat=rng.random() < 0.3, **opts)


def test_real_messages_alike_and_accelerated() -> None:
    """A normal message in 64 KiB reads: the same bytes, and the C path did the work."""
    lines = [
        (b"." if n % 50 == 0 else b"") + b"line %d " % n + b"x" * 60 + b"\r\n"
        for n in range(20000)
    ]
    body = b"".join(lines)
    stuffed = b"".join(b"." + line if line.startswith(b".") else line for line in lines)
    wire = stuffed + b".\r\nQUIT\r\n"
    chunks = [wire[i : i + 65536] for i in range(0, len(wire), 65536)]
    outcome = assert_same(chunks, max_size=0, max_line_length=1000)
    assert outcome.stored == body
    assert outcome.rest == b"QUIT\r\n"
    assert outcome.result == "ok"


@pytest.mark.parametrize("length", [997, 998, 999, 1000, 1001])
@pytest.mark.parametrize("chunk", [1, 7, 1000, 65536])
def test_line_length_boundary_alike(length: int, chunk: int) -> None:
    """A line of 998 octets plus CRLF is the longest allowed (RFC 5321 4.5.3.1.6)."""
    wire = b"a\r\n" + b"b" * length + b"\r\nc\r\n.\r\n"
    chunks = [wire[i : i + chunk] for i in range(0, len(wire), chunk)]
    outcome = assert_same(chunks, max_line_length=1000)
    assert outcome.result == ("ok" if length <= 998 else "line-too-long")


def stored_line_too_long(lines: list[bytes], limit: int, bdat: bool) -> bool:
    """The rule, written plainly: a line as stored (unstuffed for DATA), CRLF included, over
    ``limit``; in BDAT a last line without CRLF counts the CRLF a next hop adds."""
    for line in lines:
        stored = line[1:] if not bdat and line.startswith(b".") else line
        if len(stored if stored.endswith(b"\r\n") else stored + b"\r\n") > limit:
            return True
    return False


@pytest.mark.parametrize("bdat", [False, True], ids=["DATA", "BDAT"])
@pytest.mark.parametrize("dots", [0, 1, 2])
@pytest.mark.parametrize("stored", [997, 998, 999, 1000])
def test_line_limit_border_with_dots_alike(bdat: bool, dots: int, stored: int) -> None:
    """A line of ``stored`` octets plus CRLF as stored, starting with ``dots`` dots (DATA:
    stuffed, one more on the wire), cut in two at every point near its ends: both decoders
    agree, and exactly the lines over 1000 octets with CRLF are refused."""
    content = b"." * dots + b"b" * (stored - dots)
    line = (b"." + content if dots and not bdat else content) + b"\r\n"
    wire = b"a\r\n" + line + (b"c\r\n" if bdat else b"c\r\n.\r\nNOOP\r\n")
    edges = [*range(0, 8), *range(len(line) - 6, len(line) + 8)]
    for cut in edges:
        outcome = assert_same([wire[:cut], wire[cut:]], bdat=bdat, max_line_length=1000)
        assert outcome.result == ("ok" if stored <= 998 else "line-too-long"), cut
        if not bdat:
            assert outcome.rest == b"NOOP\r\n"
        if stored <= 998:
            assert outcome.stored == b"a\r\n" + content + b"\r\nc\r\n"


@pytest.mark.parametrize("length", [997, 998, 999, 1000])
def test_bdat_last_line_without_crlf_alike(length: int) -> None:
    """BDAT: a last line without CRLF is measured with the CRLF a next hop will add."""
    wire = b"a\r\n" + b"b" * length
    for chunk in (1, 7, 999, 1000, 65536):
        chunks = [wire[i : i + chunk] for i in range(0, len(wire), chunk)]
        outcome = assert_same(chunks, bdat=True, max_line_length=1000)
        assert outcome.result == ("ok" if length <= 998 else "line-too-long")


# Lines close to a small limit, some with leading dots, some without CRLF at the very end.
border_line = st.tuples(
    st.integers(min_value=0, max_value=3), st.integers(min_value=-3, max_value=2)
)


@settings(max_examples=1500, deadline=None)
@given(
    st.lists(border_line, min_size=1, max_size=6),
    st.sampled_from([6, 9, 1000]),
    st.booleans(),
    st.booleans(),
    st.lists(st.integers(min_value=0, max_value=6000), max_size=6),
)
def test_lines_at_the_limit_alike(
    shapes: list[tuple[int, int]], limit: int, bdat: bool, open_end: bool, cuts: list[int]
) -> None:
    """Lines of limit-3 .. limit+2 stored octets (CRLF included) with 0-3 leading dots, cut
    anyhow: both decoders agree with each other and with the rule written plainly."""
    lines = []
    for dots, delta in shapes:
        stored = max(limit + delta - 2, dots)  # octets before the CRLF, as stored
        content = b"." * dots + b"x" * (stored - dots)
        lines.append((b"." + content if dots and not bdat else content) + b"\r\n")
    if bdat and open_end:
        lines[-1] = lines[-1][:-2]
    body = b"".join(lines)
    wire = body if bdat else body + b".\r\n"
    outcome = assert_same(split(wire, cuts), bdat=bdat, max_line_length=limit)
    too_long = stored_line_too_long(lines, limit, bdat)
    assert outcome.result == ("line-too-long" if too_long else "ok")


# -- the C function itself -------------------------------------------------------------------


def test_scan_clean_lines() -> None:
    assert scan(b"\r\nab\r\n..c\r\nrest", 2, True, True, 0) == (b"ab\r\n.c\r\n", 11, False, False)


def test_scan_finds_the_end_after_a_real_crlf_only() -> None:
    assert scan(b"\r\n.\r\nMAIL", 2, True, True, 0) == (b"", 5, True, False)
    assert scan(b"\r\na\r\n.\r\nX", 2, True, True, 0) == (b"a\r\n", 8, True, False)
    # No end search for BDAT: the "." line is content.
    assert scan(b"\r\na\r\n.\r\n", 2, False, False, 0) == (b"a\r\n.\r\n", 8, False, False)


@pytest.mark.parametrize(
    "work",
    [b"\r\na\nb\r\n", b"\r\na\rb\r\n", b"\r\n\n", b"\r\n.\n", b"\r\nab\r\r\n", b"\r\n\r\r\n"],
)
def test_scan_hands_bare_cr_or_lf_back(work: bytes) -> None:
    assert scan(work, 2, True, True, 1000) is None


def test_scan_leaves_a_partial_line() -> None:
    assert scan(b"\r\nabc", 2, True, True, 0) == (b"", 2, False, False)
    assert scan(b"abc", 0, True, True, 0) == (b"", 0, False, False)
    assert scan(b"\r\n", 2, True, True, 0) == (b"", 2, False, False)
    # A bare CR in the partial line is not looked at until its line is complete.
    assert scan(b"\r\nab\r\nc\rd", 2, True, True, 0) == (b"ab\r\n", 6, False, False)


def test_scan_reports_long_lines() -> None:
    assert scan(b"\r\n" + b"a" * 9 + b"\r\n", 2, True, True, 10) == (
        b"a" * 9 + b"\r\n",
        13,
        False,
        True,
    )
    assert scan(b"\r\n" + b"a" * 8 + b"\r\n", 2, True, True, 10)[3] is False  # type: ignore[index]
    # A stuffed dot is not part of the stored line (RFC 5321 4.5.3.1.6)...
    assert scan(b"\r\n." + b"a" * 8 + b"\r\n", 2, True, True, 10)[3] is False  # type: ignore[index]
    assert scan(b"\r\n." + b"a" * 9 + b"\r\n", 2, True, True, 10)[3] is True  # type: ignore[index]
    # ... but without unstuffing (BDAT) the dot is content.
    assert scan(b"\r\n." + b"a" * 8 + b"\r\n", 2, False, False, 10)[3] is True  # type: ignore[index]


@pytest.mark.parametrize(
    "args, error",
    [
        ((bytearray(b"\r\na\r\n"), 2, True, True, 0), TypeError),
        (("\r\na\r\n", 2, True, True, 0), TypeError),
        ((b"\r\na\r\n", 1, True, True, 0), ValueError),
        ((b"ab", 2, True, True, 0), ValueError),
        ((b"", 2, True, True, 0), ValueError),
        ((b"\r\n", 2, True, True, -1), ValueError),
        ((b"\r\n", 2, True, True), TypeError),
    ],
)
def test_scan_rejects_bad_arguments(args: tuple[object, ...], error: type[Exception]) -> None:
    with pytest.raises(error):
        scan(*args)


def test_scan_does_not_leak_references() -> None:
    """Returned and refused calls leave the input's reference count as it was."""
    work = b"\r\n" + b"line\r\n" * 100 + b".\r\n"
    dirty = b"\r\n" + b"line\n" * 100
    before = sys.getrefcount(work), sys.getrefcount(dirty)
    for _ in range(1000):
        scan(work, 2, True, True, 1000)
        scan(dirty, 2, True, True, 1000)
    assert (sys.getrefcount(work), sys.getrefcount(dirty)) == before


def test_the_accelerator_is_used_by_default() -> None:
    assert data_module.ACCELERATOR is scan
    assert DataDecoder(lambda b: None)._scan is scan


def test_the_built_module_matches_its_source() -> None:
    """A stale build (the C file changed, the module was not rebuilt) is caught here."""
    source = (ROOT / "slimta_tx" / "_speedups.c").read_bytes()
    assert speedups.SOURCE_HASH == hashlib.sha256(source).hexdigest(), (
        "slimta_tx/_speedups.c changed: rebuild with `make` or `pip install -e .`"
    )

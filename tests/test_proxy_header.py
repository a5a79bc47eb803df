"""The PROXY header parser (sans-I/O): v1 and v2, every way a header can be wrong, and headers
arriving in pieces of any size."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from slimta_tx.proxy_header import (
    V2_SIGNATURE,
    ProxyHeader,
    ProxyHeaderError,
    ProxyHeaderParser,
    v1_header,
    v2_header,
)


def parse(data: bytes) -> tuple[ProxyHeader, bytes] | None:
    return ProxyHeaderParser().feed(data)


def refused(data: bytes) -> str:
    with pytest.raises(ProxyHeaderError) as info:
        parse(data)
    return str(info.value)


# -- v1 ------------------------------------------------------------------------------------------


def test_v1_tcp4_names_the_client_and_keeps_what_follows() -> None:
    """The bytes after the CRLF (the client's first bytes) are handed back untouched."""
    assert parse(b"PROXY TCP4 203.0.113.9 127.0.0.1 40000 25\r\nEHLO x\r\n") == (
        ProxyHeader(1, "PROXY", "TCP4", ("203.0.113.9", 40000), ("127.0.0.1", 25)),
        b"EHLO x\r\n",
    )


def test_v1_tcp6_addresses_are_normalised() -> None:
    header, rest = parse(b"PROXY TCP6 2001:DB8:0::9 ::1 65535 0\r\n") or (None, None)
    assert header == ProxyHeader(1, "PROXY", "TCP6", ("2001:db8::9", 65535), ("::1", 0))
    assert rest == b""


@pytest.mark.parametrize("line", [b"PROXY UNKNOWN\r\n", b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n"])
def test_v1_unknown_names_no_client(line: bytes) -> None:
    """UNKNOWN: the rest of the line is ignored and the real peer is the client."""
    found = parse(line)
    assert found is not None
    assert found[0] == ProxyHeader(1, "PROXY", "UNKNOWN")
    assert not found[0].names_client


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"EHLO client.test\r\n", "not a PROXY header"),
        (b"PROXI TCP4", "not a PROXY header"),
        (b"PROXY TCP5 1.2.3.4 1.2.3.4 1 2\r\n", "TCP4, TCP6 or UNKNOWN"),
        (b"PROXY TCP4 1.2.3.4 1.2.3.4 1\r\n", "4 single-space separated fields"),
        (b"PROXY TCP4  1.2.3.4 1.2.3.4 1 2\r\n", "4 single-space separated fields"),
        (b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2 \r\n", "4 single-space separated fields"),
        (b"PROXY TCP4 evil.example 1.2.3.4 1 2\r\n", "not an IP address"),
        (b"PROXY TCP4 01.2.3.4 1.2.3.4 1 2\r\n", "not an IP address"),
        (b"PROXY TCP4 ::1 1.2.3.4 1 2\r\n", "not an IPv4 address"),
        (b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n", "not an IPv6 address"),
        (b"PROXY TCP4 1.2.3.4 1.2.3.4 65536 25\r\n", "port out of range"),
        (b"PROXY TCP4 1.2.3.4 1.2.3.4 025 25\r\n", "not a port number"),
        (b"PROXY TCP4 1.2.3.4 1.2.3.4 -1 25\r\n", "not a port number"),
        (b"PROXY TCP4 1.2.3.4 1.2.3.4 \xd9\xa1 25\r\n", "not ASCII"),
        (b"PROXY TCP4 1.2.3.4\n1.2.3.4 1 2\r\n", "bare CR or LF"),
        (b"PROXY TCP4 1.2.3.4\r1.2.3.4 1 2", "bare CR or LF"),
        (b"PROXY UNKNOWN" + b" " * 100, "without CRLF in 107 bytes"),
    ],
)
def test_v1_malformed_headers_are_refused(data: bytes, why: str) -> None:
    assert why in refused(data)


def test_v1_longest_header_fits_and_one_more_byte_does_not() -> None:
    """107 bytes with the CRLF is the limit the specification sets."""
    longest = b"PROXY UNKNOWN " + b"x" * (107 - 16) + b"\r\n"
    assert len(longest) == 107
    assert parse(longest) is not None
    assert "107" in refused(longest[:-2] + b"x\r\n")


# -- v2 ------------------------------------------------------------------------------------------


def test_v2_tcp4_and_tcp6_name_the_client() -> None:
    assert parse(v2_header(("203.0.113.9", 40000), ("192.0.2.25", 25)) + b"rest") == (
        ProxyHeader(2, "PROXY", "TCP4", ("203.0.113.9", 40000), ("192.0.2.25", 25)),
        b"rest",
    )
    assert parse(v2_header(("2001:db8::9", 1), ("2001:db8::25", 25))) == (
        ProxyHeader(2, "PROXY", "TCP6", ("2001:db8::9", 1), ("2001:db8::25", 25)),
        b"",
    )


def test_v2_tlvs_after_the_addresses_are_skipped() -> None:
    """HAProxy may add type-length-value extensions (unique id, TLS facts, ...)."""
    tlvs = b"\x05\x00\x04abcd" + b"\x20\x00\x05\x01\x00\x00\x00\x00"
    header = v2_header(("203.0.113.9", 40000), ("192.0.2.25", 25), tlvs=tlvs)
    found = parse(header + b"EHLO x\r\n")
    assert found is not None
    assert found[0].source == ("203.0.113.9", 40000)
    assert found[1] == b"EHLO x\r\n"


def test_v2_local_is_the_proxys_own_connection() -> None:
    """LOCAL (HAProxy's health checks): whatever follows in the header is ignored."""
    found = parse(v2_header() + b"QUIT\r\n")
    assert found == (ProxyHeader(2, "LOCAL", "UNSPEC"), b"QUIT\r\n")
    assert not found[0].names_client
    # LOCAL with an INET family and addresses: still no client.
    local_inet = V2_SIGNATURE + b"\x20\x11" + struct.pack("!H", 12) + bytes(12)
    assert parse(local_inet) == (ProxyHeader(2, "LOCAL", "TCP4"), b"")


@pytest.mark.parametrize(("family", "length"), [(0x00, 0), (0x31, 216)])
def test_v2_unspec_and_unix_name_no_client(family: int, length: int) -> None:
    header = V2_SIGNATURE + bytes([0x21, family]) + struct.pack("!H", length) + bytes(length)
    found = parse(header)
    assert found is not None and not found[0].names_client


def _v2(version_command: int, family: int, body: bytes) -> bytes:
    return V2_SIGNATURE + bytes([version_command, family]) + struct.pack("!H", len(body)) + body


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"\r\n\r\n\x00\r\nQUIT\r", "not a PROXY header"),
        (_v2(0x11, 0x11, bytes(12)), "version must be 2"),
        (_v2(0x22, 0x11, bytes(12)), "unknown command"),
        (_v2(0x21, 0x41, bytes(12)), "unknown address family"),
        (_v2(0x21, 0x13, bytes(12)), "unknown transport"),
        (_v2(0x21, 0x12, bytes(12)), "only STREAM"),
        (_v2(0x21, 0x11, bytes(11)), "TCP4 needs 12"),
        (_v2(0x21, 0x21, bytes(12)), "TCP6 needs 36"),
    ],
)
def test_v2_malformed_headers_are_refused(data: bytes, why: str) -> None:
    assert why in refused(data)


def test_v2_bad_head_is_refused_before_its_announced_length_arrives() -> None:
    """A head announcing 65535 bytes but with a bad version fails at once, not 64 KiB later."""
    with pytest.raises(ProxyHeaderError, match="version"):
        parse(V2_SIGNATURE + b"\x31\x11\xff\xff")


def test_v2_waits_for_the_announced_length() -> None:
    parser = ProxyHeaderParser()
    header = v2_header(("203.0.113.9", 1), ("192.0.2.25", 25))
    assert parser.feed(header[:-1]) is None
    assert parser.feed(header[-1:] + b"x") == (
        ProxyHeader(2, "PROXY", "TCP4", ("203.0.113.9", 1), ("192.0.2.25", 25)),
        b"x",
    )


def test_parser_is_used_once() -> None:
    parser = ProxyHeaderParser()
    assert parser.feed(b"PROXY UNKNOWN\r\n") is not None
    with pytest.raises(ProxyHeaderError):
        parser.feed(b"PROXY UNKNOWN\r\n")


def test_nothing_yet_is_not_an_answer() -> None:
    assert ProxyHeaderParser().feed(b"") is None


# -- any split, any bytes ------------------------------------------------------------------------

ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(str)
ports = st.integers(0, 65535)


@st.composite
def headers(draw: st.DrawFn) -> tuple[bytes, ProxyHeader]:
    hosts = draw(st.sampled_from([ipv4, ipv6]))
    source = (draw(hosts), draw(ports))
    destination = (draw(hosts), draw(ports))
    family = "TCP4" if "." in source[0] else "TCP6"
    if draw(st.booleans()):
        return v1_header(source, destination), ProxyHeader(1, "PROXY", family, source, destination)
    tlvs = draw(st.binary(max_size=40))
    return (
        v2_header(source, destination, tlvs=tlvs),
        ProxyHeader(2, "PROXY", family, source, destination),
    )


@given(headers(), st.binary(max_size=30), st.lists(st.integers(1, 40), max_size=20))
def test_any_split_gives_the_same_header_and_rest(
    made: tuple[bytes, ProxyHeader], after: bytes, cuts: list[int]
) -> None:
    """However the bytes are cut into reads, the header and what follows come out the same."""
    data, expected = made
    stream = data + after
    parser = ProxyHeaderParser()
    position, result = 0, None
    for size in [*cuts, len(stream)]:
        piece = stream[position : position + size]
        position += size
        result = parser.feed(piece)
        if result is not None:
            break
    assert result is not None
    header, rest = result
    assert header == expected
    assert rest == stream[len(data) :][: max(0, position - len(data))]


@given(st.binary(max_size=300))
def test_arbitrary_bytes_only_ever_raise_proxy_header_error(data: bytes) -> None:
    """Hostile input gives a header, a wait, or ProxyHeaderError; nothing else escapes, and
    the parser never holds more than one header's worth of bytes."""
    parser = ProxyHeaderParser()
    try:
        found = parser.feed(data)
    except ProxyHeaderError:
        return
    if found is None:
        assert len(parser._buffer) <= 16 + 65535
        assert data[:1] in (b"", b"P", b"\r")

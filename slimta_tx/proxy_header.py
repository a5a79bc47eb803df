"""The PROXY protocol header, v1 (text) and v2 (binary), as a sans-I/O parser.

A load balancer such as HAProxy (``send-proxy``, ``send-proxy-v2``) opens each connection to
the edge with one header naming the client it relays; the edge's policies must see that client,
not the balancer. The format is HAProxy's ``doc/proxy-protocol.txt``; this parser follows it
strictly, because a header that is accepted but misread is an address spoofed:

- the version is told by the first byte (``P`` for v1, ``\\r`` for v2); anything else is not a
  header at all, and the header may arrive in pieces of any size;
- v1 is one line of at most 107 bytes with CRLF: ``PROXY TCP4|TCP6 src dst sport dport`` with
  single spaces, addresses of the named family, ports 0-65535 in decimal without leading
  zeros; ``PROXY UNKNOWN`` (with or without the rest) names no client;
- v2 is a 16-byte head (signature, version 2, command, family and transport, length) and that
  many bytes more; ``LOCAL`` (HAProxy's health checks) and the ``UNSPEC`` and ``UNIX`` families
  name no client; INET and INET6 need ``STREAM`` (a datagram makes no sense for SMTP) and at
  least their 12 or 36 address bytes; type-length-value extensions after them are skipped.

A header that names no client means "this connection is the proxy's own": the real peer is the
client. Everything malformed raises :class:`ProxyHeaderError`; the caller closes the connection.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

__all__ = ["V1_MAX_LENGTH", "V2_SIGNATURE", "ProxyHeader", "ProxyHeaderError", "ProxyHeaderParser"]

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_PREFIX = b"PROXY "
#: The longest v1 header, CRLF included (``PROXY UNKNOWN`` with two full IPv6 addresses).
V1_MAX_LENGTH = 107
_V2_HEAD = 16
_V2_ADDRESS_LENGTHS = {0x1: 12, 0x2: 36, 0x3: 216}  # INET, INET6, UNIX
_V2_FAMILIES = {0x0: "UNSPEC", 0x1: "TCP4", 0x2: "TCP6", 0x3: "UNIX"}


class ProxyHeaderError(ValueError):
    """Not a valid PROXY protocol header (the message says what is wrong)."""


@dataclass(frozen=True)
class ProxyHeader:
    """What one PROXY header says.

    :ivar version: 1 or 2.
    :ivar command: ``"PROXY"`` (relayed for a client) or ``"LOCAL"`` (v2: the proxy's own
        connection, such as a health check).
    :ivar family: ``"TCP4"``, ``"TCP6"``, ``"UNKNOWN"`` (v1), ``"UNSPEC"`` or ``"UNIX"`` (v2).
    :ivar source: the client's ``(address, port)``; None when the header names no client.
    :ivar destination: the address and port the client connected to; None likewise.
    """

    version: int
    command: str
    family: str
    source: tuple[str, int] | None = None
    destination: tuple[str, int] | None = None

    @property
    def names_client(self) -> bool:
        """False for LOCAL, UNKNOWN, UNSPEC and UNIX: the real peer is the client."""
        return self.source is not None


class ProxyHeaderParser:
    """Feed it the first bytes of a connection until it returns the header.

    ``feed(data)`` returns None while more bytes are needed, then ``(header, rest)`` where
    ``rest`` is what followed the header (the client's first bytes, or a TLS ClientHello).
    It raises :class:`ProxyHeaderError` as soon as the bytes cannot start a valid header.
    It holds at most one header's bytes (v1: 107; v2: 16 + its 16-bit length).
    """

    def __init__(self) -> None:
        self._buffer = b""
        self._done = False

    def feed(self, data: bytes) -> tuple[ProxyHeader, bytes] | None:
        if self._done:
            raise ProxyHeaderError("the header was already parsed")
        buffer = self._buffer + data
        if not buffer:
            return None
        if buffer[:1] == b"P":
            found = _feed_v1(buffer)
        elif buffer[:1] == b"\r":
            found = _feed_v2(buffer)
        else:
            raise ProxyHeaderError(f"not a PROXY header: starts with {bytes(buffer[:8])!r}")
        if found is None:
            self._buffer = buffer
            return None
        self._buffer = b""
        self._done = True
        return found


def _feed_v1(buffer: bytes) -> tuple[ProxyHeader, bytes] | None:
    start = buffer[: len(V1_PREFIX)]
    if not V1_PREFIX.startswith(start):
        raise ProxyHeaderError(f"not a PROXY header: starts with {bytes(buffer[:8])!r}")
    end = buffer.find(b"\r\n", 0, V1_MAX_LENGTH)
    if end < 0:
        if len(buffer) >= V1_MAX_LENGTH:
            raise ProxyHeaderError(f"v1 header without CRLF in {V1_MAX_LENGTH} bytes")
        if b"\n" in buffer or b"\r" in buffer[:-1]:
            raise ProxyHeaderError("v1 header with a bare CR or LF")
        return None
    return parse_v1(buffer[:end]), buffer[end + 2 :]


def parse_v1(line: bytes) -> ProxyHeader:
    """One v1 header line without its CRLF."""
    if not line.startswith(V1_PREFIX):
        raise ProxyHeaderError("v1 header must start with 'PROXY '")
    if b"\r" in line or b"\n" in line:
        raise ProxyHeaderError("v1 header with a bare CR or LF")
    try:
        text = line.decode("ascii")
    except UnicodeDecodeError:
        raise ProxyHeaderError("v1 header is not ASCII") from None
    fields = text.split(" ")
    if fields[1] == "UNKNOWN":
        # The rest of the line (if any) is to be ignored; the real peer is the client.
        return ProxyHeader(1, "PROXY", "UNKNOWN")
    if fields[1] not in ("TCP4", "TCP6"):
        raise ProxyHeaderError(f"v1 protocol must be TCP4, TCP6 or UNKNOWN, not {fields[1]!r}")
    if len(fields) != 6:
        raise ProxyHeaderError(f"v1 {fields[1]} header needs 4 single-space separated fields")
    version = 4 if fields[1] == "TCP4" else 6
    source = _v1_address(fields[2], version), _v1_port(fields[4])
    destination = _v1_address(fields[3], version), _v1_port(fields[5])
    return ProxyHeader(1, "PROXY", fields[1], source, destination)


def _v1_address(text: str, version: int) -> str:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        raise ProxyHeaderError(f"v1 header: not an IP address: {text!r}") from None
    if address.version != version:
        raise ProxyHeaderError(f"v1 header: {text!r} is not an IPv{version} address")
    return str(address)


def _v1_port(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or len(text) > 5 or text != str(int(text)):
        raise ProxyHeaderError(f"v1 header: not a port number: {text!r}")
    port = int(text)
    if port > 65535:
        raise ProxyHeaderError(f"v1 header: port out of range: {text!r}")
    return port


def _feed_v2(buffer: bytes) -> tuple[ProxyHeader, bytes] | None:
    signature = buffer[: len(V2_SIGNATURE)]
    if not V2_SIGNATURE.startswith(signature):
        raise ProxyHeaderError(f"not a PROXY header: starts with {bytes(buffer[:8])!r}")
    if len(buffer) < _V2_HEAD:
        return None
    (length,) = struct.unpack("!H", buffer[14:16])
    end = _V2_HEAD + length
    if len(buffer) < end:
        _v2_check_head(buffer[12], buffer[13], length)  # fail early, not after 64 KiB
        return None
    return parse_v2(buffer[:end]), buffer[end:]


def _v2_check_head(version_command: int, family_transport: int, length: int) -> None:
    if version_command >> 4 != 2:
        raise ProxyHeaderError(f"v2 header: version must be 2, not {version_command >> 4}")
    if version_command & 0xF not in (0x0, 0x1):
        raise ProxyHeaderError(f"v2 header: unknown command {version_command & 0xF:#x}")
    if version_command & 0xF == 0x0:
        return  # LOCAL: family and addresses are to be ignored
    family, transport = family_transport >> 4, family_transport & 0xF
    if family not in _V2_FAMILIES:
        raise ProxyHeaderError(f"v2 header: unknown address family {family:#x}")
    if transport not in (0x0, 0x1, 0x2):
        raise ProxyHeaderError(f"v2 header: unknown transport {transport:#x}")
    if family == 0x0:
        return  # UNSPEC: addresses are to be ignored
    if transport != 0x1:
        raise ProxyHeaderError("v2 header: only STREAM (TCP) connections can carry SMTP")
    if length < _V2_ADDRESS_LENGTHS[family]:
        raise ProxyHeaderError(
            f"v2 header: {length} address bytes, {_V2_FAMILIES[family]} needs "
            f"{_V2_ADDRESS_LENGTHS[family]}"
        )


def parse_v2(header: bytes) -> ProxyHeader:
    """One complete v2 header (16 bytes and the length they announce)."""
    if len(header) < _V2_HEAD or header[:12] != V2_SIGNATURE:
        raise ProxyHeaderError("v2 header: bad signature or too short")
    (length,) = struct.unpack("!H", header[14:16])
    if len(header) != _V2_HEAD + length:
        raise ProxyHeaderError("v2 header: length does not match")
    version_command, family_transport = header[12], header[13]
    _v2_check_head(version_command, family_transport, length)
    if version_command & 0xF == 0x0:
        return ProxyHeader(2, "LOCAL", _V2_FAMILIES.get(family_transport >> 4, "UNSPEC"))
    family = family_transport >> 4
    name = _V2_FAMILIES[family]
    body = header[_V2_HEAD:]
    if family == 0x1:
        source_ip, destination_ip, source_port, destination_port = struct.unpack(
            "!4s4sHH", body[:12]
        )
        return ProxyHeader(
            2,
            "PROXY",
            name,
            (str(ipaddress.IPv4Address(source_ip)), source_port),
            (str(ipaddress.IPv4Address(destination_ip)), destination_port),
        )
    if family == 0x2:
        source_ip, destination_ip, source_port, destination_port = struct.unpack(
            "!16s16sHH", body[:36]
        )
        return ProxyHeader(
            2,
            "PROXY",
            name,
            (str(ipaddress.IPv6Address(source_ip)), source_port),
            (str(ipaddress.IPv6Address(destination_ip)), destination_port),
        )
    # UNSPEC, or UNIX (a socket path is no client address): the proxy's own connection.
    return ProxyHeader(2, "PROXY", name)


def v1_header(source: tuple[str, int], destination: tuple[str, int]) -> bytes:
    """A v1 header for ``source`` -> ``destination`` (for tests and tools)."""
    version = ipaddress.ip_address(source[0]).version
    return (
        f"PROXY TCP{version} {source[0]} {destination[0]} {source[1]} {destination[1]}\r\n"
    ).encode("ascii")


def v2_header(
    source: tuple[str, int] | None = None,
    destination: tuple[str, int] | None = None,
    tlvs: bytes = b"",
) -> bytes:
    """A v2 header: PROXY for ``source`` -> ``destination``, or LOCAL without them."""
    if source is None or destination is None:
        return V2_SIGNATURE + bytes([0x20, 0x00]) + struct.pack("!H", len(tlvs)) + tlvs
    src, dst = ipaddress.ip_address(source[0]), ipaddress.ip_address(destination[0])
    family = 0x11 if src.version == 4 else 0x21
    body = src.packed + dst.packed + struct.pack("!HH", source[1], destination[1]) + tlvs
    return V2_SIGNATURE + bytes([0x21, family]) + struct.pack("!H", len(body)) + body

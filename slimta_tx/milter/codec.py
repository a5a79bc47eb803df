"""The Sendmail 8 milter protocol (version 6) on the wire, MTA side, without I/O.

Every packet is a 32-bit big-endian length, then one command byte, then ``length - 1`` bytes
of data. Strings are NUL-terminated. This module builds the packets the MTA sends
(:func:`packet` and the ``*_packet`` helpers), cuts what the milter sends into packets
(:class:`PacketReader`, with a size limit), and turns each of them into a typed
:class:`Response` (:func:`parse_response`), raising :class:`ProtocolError` for anything
malformed. Negotiation (:func:`optneg_packet`, :func:`parse_optneg`) and the check of a
milter's own SMTP reply (:func:`parse_reply_text`) live here too.

The constants carry the names the protocol documentation uses (``SMFIC_*`` commands,
``SMFIR_*`` responses, ``SMFIP_*`` protocol flags, ``SMFIF_*`` actions, ``SMFIM_*`` macro
stages), so the code reads against libmilter's ``mfdef.h`` and Postfix's ``milter8.c``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from slimta_tx.reply import Reply

__all__ = [
    "MTA_ACTIONS",
    "MTA_PROTOCOL",
    "VERSION",
    "Negotiated",
    "PacketReader",
    "ProtocolError",
    "Response",
    "packet",
    "parse_optneg",
    "parse_reply_text",
    "parse_response",
]

VERSION = 6

# Commands (MTA -> milter).
SMFIC_ABORT = b"A"
SMFIC_BODY = b"B"
SMFIC_CONNECT = b"C"
SMFIC_MACRO = b"D"
SMFIC_BODYEOB = b"E"
SMFIC_HELO = b"H"
SMFIC_QUIT_NC = b"K"
SMFIC_HEADER = b"L"
SMFIC_MAIL = b"M"
SMFIC_EOH = b"N"
SMFIC_OPTNEG = b"O"
SMFIC_QUIT = b"Q"
SMFIC_RCPT = b"R"
SMFIC_DATA = b"T"
SMFIC_UNKNOWN = b"U"

# Responses (milter -> MTA).
SMFIR_ADDRCPT = b"+"
SMFIR_DELRCPT = b"-"
SMFIR_ADDRCPT_PAR = b"2"
SMFIR_SHUTDOWN = b"4"
SMFIR_ACCEPT = b"a"
SMFIR_REPLBODY = b"b"
SMFIR_CONTINUE = b"c"
SMFIR_DISCARD = b"d"
SMFIR_CHGFROM = b"e"
SMFIR_CONN_FAIL = b"f"
SMFIR_ADDHEADER = b"h"
SMFIR_INSHEADER = b"i"
SMFIR_SETSYMLIST = b"l"
SMFIR_CHGHEADER = b"m"
SMFIR_PROGRESS = b"p"
SMFIR_QUARANTINE = b"q"
SMFIR_REJECT = b"r"
SMFIR_SKIP = b"s"
SMFIR_TEMPFAIL = b"t"
SMFIR_REPLYCODE = b"y"

# Protocol flags: events the milter does not want, replies it will not send, extras.
SMFIP_NOCONNECT = 0x1
SMFIP_NOHELO = 0x2
SMFIP_NOMAIL = 0x4
SMFIP_NORCPT = 0x8
SMFIP_NOBODY = 0x10
SMFIP_NOHDRS = 0x20
SMFIP_NOEOH = 0x40
SMFIP_NR_HDR = 0x80
SMFIP_NOUNKNOWN = 0x100
SMFIP_NODATA = 0x200
SMFIP_SKIP = 0x400
SMFIP_RCPT_REJ = 0x800
SMFIP_NR_CONN = 0x1000
SMFIP_NR_HELO = 0x2000
SMFIP_NR_MAIL = 0x4000
SMFIP_NR_RCPT = 0x8000
SMFIP_NR_DATA = 0x10000
SMFIP_NR_UNKN = 0x20000
SMFIP_NR_EOH = 0x40000
SMFIP_NR_BODY = 0x80000
SMFIP_HDR_LEADSPC = 0x100000
#: Everything this client understands (all of protocol version 6).
MTA_PROTOCOL = 0x1FFFFF

#: Each event: the flag that says "do not send it" and the flag that says "no reply to it".
EVENT_FLAGS = {
    SMFIC_CONNECT: (SMFIP_NOCONNECT, SMFIP_NR_CONN),
    SMFIC_HELO: (SMFIP_NOHELO, SMFIP_NR_HELO),
    SMFIC_MAIL: (SMFIP_NOMAIL, SMFIP_NR_MAIL),
    SMFIC_RCPT: (SMFIP_NORCPT, SMFIP_NR_RCPT),
    SMFIC_DATA: (SMFIP_NODATA, SMFIP_NR_DATA),
    SMFIC_UNKNOWN: (SMFIP_NOUNKNOWN, SMFIP_NR_UNKN),
    SMFIC_HEADER: (SMFIP_NOHDRS, SMFIP_NR_HDR),
    SMFIC_EOH: (SMFIP_NOEOH, SMFIP_NR_EOH),
    SMFIC_BODY: (SMFIP_NOBODY, SMFIP_NR_BODY),
    SMFIC_BODYEOB: (0, 0),
}

# Actions the milter may ask for at the end of the message.
SMFIF_ADDHDRS = 0x1
SMFIF_CHGBODY = 0x2
SMFIF_ADDRCPT = 0x4
SMFIF_DELRCPT = 0x8
SMFIF_CHGHDRS = 0x10
SMFIF_QUARANTINE = 0x20
SMFIF_CHGFROM = 0x40
SMFIF_ADDRCPT_PAR = 0x80
SMFIF_SETSYMLIST = 0x100
#: Every action this client carries out.
MTA_ACTIONS = 0x1FF

# Macro stages (in the negotiation reply's macro lists).
SMFIM_CONNECT = 0
SMFIM_HELO = 1
SMFIM_ENVFROM = 2
SMFIM_ENVRCPT = 3
SMFIM_DATA = 4
SMFIM_EOM = 5
SMFIM_EOH = 6
#: The command whose macros each stage's list names.
STAGE_COMMANDS = {
    SMFIM_CONNECT: SMFIC_CONNECT,
    SMFIM_HELO: SMFIC_HELO,
    SMFIM_ENVFROM: SMFIC_MAIL,
    SMFIM_ENVRCPT: SMFIC_RCPT,
    SMFIM_DATA: SMFIC_DATA,
    SMFIM_EOM: SMFIC_BODYEOB,
    SMFIM_EOH: SMFIC_EOH,
}

# Address families in the CONNECT packet.
FAMILY_UNKNOWN = b"U"
FAMILY_UNIX = b"L"
FAMILY_INET = b"4"
FAMILY_INET6 = b"6"

#: Body chunks sent to the milter are at most this big (libmilter's MILTER_CHUNK_SIZE).
CHUNK_SIZE = 65535
#: Largest packet accepted from a milter. libmilter never sends more than 64 KiB of data in
#: one packet unless a bigger size was negotiated (this client never offers one).
MAX_PACKET = 1024 * 1024

_LENGTH = struct.Struct(">I")
_OPTNEG = struct.Struct(">III")


class ProtocolError(Exception):
    """The milter sent something this client cannot accept (the milter is then failed)."""


def packet(command: bytes, data: bytes = b"") -> bytes:
    """One packet: length, command byte, data."""
    return _LENGTH.pack(len(data) + 1) + command + data


def _z(text: str | bytes) -> bytes:
    """``text`` as a NUL-terminated string (a NUL inside would cut it: replaced by '?')."""
    raw = text.encode("utf-8", "surrogateescape") if isinstance(text, str) else text
    return raw.replace(b"\0", b"?") + b"\0"


def optneg_packet(
    version: int = VERSION, actions: int = MTA_ACTIONS, protocol: int = MTA_PROTOCOL
) -> bytes:
    return packet(SMFIC_OPTNEG, _OPTNEG.pack(version, actions, protocol))


def macro_packet(command: bytes, macros: list[tuple[str, str]]) -> bytes:
    """Macro definitions for the event ``command`` (sent just before it)."""
    return packet(SMFIC_MACRO, command + macro_data(macros))


def macro_data(macros: list[tuple[str, str]]) -> bytes:
    """The ``name\0value\0`` pairs of a macro packet (a NUL inside one becomes '?')."""
    text = "".join(f"{k}\0{v}\0" if "\0" not in k + v else _nul_free(k, v) for k, v in macros)
    return text.encode("utf-8", "surrogateescape")


def _nul_free(name: str, value: str) -> str:
    return f"{name.replace(chr(0), '?')}\0{value.replace(chr(0), '?')}\0"


def connect_packet(hostname: str, family: bytes, port: int, address: str) -> bytes:
    data = _z(hostname) + family
    if family != FAMILY_UNKNOWN:
        data += struct.pack(">H", port & 0xFFFF) + _z(address)
    return packet(SMFIC_CONNECT, data)


def helo_packet(name: str) -> bytes:
    return packet(SMFIC_HELO, _z(name))


def args_packet(command: bytes, args: list[str]) -> bytes:
    """MAIL or RCPT: ``<address>`` then each ESMTP argument, each NUL-terminated."""
    return packet(command, b"".join(_z(a) for a in args))


def header_packet(name: bytes, value: bytes) -> bytes:
    return packet(SMFIC_HEADER, _z(name) + _z(value))


def unknown_packet(line: str) -> bytes:
    return packet(SMFIC_UNKNOWN, _z(line))


class PacketReader:
    """Cuts a byte stream into ``(command, data)`` packets; refuses oversized ones at once."""

    def __init__(self, max_packet: int = MAX_PACKET) -> None:
        self.max_packet = max_packet
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[tuple[bytes, bytes]]:
        """The packets completed by ``data``; raises ProtocolError on a bad length."""
        buffer = self._buffer
        if buffer:
            buffer += data
            if len(buffer) < 4 or len(buffer) < 4 + self._length(buffer, 0):
                return []  # (a big packet arriving in pieces is not copied for each)
            data = bytes(buffer)
            buffer.clear()
        out = []
        pos, size = 0, len(data)
        while size - pos >= 4:
            end = pos + 4 + self._length(data, pos)
            if size < end:
                break
            out.append((data[pos + 4 : pos + 5], data[pos + 5 : end]))
            pos = end
        if pos < size:
            buffer += memoryview(data)[pos:]
        return out

    def _length(self, data: bytes | bytearray, pos: int) -> int:
        (length,) = _LENGTH.unpack_from(data, pos)
        if length < 1:
            raise ProtocolError("packet of length 0")
        if length > self.max_packet:
            raise ProtocolError(f"packet of {length} bytes (limit {self.max_packet})")
        return int(length)

    @property
    def buffered(self) -> int:
        return len(self._buffer)


@dataclass(frozen=True)
class Negotiated:
    """What the milter answered to the option negotiation."""

    version: int
    actions: int
    protocol: int
    #: Macro names the milter asks for, per command (overriding the defaults).
    macros: dict[bytes, tuple[str, ...]] = field(default_factory=dict)


def parse_optneg(command: bytes, data: bytes, offered_actions: int = MTA_ACTIONS) -> Negotiated:
    """Check the milter's negotiation reply (as Postfix does) and read its macro lists."""
    if command != SMFIC_OPTNEG:
        raise ProtocolError(f"expected the negotiation reply, got {command!r}")
    if len(data) < _OPTNEG.size:
        raise ProtocolError(f"negotiation reply of {len(data)} bytes (need 12)")
    version, actions, protocol = _OPTNEG.unpack_from(data)
    if version < 2 or version > VERSION:
        raise ProtocolError(f"protocol version {version} (this client speaks 2 to {VERSION})")
    if actions & ~offered_actions:
        raise ProtocolError(
            f"milter wants actions {actions:#x}, more than offered ({offered_actions:#x})"
        )
    macros: dict[bytes, tuple[str, ...]] = {}
    rest = data[_OPTNEG.size :]
    while rest:
        if len(rest) < 5:
            raise ProtocolError("truncated macro list in the negotiation reply")
        (stage,) = _LENGTH.unpack_from(rest)
        names, rest = _string(rest[4:], "macro list")
        if stage in STAGE_COMMANDS:
            macros[STAGE_COMMANDS[stage]] = tuple(names.decode("utf-8", "replace").split())
        # An unknown stage is ignored (as Postfix does).
    return Negotiated(version, actions, protocol & MTA_PROTOCOL, macros)


def _string(data: bytes, what: str) -> tuple[bytes, bytes]:
    end = data.find(b"\0")
    if end < 0:
        raise ProtocolError(f"{what}: string without its NUL terminator")
    return data[:end], data[end + 1 :]


# -- responses -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Response:
    """One packet from the milter, decoded.

    ``kind`` names it: ``continue``, ``accept``, ``reject``, ``tempfail``, ``discard``,
    ``replycode`` (``reply``), ``quarantine`` (``text``), ``skip``, ``progress``,
    ``shutdown``, ``conn_fail``, or a modification: ``add_header``, ``insert_header``,
    ``change_header`` (``index``, ``name``, ``value``), ``change_from``, ``add_rcpt``
    (``address``, ``args``), ``delete_rcpt`` (``address``), ``replace_body`` (``data``).
    """

    kind: str
    index: int = 0
    name: bytes = b""
    value: bytes = b""
    address: str = ""
    args: tuple[str, ...] = ()
    text: str = ""
    data: bytes = b""
    reply: Reply | None = None

    @property
    def is_modification(self) -> bool:
        return self.kind in _MODIFICATIONS

    @property
    def is_final(self) -> bool:
        """A decision that ends the wait for this event."""
        return self.kind in _FINAL


_MODIFICATIONS = frozenset(
    {
        "add_header",
        "insert_header",
        "change_header",
        "change_from",
        "add_rcpt",
        "delete_rcpt",
        "replace_body",
    }
)
_FINAL = frozenset(
    {
        "continue",
        "accept",
        "reject",
        "tempfail",
        "discard",
        "replycode",
        "skip",
        "shutdown",
        "conn_fail",
    }
)
_SIMPLE = {
    SMFIR_CONTINUE: "continue",
    SMFIR_ACCEPT: "accept",
    SMFIR_REJECT: "reject",
    SMFIR_TEMPFAIL: "tempfail",
    SMFIR_DISCARD: "discard",
    SMFIR_SKIP: "skip",
    SMFIR_PROGRESS: "progress",
    SMFIR_SHUTDOWN: "shutdown",
    SMFIR_CONN_FAIL: "conn_fail",
}

_SIMPLE_RESPONSES = {command: Response(kind) for command, kind in _SIMPLE.items()}


def parse_response(command: bytes, data: bytes) -> Response:
    """Decode one packet from the milter; ProtocolError if it is malformed or unknown."""
    simple = _SIMPLE_RESPONSES.get(command)
    if simple is not None:
        if data:
            raise ProtocolError(f"{simple.kind} response followed by {len(data)} data bytes")
        return simple  # (immutable: one per kind)
    if command == SMFIR_REPLYCODE:
        text, rest = _string(data, "reply")
        _nothing_left(rest, "reply")
        reply = parse_reply_text(text)
        if reply is None:
            raise ProtocolError(f"malformed SMTP reply from the milter: {text[:200]!r}")
        return Response("replycode", reply=reply)
    if command == SMFIR_QUARANTINE:
        text, rest = _string(data, "quarantine reason")
        _nothing_left(rest, "quarantine")
        return Response("quarantine", text=text.decode("utf-8", "replace"))
    if command in (SMFIR_ADDHEADER, SMFIR_INSHEADER, SMFIR_CHGHEADER):
        index = 0
        if command != SMFIR_ADDHEADER:
            if len(data) < 4:
                raise ProtocolError("header change without its index")
            (index,) = _LENGTH.unpack_from(data)
            data = data[4:]
        name, rest = _string(data, "header name")
        value, rest = _string(rest, "header value")
        _nothing_left(rest, "header")
        kind = {
            SMFIR_ADDHEADER: "add_header",
            SMFIR_INSHEADER: "insert_header",
            SMFIR_CHGHEADER: "change_header",
        }[command]
        return Response(kind, index=index, name=name, value=value)
    if command in (SMFIR_CHGFROM, SMFIR_ADDRCPT, SMFIR_ADDRCPT_PAR, SMFIR_DELRCPT):
        address, rest = _string(data, "address")
        args: tuple[str, ...] = ()
        if rest and command in (SMFIR_CHGFROM, SMFIR_ADDRCPT_PAR):
            raw_args, rest = _string(rest, "ESMTP arguments")
            args = tuple(raw_args.decode("utf-8", "replace").split())
        _nothing_left(rest, "address")
        kind = {
            SMFIR_CHGFROM: "change_from",
            SMFIR_ADDRCPT: "add_rcpt",
            SMFIR_ADDRCPT_PAR: "add_rcpt",
            SMFIR_DELRCPT: "delete_rcpt",
        }[command]
        return Response(kind, address=address.decode("utf-8", "replace"), args=args)
    if command == SMFIR_REPLBODY:
        return Response("replace_body", data=data)
    raise ProtocolError(f"unknown response {command!r}")


def _nothing_left(rest: bytes, what: str) -> None:
    if rest:
        raise ProtocolError(f"{what}: {len(rest)} unexpected bytes after the data")


def parse_reply_text(raw: bytes) -> Reply | None:
    """The milter's own SMTP reply (``SMFIR_REPLYCODE``), or None if it is not sane.

    Each line is ``4xx`` or ``5xx``, a ``-`` on every line but the last and a space on the
    last, all lines with the same code; lines are separated by CRLF; an enhanced status code,
    if present, has the code's class. ``%%`` (Sendmail's format-string escape) becomes ``%``.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    lines = text.split("\r\n")
    code = lines[0][:3]
    if not (len(code) == 3 and code[0] in "45" and code.isdigit()):
        return None
    esc: str | None = None
    texts = []
    for i, line in enumerate(lines):
        final = i == len(lines) - 1
        if (
            len(line) < 4
            or line[:3] != code
            or line[3] != (" " if final else "-")
            or "\r" in line
            or "\n" in line
        ):
            return None
        rest = line[4:]
        first, _, after = rest.partition(" ")
        if first[:1].isdigit():
            parts = first.split(".")
            if len(parts) != 3 or not all(p.isdigit() and 0 < len(p) <= 3 for p in parts):
                return None
            if parts[0] != code[0]:
                return None
            if esc is None:
                esc = first
            rest = after
        texts.append(_unescape_percent(rest.strip()))
    return Reply(code, "\n".join(texts), esc)


def _unescape_percent(text: str) -> str:
    out = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "%":
            if i + 1 < len(text) and text[i + 1] == "%":
                out.append("%")
                i += 2
                continue
            i += 1  # a lone % (invalid in Sendmail's format): dropped, as Postfix does
            continue
        out.append(ch)
        i += 1
    return "".join(out)

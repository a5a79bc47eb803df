"""Delivery Status Notification parameters (RFC 3461), with RFC 6533's UTF-8 addresses.

Sans-I/O: the grammar of the four parameters, their typed values, and their encoding when a
message is passed on.

- ``MAIL ... RET=FULL|HDRS``: how much of the message a failure notice returns.
- ``MAIL ... ENVID=<xtext>``: the sender's id of the transaction (at most 100 characters).
- ``RCPT ... NOTIFY=NEVER`` or a list of ``SUCCESS``, ``FAILURE``, ``DELAY``.
- ``RCPT ... ORCPT=<addr-type>;<value>`` (at most 500 characters): the recipient as the sender
  first named it. For ``rfc822`` (and unknown types) the value is xtext (``+XX`` escapes);
  for ``utf-8`` (RFC 6533) it is utf-8-addr-xtext (``\\x{HEX}`` escapes, ASCII only) or, in an
  SMTPUTF8 transaction, utf-8-addr-unitext (UTF-8 as it is, escapes allowed).

A value that breaks the grammar raises :class:`DsnError`; the server answers 501 5.5.4.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from slimta_tx.address import xtext_decode, xtext_encode

__all__ = [
    "MAX_ENVID",
    "MAX_ORCPT",
    "NOTIFY_KEYWORDS",
    "DsnError",
    "OriginalRecipient",
    "RecipientDsn",
    "parse_envid",
    "parse_notify",
    "parse_orcpt",
    "parse_ret",
    "utf8_addr_xtext_decode",
    "utf8_addr_xtext_encode",
]

MAX_ENVID = 100  # RFC 3461 4.4
MAX_ORCPT = 500  # RFC 3461 4.2
NOTIFY_KEYWORDS = ("SUCCESS", "FAILURE", "DELAY")
_RET_VALUES = ("FULL", "HDRS")
# addr-type = atom (RFC 3461 4.2 refers to RFC 822's atom: printable ASCII but specials).
_ADDR_TYPE = re.compile(r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]+\Z")
# RFC 6533 3: QCHAR is printable ASCII except "+", "=" and "\"; escapes are \x{HEX}.
_QCHAR = frozenset(c for c in range(0x21, 0x7F) if c not in (0x2B, 0x3D, 0x5C))
_EMBEDDED = re.compile(r"\\x\{([0-9A-Fa-f]{1,6})\}")


class DsnError(ValueError):
    """A DSN parameter value that breaks RFC 3461 (or RFC 6533); the text says which."""


@dataclass(frozen=True)
class OriginalRecipient:
    """An ORCPT value: its address type (lower case) and the address, decoded."""

    addr_type: str
    address: str

    def to_param(self, smtputf8: bool = False) -> str:
        """The ``ORCPT=`` value for a next hop (``smtputf8``: the transaction is SMTPUTF8)."""
        if self.addr_type == "utf-8":
            value = self.address if smtputf8 else utf8_addr_xtext_encode(self.address)
            return f"utf-8;{value}"
        return f"{self.addr_type};{xtext_encode(self.address)}"

    def report_field(self) -> str:
        """The ``Original-Recipient:`` value of a delivery report (RFC 3464, RFC 6533)."""
        return f"{self.addr_type};{self.address}"

    @classmethod
    def for_address(cls, address: str) -> OriginalRecipient:
        """The ORCPT a relay may add for a recipient that came without one (RFC 3461 5.2.1)."""
        return cls("rfc822" if address.isascii() else "utf-8", address)


@dataclass(frozen=True)
class RecipientDsn:
    """A recipient's DSN request: ``notify`` (None: not given) and ``orcpt``."""

    notify: frozenset[str] | None = None
    orcpt: OriginalRecipient | None = None

    @property
    def success_requested(self) -> bool:
        return self.notify is not None and "SUCCESS" in self.notify


def parse_ret(value: str | None) -> str:
    """``FULL`` or ``HDRS`` (any case), upper-cased."""
    ret = (value or "").upper()
    if ret not in _RET_VALUES:
        raise DsnError("Syntax: RET=FULL or RET=HDRS")
    return ret


def parse_envid(value: str | None) -> str:
    """The envelope id, xtext-decoded."""
    if not value or len(value) > MAX_ENVID:
        raise DsnError(f"Syntax: ENVID=<xtext of 1 to {MAX_ENVID} characters>")
    try:
        return xtext_decode(value)
    except ValueError:
        raise DsnError("Syntax: ENVID=<xtext>: bad character or +XX escape") from None


def parse_notify(value: str | None) -> frozenset[str]:
    """``NEVER``, or a comma-separated list of ``SUCCESS``, ``FAILURE`` and ``DELAY``."""
    words = (value or "").upper().split(",")
    if words == ["NEVER"]:
        return frozenset(words)
    if not all(word in NOTIFY_KEYWORDS for word in words):
        raise DsnError("Syntax: NOTIFY=NEVER or NOTIFY=SUCCESS,FAILURE,DELAY (any of them)")
    return frozenset(words)


def parse_orcpt(value: str | None, smtputf8: bool = False) -> OriginalRecipient:
    """``addr-type;value``: xtext, or for ``utf-8`` utf-8-addr-xtext (utf-8-addr-unitext in an
    SMTPUTF8 transaction)."""
    text = value or ""
    addr_type, semicolon, encoded = text.partition(";")
    if not semicolon or not _ADDR_TYPE.match(addr_type) or not encoded:
        raise DsnError("Syntax: ORCPT=<addr-type>;<address>")
    if len(text) > MAX_ORCPT:
        raise DsnError(f"ORCPT longer than {MAX_ORCPT} characters")
    addr_type = addr_type.lower()
    try:
        if addr_type == "utf-8":
            address = utf8_addr_xtext_decode(encoded, unitext=smtputf8)
        else:
            address = xtext_decode(encoded)
    except ValueError:
        raise DsnError(f"Syntax: ORCPT={addr_type};<bad encoding of the address>") from None
    if not address:
        raise DsnError("Syntax: ORCPT=<addr-type>;<address>")
    return OriginalRecipient(addr_type, address)


def utf8_addr_xtext_decode(value: str, unitext: bool = False) -> str:
    """RFC 6533 utf-8-addr-xtext (``unitext``: utf-8-addr-unitext) -> the UTF-8 address."""
    out: list[str] = []
    pos = 0
    while pos < len(value):
        char = value[pos]
        if char == "\\":
            match = _EMBEDDED.match(value, pos)
            if match is None:
                raise ValueError("bad \\x{HEX} escape")
            point = int(match[1], 16)
            if point == 0 or point > 0x10FFFF or 0xD800 <= point <= 0xDFFF:
                raise ValueError("escape is not a Unicode scalar value")
            out.append(chr(point))
            pos = match.end()
            continue
        code = ord(char)
        if code in _QCHAR or (unitext and code > 0x7F):
            out.append(char)
            pos += 1
            continue
        raise ValueError(f"character {char!r} must be escaped")
    return "".join(out)


def utf8_addr_xtext_encode(address: str) -> str:
    """The UTF-8 address as RFC 6533 utf-8-addr-xtext (ASCII only)."""
    return "".join(char if ord(char) in _QCHAR else f"\\x{{{ord(char):02X}}}" for char in address)

"""RFC 5321 paths and ESMTP parameters, parsed without I/O.

``parse_mail_argument("FROM:<a@b> SIZE=10")`` returns the sender and its parameters, or raises
:class:`ArgumentError` carrying the exact reply the client should get. The grammar is RFC 5321
section 4.1.2 (with RFC 6531's UTF-8 additions when the client asked for SMTPUTF8) and the
limits are section 4.5.3.1: local part 64 octets, domain 255, path 256.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field

from slimta_tx.reply import Reply

__all__ = [
    "ArgumentError",
    "MailArgument",
    "parse_mail_argument",
    "parse_path",
    "parse_rcpt_argument",
    "split_address",
    "xtext_decode",
    "xtext_encode",
]

MAX_LOCAL_PART = 64
MAX_DOMAIN = 255
MAX_PATH = 256


class ArgumentError(ValueError):
    """An argument the server must refuse; ``reply`` is what the client gets."""

    def __init__(self, code: str, esc: str, message: str) -> None:
        super().__init__(message)
        self.reply = Reply(code, message, esc)


@dataclass
class MailArgument:
    """A parsed MAIL FROM or RCPT TO argument.

    :ivar address: the mailbox without angle brackets; ``""`` is the null reverse path.
    :ivar params: ESMTP parameters, keyword upper-cased, value ``None`` for a bare keyword.
    """

    address: str
    params: dict[str, str | None] = field(default_factory=dict)

    @property
    def utf8(self) -> bool:
        """True if the address holds non-ASCII characters (RFC 6531)."""
        return not self.address.isascii()


# RFC 5321 4.1.2 (atext from RFC 5322 3.2.3).
_ATEXT = r"A-Za-z0-9!#$%&'*+\-/=?^_`{|}~"
_ATOM_ASCII = re.compile(rf"[{_ATEXT}]+(?:\.[{_ATEXT}]+)*\Z")
_ATOM_UTF8 = re.compile(rf"(?:[{_ATEXT}]|[^\x00-\x7f])+(?:\.(?:[{_ATEXT}]|[^\x00-\x7f])+)*\Z")
# qtextSMTP = %d32-33 / %d35-91 / %d93-126, quoted-pairSMTP = "\" %d32-126
_QUOTED_ASCII = re.compile(r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*"\Z')
_QUOTED_UTF8 = re.compile(r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|[^\x00-\x7f]|\\[\x20-\x7e])*"\Z')
_LABEL_ASCII = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?\Z")
_LABEL_UTF8 = re.compile(
    r"(?:[A-Za-z0-9]|[^\x00-\x7f])(?:(?:[A-Za-z0-9-]|[^\x00-\x7f])*"
    r"(?:[A-Za-z0-9]|[^\x00-\x7f]))?\Z"
)
_GENERAL_LITERAL = re.compile(r"[A-Za-z0-9-]*[A-Za-z0-9]:[\x21-\x5a\x5e-\x7e]+\Z")
_KEYWORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*\Z")
_VALUE_ASCII = re.compile(r"[\x21-\x3c\x3e-\x7e]+\Z")
_VALUE_UTF8 = re.compile(r"(?:[\x21-\x3c\x3e-\x7e]|[^\x00-\x7f])+\Z")

# The common case in one match: an ASCII dot-atom local part and a domain name whose labels
# are 1 to 63 characters. Every path these match, the full parser accepts and returns the same
# way (the local part holds no "@", quote or ">"); anything else takes the full parser.
_SHORT_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_COMMON_PATH = rf" *<(([{_ATEXT}]+(?:\.[{_ATEXT}]+)*)@{_SHORT_LABEL}(?:\.{_SHORT_LABEL})*)>"
_COMMON_FROM = re.compile(rf"[Ff][Rr][Oo][Mm]:{_COMMON_PATH}")
_COMMON_TO = re.compile(rf"[Tt][Oo]:{_COMMON_PATH}")


def _utf8_len(text: str) -> int:
    # isascii() is O(1) on str; almost every address is ASCII.
    return len(text) if text.isascii() else len(text.encode("utf-8"))


def is_valid_domain(domain: str, utf8: bool = False) -> bool:
    """Domain or address literal per RFC 5321 (U-labels allowed when ``utf8``)."""
    if not domain or _utf8_len(domain) > MAX_DOMAIN:
        return False
    if domain.startswith("["):
        return _is_address_literal(domain)
    label = _LABEL_UTF8 if utf8 else _LABEL_ASCII
    return all(label.match(part) and _utf8_len(part) <= 63 for part in domain.split("."))


def _is_address_literal(literal: str) -> bool:
    if not literal.endswith("]"):
        return False
    inner = literal[1:-1]
    if inner[:5].upper() == "IPV6:":
        if "%" in inner:
            return False  # ipaddress accepts a scope id ("fe80::1%anything"); RFC 5321 does not
        try:
            ipaddress.IPv6Address(inner[5:])
        except ValueError:
            return False
        return True
    try:
        ipaddress.IPv4Address(inner)
    except ValueError:
        return bool(_GENERAL_LITERAL.match(inner)) and ":" in inner
    return True


def split_address(address: str) -> tuple[str, str]:
    """``"a@b"`` -> ``("a", "b")``; the split is at the last ``@`` (quoted parts may hold one)."""
    local, sep, domain = address.rpartition("@")
    if not sep:
        return address, ""
    return local, domain


def _bad_path(kind: str) -> ArgumentError:
    if kind == "MAIL":
        return ArgumentError("501", "5.1.7", "Bad sender address syntax")
    return ArgumentError("501", "5.1.3", "Bad recipient address syntax")


def parse_path(path: str, kind: str, utf8: bool = False) -> str:
    """Validate ``<...>`` and return the mailbox inside (``""`` for ``<>`` after MAIL).

    A source route (``<@a,@b:user@c>``) is accepted and dropped, as RFC 5321 section 4.1.1.3
    allows. ``<Postmaster>`` without a domain is a valid RCPT path.
    """
    if _utf8_len(path) > MAX_PATH:
        raise ArgumentError("501", "5.5.4" if kind == "MAIL" else "5.1.3", "Path too long")
    if len(path) < 2 or path[0] != "<" or path[-1] != ">":
        raise ArgumentError("501", "5.5.4", "Syntax: address must be enclosed in <>")
    inner = path[1:-1]
    if inner == "":
        if kind == "MAIL":
            return ""
        raise _bad_path(kind)
    if inner.startswith("@"):
        route, colon, rest = inner.partition(":")
        if not colon or not all(
            hop.startswith("@") and is_valid_domain(hop[1:], utf8) for hop in route.split(",")
        ):
            raise _bad_path(kind)
        inner = rest
    if kind == "RCPT" and inner.lower() == "postmaster":
        return inner
    local, domain = split_address(inner)
    if not local or not domain:
        raise _bad_path(kind)
    if _utf8_len(local) > MAX_LOCAL_PART:
        raise ArgumentError("501", "5.1.7" if kind == "MAIL" else "5.1.3", "Local part too long")
    if local.startswith('"'):
        ok = (_QUOTED_UTF8 if utf8 else _QUOTED_ASCII).match(local)
    else:
        ok = (_ATOM_UTF8 if utf8 else _ATOM_ASCII).match(local)
    if not ok or not is_valid_domain(domain, utf8):
        raise _bad_path(kind)
    return inner


def _parse_params(words: list[str], utf8: bool) -> dict[str, str | None]:
    params: dict[str, str | None] = {}
    for word in words:
        keyword, eq, value = word.partition("=")
        if not _KEYWORD.match(keyword):
            raise ArgumentError("501", "5.5.4", f"Syntax error in parameter {keyword[:32]!r}")
        key = keyword.upper()
        if key in params:
            raise ArgumentError("501", "5.5.4", f"Duplicate parameter {key}")
        if eq:
            if not (_VALUE_UTF8 if utf8 else _VALUE_ASCII).match(value):
                raise ArgumentError("501", "5.5.4", f"Syntax error in value of {key}")
            params[key] = value
        else:
            params[key] = None
    return params


def _split_argument(argument: str, prefix: str) -> tuple[str, list[str]]:
    if argument[: len(prefix)].upper() != prefix:
        raise ArgumentError("501", "5.5.4", f"Syntax: {prefix}<address> [parameters]")
    rest = argument[len(prefix) :]
    # RFC 5321 has no space after the colon; many clients send one, as every MTA tolerates.
    rest = rest.lstrip(" ")
    if not rest.startswith("<"):
        raise ArgumentError("501", "5.5.4", f"Syntax: {prefix}<address> [parameters]")
    # The path ends at the first ">" that is not inside a quoted local part.
    in_quote = escaped = False
    end = rest.find(">") if '"' not in rest else -1
    for i, ch in enumerate(rest if end < 0 else ""):
        if escaped:
            escaped = False
        elif ch == "\\" and in_quote:
            escaped = True
        elif ch == '"':
            in_quote = not in_quote
        elif ch == ">" and not in_quote:
            end = i
            break
    if end < 0:
        raise ArgumentError("501", "5.5.4", "Syntax: address must be enclosed in <>")
    path, tail = rest[: end + 1], rest[end + 1 :]
    if tail and not tail.startswith(" "):
        raise ArgumentError("501", "5.5.4", "Syntax error after address")
    # Only SP separates parameters (str.split() would also split on TAB, VT, FS, ...).
    return path, [word for word in tail.split(" ") if word]


def _common(pattern: re.Pattern[str], argument: str) -> tuple[str, list[str]] | None:
    """The mailbox and parameter words of a common-case argument; None: use the full parser."""
    match = pattern.match(argument)
    if match is None:
        return None
    mailbox = match[1]
    if len(mailbox) > MAX_PATH - 2 or len(match[2]) > MAX_LOCAL_PART:
        return None  # the full parser says which limit
    end = match.end()
    if end == len(argument):
        return mailbox, []
    if argument[end] != " ":
        return None  # "Syntax error after address"
    return mailbox, [word for word in argument[end:].split(" ") if word]


def parse_mail_argument(argument: str) -> MailArgument:
    """Parse the argument of ``MAIL``: ``FROM:<path> [params]``.

    Non-ASCII is accepted in the path only with the ``SMTPUTF8`` parameter (RFC 6531 3.4).
    """
    common = _common(_COMMON_FROM, argument)
    if common is not None:
        mailbox, words = common
        if not words:
            return MailArgument(mailbox, {})
        params = _parse_params(words, utf8=True)
        if "SMTPUTF8" not in params and not all(w.isascii() for w in words):
            raise ArgumentError("553", "5.6.7", "Non-ASCII address requires SMTPUTF8")
        return MailArgument(mailbox, params)
    path, words = _split_argument(argument, "FROM:")
    params = _parse_params(words, utf8=True)
    utf8 = "SMTPUTF8" in params
    if not utf8 and not (path.isascii() and all(w.isascii() for w in words)):
        raise ArgumentError("553", "5.6.7", "Non-ASCII address requires SMTPUTF8")
    return MailArgument(parse_path(path, "MAIL", utf8), params)


def parse_rcpt_argument(argument: str, utf8: bool = False) -> MailArgument:
    """Parse the argument of ``RCPT``: ``TO:<path> [params]``.

    ``utf8`` says whether the transaction's MAIL carried ``SMTPUTF8``.
    """
    common = _common(_COMMON_TO, argument)
    if common is not None:
        mailbox, words = common
        if not words:
            return MailArgument(mailbox, {})
        if not utf8 and not all(w.isascii() for w in words):
            raise ArgumentError("553", "5.6.7", "Non-ASCII address requires SMTPUTF8")
        return MailArgument(mailbox, _parse_params(words, utf8))
    path, words = _split_argument(argument, "TO:")
    if not utf8 and not (path.isascii() and all(w.isascii() for w in words)):
        raise ArgumentError("553", "5.6.7", "Non-ASCII address requires SMTPUTF8")
    params = _parse_params(words, utf8)
    return MailArgument(parse_path(path, "RCPT", utf8), params)


_XCHAR_OK = {c for c in range(33, 127) if c not in (ord("+"), ord("="))}


def xtext_decode(value: str) -> str:
    """Decode RFC 3461 xtext (``+XX`` hex escapes); raises ValueError when malformed."""
    out = bytearray()
    i = 0
    raw = value.encode("ascii")
    while i < len(raw):
        c = raw[i]
        if c == ord("+"):
            hexpair = raw[i + 1 : i + 3]
            if len(hexpair) != 2 or not re.fullmatch(rb"[0-9A-F]{2}", hexpair):
                raise ValueError("bad xtext escape")
            out.append(int(hexpair, 16))
            i += 3
        elif c in _XCHAR_OK:
            out.append(c)
            i += 1
        else:
            raise ValueError("bad xtext character")
    return out.decode("utf-8")


def xtext_encode(value: str) -> str:
    """Encode a string as RFC 3461 xtext."""
    return "".join(chr(b) if b in _XCHAR_OK else f"+{b:02X}" for b in value.encode("utf-8"))

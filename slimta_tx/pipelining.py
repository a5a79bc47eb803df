"""Pipelining discipline: refuse clients that do not wait where RFC 2920 says they must.

RFC 2920 3.1 lets a client send RSET, MAIL and RCPT anywhere in a group of commands, but EHLO,
DATA, VRFY, EXPN, TURN, QUIT and NOOP only last, since what follows depends on their reply;
RFC 3207 says the same of STARTTLS and RFC 4954 4 of AUTH (unless it carries an initial
response). Message content is allowed only after the 354 (it may be the first "command" of the
next group). A client that sends anything after such a command before its reply (message
content before the 354, commands after DATA, MAIL after EHLO) is broken or a spambot. It is
also how SMTP smuggling reaches a server: an upstream that takes ``LF . LF`` as content relays
the attacker's "second message" (``MAIL``, ``RCPT``, ``DATA``, content) in one stream.

As Postfix 3.9 does (``smtpd_forbid_unauth_pipelining = yes``), such a client gets
``554 5.5.0 Error: SMTP protocol synchronization`` and is disconnected; what it sent ahead is
never acted on. The check applies to clients neither in a trusted network nor authenticated,
unless ``Policy(forbid_improper_pipelining=False)`` (``--allow-improper-pipelining``).

When the check looks: as a command that must be last is read (whatever followed it in the
same read, or waits unread in the kernel's socket buffer on plain TCP); for DATA, just before
its reply goes out (so content that arrived while a DATA validator was deciding counts too).
Anything the server holds then was sent before the client could have seen the reply, so a
client that waits is never refused. QUIT is not checked: nothing after it is read anyway.
"""

from __future__ import annotations

import fcntl
import struct
import termios
from typing import TYPE_CHECKING, Any

from twisted.internet import tcp

from slimta_tx.reply import Reply

if TYPE_CHECKING:  # pragma: no cover
    from slimta_tx.protocol import ESMTPServerProtocol

__all__ = [
    "CHECKED_WHEN_READ",
    "MUST_BE_LAST",
    "SYNCHRONIZATION_ERROR",
    "content_before_354",
    "improper",
]


#: Commands after which a client must wait for the reply (RFC 2920 3.1, RFC 3207, RFC 4954 4;
#: LHLO is LMTP's EHLO). QUIT is left out (nothing after it is read), and so are EXPN and TURN,
#: which this server does not implement (502 changes nothing a client could wait for).
MUST_BE_LAST = frozenset({"EHLO", "HELO", "LHLO", "DATA", "VRFY", "NOOP", "STARTTLS", "AUTH"})
#: Checked as the command is read; DATA is checked by its handler, just before its reply.
CHECKED_WHEN_READ = MUST_BE_LAST - {"DATA"}
SYNCHRONIZATION_ERROR = Reply("554", "Error: SMTP protocol synchronization", "5.5.0")
_FIONREAD_BUFFER = b"\0" * struct.calcsize("i")


def improper(proto: ESMTPServerProtocol, verb: str, argument: str) -> bool:
    """Called as ``verb`` (one of :data:`MUST_BE_LAST`) is read: True when the client sent
    more before its reply and is refused for it (554 5.5.0 sent, the session closing)."""
    if verb == "AUTH" and len(argument.split()) > 1:
        return False  # an initial response may be followed by the next command (RFC 4954 4)
    return _refuse_if_ahead(proto, verb)


def content_before_354(proto: ESMTPServerProtocol) -> bool:
    """Called just before the reply to DATA (its 354, or a validator's refusal): True when
    content (or anything) came before it."""
    return _refuse_if_ahead(proto, "DATA")


def _refuse_if_ahead(proto: ESMTPServerProtocol, verb: str) -> bool:
    # Cheapest first: the trust answer is cached per session, the kernel is a system call.
    if (
        not proto.policy.forbid_improper_pipelining
        or proto.session.authed
        or proto.client_trusted()
    ):
        return False
    buffered = proto.reader.buffered
    if not buffered and not _unread_in_kernel(proto.transport):
        return False
    refusal = SYNCHRONIZATION_ERROR.copy()
    proto.edge.events.rejected(
        proto.session,
        "pipelining",
        refusal,
        detail=f"sent ahead after {verb}: {_first_word(proto.reader.peek())!r}"
        + (f" ({buffered} bytes buffered)" if buffered else " (unread bytes waiting)"),
    )
    proto.reset_transaction()
    proto.send(refusal)
    proto.close_after_flush()
    return True


def _first_word(data: bytes) -> str:
    """What came ahead, for the log: its first word only (never a SASL payload or a body)."""
    word = data[:64].split(b"\r\n", 1)[0].split(b" ", 1)[0][:16]
    return word.decode("ascii", "backslashreplace")


def _unread_in_kernel(transport: Any) -> int:
    """Bytes received on a plain TCP connection and not read yet (0 when unknown).

    TLS is left out: bytes waiting there may be TLS records of the layer itself.
    """
    if not isinstance(transport, tcp.Connection) or transport.TLS:
        return 0
    try:
        answer = fcntl.ioctl(transport.fileno(), termios.FIONREAD, _FIONREAD_BUFFER)
    except (OSError, ValueError):
        return 0
    waiting: int = struct.unpack("i", answer)[0]
    return waiting

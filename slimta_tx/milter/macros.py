"""Sendmail macros: which are sent at each event, and their values from the session.

The default lists give the milters in common use what they look for (OpenDKIM: ``j``,
``{daemon_name}``, ``{auth_authen}``, ``i``; Rspamd: ``{client_addr}``, ``{client_name}``,
``{mail_addr}``, ``{rcpt_addr}``, ``{tls_version}``, ``i``; OpenDMARC: ``j``, ``i``). A milter
that names its own lists in the negotiation gets those instead, for each stage it names. A
macro with no value (no TLS, not authenticated, a name Postfix knows but slimta_tx does not) is
not sent, as Postfix does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version

from slimta_tx.address import split_address
from slimta_tx.envelope import Envelope, Session
from slimta_tx.milter.codec import (
    SMFIC_BODYEOB,
    SMFIC_CONNECT,
    SMFIC_DATA,
    SMFIC_EOH,
    SMFIC_HELO,
    SMFIC_MAIL,
    SMFIC_RCPT,
)
from slimta_tx.reply import Reply

__all__ = ["DEFAULT_MACROS", "MacroContext", "macro_values"]

DEFAULT_MACROS: dict[bytes, tuple[str, ...]] = {
    SMFIC_CONNECT: (
        "j",
        "_",
        "v",
        "{daemon_name}",
        "{daemon_addr}",
        "{daemon_port}",
        "{if_name}",
        "{if_addr}",
        "{client_addr}",
        "{client_port}",
        "{client_name}",
        "{client_ptr}",
    ),
    SMFIC_HELO: ("{tls_version}", "{cipher}", "{cert_subject}", "{cert_issuer}", "{tls_sni}"),
    SMFIC_MAIL: ("{auth_type}", "{auth_authen}", "{auth_author}", "{mail_addr}", "{mail_host}"),
    SMFIC_RCPT: ("i", "{rcpt_addr}", "{rcpt_host}", "{rcpt_mailer}"),
    SMFIC_DATA: ("i",),
    SMFIC_EOH: ("i",),
    SMFIC_BODYEOB: ("i",),
}

try:
    _VERSION = f"slimta_tx {version('slimta_tx')}"
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    _VERSION = "slimta_tx"


@dataclass
class MacroContext:
    """What macro values come from at one event."""

    session: Session
    envelope: Envelope | None = None
    sender: str | None = None
    mail_params: dict[str, str | None] | None = None
    recipient: str | None = None
    rcpt_refusal: Reply | None = None


def _domain(address: str | None) -> str | None:
    if not address:
        return None
    return split_address(address)[1] or None


def _tls(context: MacroContext, attribute: str) -> str | None:
    tls = context.session.tls
    value = getattr(tls, attribute, None) if tls is not None else None
    return str(value) if value else None


def _queue_id(context: MacroContext) -> str | None:
    envelope = context.envelope or context.session.envelope
    return envelope.queue_id if envelope is not None else None


def _sender(context: MacroContext) -> str | None:
    if context.sender is not None:
        return context.sender
    envelope = context.envelope or context.session.envelope
    return envelope.sender if envelope is not None else None


def _auth_author(context: MacroContext) -> str | None:
    params = context.mail_params or {}
    return params.get("AUTH") or None


def _rcpt_addr(context: MacroContext) -> str | None:
    refusal = context.rcpt_refusal
    if refusal is not None:
        return refusal.message.split("\n")[0]  # as Postfix: the refusal's text
    return context.recipient


def _rcpt_host(context: MacroContext) -> str | None:
    refusal = context.rcpt_refusal
    if refusal is not None:
        return refusal.effective_enhanced_code() or refusal.code
    return _domain(context.recipient)


def _peer_name(context: MacroContext) -> str:
    return context.session.reverse_name or "unknown"


_VALUES: dict[str, Callable[[MacroContext], str | None]] = {
    "j": lambda c: c.session.hostname,
    "v": lambda c: _VERSION,
    "_": lambda c: f"{_peer_name(c)} [{c.session.address[0]}]",
    "daemon_name": lambda c: c.session.hostname,
    "daemon_addr": lambda c: c.session.server_address[0] or None,
    "daemon_port": lambda c: str(c.session.server_address[1]),
    "if_name": lambda c: c.session.hostname,
    "if_addr": lambda c: c.session.server_address[0] or None,
    "client_addr": lambda c: c.session.address[0] or None,
    "client_port": lambda c: str(c.session.address[1]),
    "client_name": _peer_name,
    "client_ptr": _peer_name,
    "tls_version": lambda c: _tls(c, "version"),
    "cipher": lambda c: _tls(c, "cipher"),
    "cert_subject": lambda c: (
        _tls(c, "client_subject") if _tls(c, "client_certificate_verified") else None
    ),
    "cert_issuer": lambda c: None,
    "tls_sni": lambda c: _tls(c, "server_name"),
    "auth_type": lambda c: c.session.auth_mechanism,
    "auth_authen": lambda c: c.session.authed,
    "auth_author": _auth_author,
    "i": _queue_id,
    "mail_addr": _sender,
    "mail_host": lambda c: _domain(_sender(c)),
    "rcpt_addr": _rcpt_addr,
    "rcpt_host": _rcpt_host,
    "rcpt_mailer": lambda c: "error" if c.rcpt_refusal is not None else "smtp",
}


def macro_values(names: tuple[str, ...], context: MacroContext) -> list[tuple[str, str]]:
    """``(name, value)`` for each of ``names`` that has a value now (names as given)."""
    out = []
    for name in names:
        lookup = _VALUES.get(name.strip("{}"))
        if lookup is None:
            continue
        value = lookup(context)
        if value is not None:
            out.append((name, value))
    return out

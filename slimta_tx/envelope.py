"""What a connection knows (:class:`Session`) and what a transaction carries (:class:`Envelope`).

The names follow python-slimta's session so validators written for it read the same:
``session.address``, ``session.ehlo_as``, ``session.security``, ``session.authed``,
``session.envelope``, ``session.protocol``.
"""

from __future__ import annotations

import dataclasses
import email.policy
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from email.message import EmailMessage
from email.parser import BytesHeaderParser
from email.utils import format_datetime
from typing import Any, TypeVar

from slimta_tx.dsn import (
    DsnError,
    OriginalRecipient,
    RecipientDsn,
    parse_envid,
    parse_notify,
    parse_orcpt,
    parse_ret,
)
from slimta_tx.spool import Spool

__all__ = ["Envelope", "Session", "TLSInfo", "new_queue_id"]

T = TypeVar("T")


# Ids drawn ahead from os.urandom (what secrets.token_hex reads): one getrandom call per
# _BATCH ids instead of one per message. A forked child drops the batch its parent drew, so
# two processes never hand out the same ids.
_BATCH = 64
_ids: list[str] = []
os.register_at_fork(after_in_child=_ids.clear)


def new_queue_id() -> str:
    """A 16-character random id (64 bits, upper-case hex), unique across processes."""
    if not _ids:
        block = os.urandom(8 * _BATCH).hex().upper()
        _ids.extend([block[i : i + 16] for i in range(0, 16 * _BATCH, 16)])
    return _ids.pop()


@dataclass(frozen=True)
class TLSInfo:
    """Facts about an established TLS layer."""

    version: str
    cipher: str
    client_certificate: bool = False
    client_certificate_verified: bool = False
    client_subject: str | None = None
    server_name: str | None = None


@dataclass
class Session:
    """Per-connection facts, visible to validators and copied into each envelope.

    :ivar address: the client's ``(host, port)``.
    :ivar reverse_name: the client's forward-confirmed reverse DNS name, when known.
    :ivar ehlo_as: the EHLO/HELO argument, or None before one succeeded.
    :ivar extended_smtp: True after EHLO, False after HELO.
    :ivar security: ``"TLS"`` once the connection is encrypted, else None.
    :ivar authed: the authenticated identity, or None.
    :ivar envelope: the transaction in progress, or None.
    :ivar early_talker: True if the client sent anything before the greeting.
    :ivar extra: what policies and validators learn about the session (e.g. ``"dnswl"``).
    """

    address: tuple[str, int] = ("", 0)
    server_address: tuple[str, int] = ("", 0)
    hostname: str = "localhost"
    reverse_name: str | None = None
    ehlo_as: str | None = None
    extended_smtp: bool = False
    security: str | None = None
    tls: TLSInfo | None = None
    authed: str | None = None
    auth_mechanism: str | None = None
    envelope: Envelope | None = None
    connected_at: float = field(default_factory=time.time)
    session_id: str = field(default_factory=new_queue_id)
    transactions: int = 0
    early_talker: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    lmtp: bool = False  # an LMTP session (RFC 2033)

    @property
    def from_ip(self) -> str:
        return self.address[0]

    @property
    def auth(self) -> str | None:
        """Alias of ``authed`` (python-slimta's name)."""
        return self.authed

    @property
    def protocol(self) -> str:
        """The RFC 3848 ``with`` keyword: SMTP, ESMTP, ESMTPS, ESMTPA or ESMTPSA (LMTP,
        LMTPS, LMTPA, LMTPSA over LMTP)."""
        if not self.extended_smtp:
            return "SMTP"
        base = "LMTP" if self.lmtp else "ESMTP"
        return base + ("S" if self.security else "") + ("A" if self.authed else "")

    def forget_for_starttls(self) -> None:
        """After STARTTLS nothing learned in plaintext may be trusted (RFC 3207 4.2)."""
        self.ehlo_as = None
        self.extended_smtp = False
        self.authed = None
        self.auth_mechanism = None
        self.envelope = None


@dataclass
class Envelope:
    """One transaction: sender, recipients, the session's facts and the spooled message."""

    sender: str
    mail_params: dict[str, str | None] = field(default_factory=dict)
    recipients: list[str] = field(default_factory=list)
    rcpt_params: list[dict[str, str | None]] = field(default_factory=list)
    client_ip: str = ""
    client_port: int = 0
    client_name: str | None = None
    ehlo_as: str | None = None
    protocol: str = "ESMTP"
    security: str | None = None
    tls_version: str | None = None
    tls_cipher: str | None = None
    authed: str | None = None
    receiver: str = "localhost"
    queue_id: str = field(default_factory=new_queue_id)
    received_at: float = field(default_factory=time.time)
    message: Spool | None = None
    _tls_required_no: bool | None = field(default=None, repr=False, compare=False)
    #: What the milters did to this message: ``{"milter", "action", "detail"}`` each.
    milter_actions: list[dict[str, str]] = field(default_factory=list)
    #: Why a milter quarantined the message (the bus stores it, marked), or None.
    quarantine: str | None = None

    @classmethod
    def start(cls, session: Session, sender: str, params: dict[str, str | None]) -> Envelope:
        return cls(sender=sender, mail_params=dict(params)).refresh_from(session)

    def refresh_from(self, session: Session) -> Envelope:
        """Copy the session's facts (called at MAIL and again when the data is complete)."""
        address, tls = session.address, session.tls
        self.client_ip, self.client_port = address[0], int(address[1])
        self.client_name = session.reverse_name
        self.ehlo_as = session.ehlo_as
        self.protocol = session.protocol
        self.security = session.security
        if tls is None:
            self.tls_version = self.tls_cipher = None
        else:
            self.tls_version, self.tls_cipher = tls.version, tls.cipher
        self.authed = session.authed
        self.receiver = session.hostname
        return self

    def headers(self, limit: int = 64 * 1024) -> EmailMessage:
        """The message's header section, parsed (read from the spool; the body is not)."""
        if self.message is None:
            raise ValueError("no message yet: headers() is for HAVE_DATA and the bus")
        head = self.message.head(limit)
        end = head.find(b"\r\n\r\n")
        if end >= 0:
            head = head[: end + 4]
        parsed = BytesHeaderParser(policy=email.policy.SMTP).parsebytes(head)
        assert isinstance(parsed, EmailMessage)
        return parsed

    def subset(self, indices: list[int]) -> Envelope:
        """A copy for some of the recipients only (same message, same queue id): what a
        composed bus hands its next member when earlier ones refused the others."""
        copy = dataclasses.replace(self)
        copy.recipients = [self.recipients[i] for i in indices]
        copy.rcpt_params = [dict(self.rcpt_params[i]) for i in indices]
        return copy

    def add_recipient(self, address: str, params: dict[str, str | None]) -> None:
        self.recipients.append(address)
        self.rcpt_params.append(dict(params))

    @property
    def smtputf8(self) -> bool:
        return "SMTPUTF8" in self.mail_params

    # -- ESMTP parameters, typed (read from mail_params and rcpt_params, which stay as sent) --

    @property
    def body(self) -> str | None:
        """``BODY=`` (RFC 6152, RFC 3030) upper-cased: ``7BIT``, ``8BITMIME``, ``BINARYMIME``."""
        body = self.mail_params.get("BODY")
        return body.upper() if body else None

    @property
    def requiretls(self) -> bool:
        """``MAIL ... REQUIRETLS`` (RFC 8689): pass it on only over verified TLS."""
        return "REQUIRETLS" in self.mail_params

    @property
    def tls_required_no(self) -> bool:
        """The message carries ``TLS-Required: No`` (RFC 8689 5): recorded for whoever
        delivers it (it asks them to relax MTA-STS and DANE); the edge does not act on it."""
        known = self._tls_required_no
        if known is not None:
            return known
        if self.message is None or self.message.closed:
            return False
        head = self.message.head(64 * 1024)
        end = head.find(b"\r\n\r\n")
        found = _TLS_REQUIRED_NO.search(head if end < 0 else head[: end + 2]) is not None
        self._tls_required_no = found  # read once, while the message is there
        return found

    @property
    def replies_per_recipient(self) -> bool:
        """True when the client hears one reply per recipient (it came over LMTP), so a bus
        may deliver to some recipients and not others (see :mod:`slimta_tx.results`)."""
        return self.protocol.startswith("LMTP")

    @property
    def dsn_ret(self) -> str | None:
        """DSN ``RET=``: ``FULL`` or ``HDRS`` (RFC 3461 4.3); None when not asked."""
        return _typed(parse_ret, self.mail_params.get("RET"))

    @property
    def dsn_envid(self) -> str | None:
        """DSN ``ENVID=``, xtext-decoded (RFC 3461 4.4); None when not given."""
        return _typed(parse_envid, self.mail_params.get("ENVID"))

    @property
    def recipient_dsn(self) -> list[RecipientDsn]:
        """Each recipient's ``NOTIFY=`` and ``ORCPT=`` (RFC 3461 4.1, 4.2; RFC 6533)."""
        utf8 = self.smtputf8
        return [
            RecipientDsn(
                _typed(parse_notify, params.get("NOTIFY")),
                _typed(lambda v: parse_orcpt(v, utf8), params.get("ORCPT")),
            )
            for params in self.rcpt_params
        ]

    def received_header(self) -> bytes:
        """The ``Received:`` trace header (RFC 5321 4.4, RFC 3848), folded, CRLF-terminated."""
        ip = self.client_ip
        literal = f"[IPv6:{ip}]" if ":" in ip else f"[{ip}]"
        helo = _header_safe(self.ehlo_as or literal)
        name = _header_safe(self.client_name or "unknown")
        with_clause = f"\twith {self.protocol}"
        if self.tls_version and self.tls_cipher:
            with_clause += f" ({self.tls_version} {self.tls_cipher})"
        parts = [
            f"Received: from {helo} ({name} {literal})",
            f"\tby {_header_safe(self.receiver)} (slimta_tx)",
            with_clause,
            f"\tid {self.queue_id}",
        ]
        if len(self.recipients) == 1:
            parts.append(f"\tfor <{_header_safe(self.recipients[0])}>")
        stamp = format_datetime(datetime.fromtimestamp(self.received_at, timezone.utc))
        parts[-1] += f"; {stamp}"
        return ("\r\n".join(parts) + "\r\n").encode("utf-8")

    def return_path_header(self) -> bytes:
        return f"Return-Path: <{_header_safe(self.sender)}>\r\n".encode()

    def to_json_dict(self) -> dict[str, Any]:
        """The envelope as plain JSON-ready data (the message itself is not included)."""
        return {
            "queue_id": self.queue_id,
            "sender": self.sender,
            "mail_params": self.mail_params,
            "recipients": [
                _recipient_json(rcpt, params, dsn)
                for rcpt, params, dsn in zip(
                    self.recipients, self.rcpt_params, self.recipient_dsn, strict=True
                )
            ],
            "body": self.body,
            "requiretls": self.requiretls,
            "tls_required_no": self.tls_required_no,
            "client": {
                "ip": self.client_ip,
                "port": self.client_port,
                "name": self.client_name,
                "helo": self.ehlo_as,
            },
            "protocol": self.protocol,
            "security": self.security,
            "tls": {"version": self.tls_version, "cipher": self.tls_cipher}
            if self.tls_version
            else None,
            "authed": self.authed,
            "receiver": self.receiver,
            "received_at": self.received_at,
            "size": self.message.size if self.message is not None else None,
            **self._dsn_json(),
            **({"milter_actions": self.milter_actions} if self.milter_actions else {}),
            **({"quarantine": self.quarantine} if self.quarantine is not None else {}),
        }

    def _dsn_json(self) -> dict[str, Any]:
        """``"dsn"`` when the sender asked for RET or ENVID (RFC 3461)."""
        if "RET" not in self.mail_params and "ENVID" not in self.mail_params:
            return {}
        return {"dsn": {"ret": self.dsn_ret, "envid": self.dsn_envid}}


_UNSAFE = re.compile(r"[\x00-\x1f\x7f]")
_TLS_REQUIRED_NO = re.compile(rb"(?im)^tls-required[ \t]*:[ \t]*no[ \t]*\r?$")


def _typed(parse: Callable[[str], T], value: str | None) -> T | None:
    """``parse(value)``, or None when the parameter is absent (or, set by hand, invalid)."""
    if value is None:
        return None
    try:
        return parse(value)
    except DsnError:
        return None


def _recipient_json(
    address: str, params: dict[str, str | None], dsn: RecipientDsn
) -> dict[str, Any]:
    """A recipient in the JSON record; ``"dsn"`` when it carried NOTIFY or ORCPT."""
    record: dict[str, Any] = {"address": address, "params": params}
    if dsn.notify is not None or dsn.orcpt is not None:
        orcpt: OriginalRecipient | None = dsn.orcpt
        record["dsn"] = {
            "notify": sorted(dsn.notify) if dsn.notify is not None else None,
            "orcpt": {"type": orcpt.addr_type, "address": orcpt.address} if orcpt else None,
        }
    return record


def _header_safe(text: str) -> str:
    return _UNSAFE.sub("?", text)

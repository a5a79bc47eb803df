"""The "relayed" delivery status notification (RFC 3461 5.2.2, RFC 3464, RFC 6522).

When the relay bus hands a message to a next hop that does not offer DSN, recipients that asked
``NOTIFY=SUCCESS`` will never hear of its delivery from there, so the relay tells the sender
that it was relayed: a ``multipart/report; report-type=delivery-status`` message from the null
sender with ``Action: relayed``, ``Status: 2.0.0`` for each such recipient, and the original
header section (a success report returns only the headers). With non-ASCII addresses it is the
internationalized form (RFC 6533: ``message/global-delivery-status``,
``message/global-headers``), sent with SMTPUTF8.

Sans-I/O: :func:`relayed_notice` builds the bytes; the relay bus sends them.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from email.utils import format_datetime

from slimta_tx.dsn import OriginalRecipient
from slimta_tx.envelope import Envelope
from slimta_tx.reply import Reply

__all__ = ["Notice", "relayed_notice"]

HEADER_LIMIT = 64 * 1024


@dataclass(frozen=True)
class Notice:
    """A notification to send: to ``recipient`` from ``<>``; ``smtputf8`` when it needs it."""

    recipient: str
    data: bytes
    smtputf8: bool


def relayed_notice(
    envelope: Envelope,
    indices: Sequence[int],
    reporting_mta: str,
    remote_mta: str,
    reply: Reply,
    now: float,
) -> Notice:
    """The notice that ``envelope``'s recipients at ``indices`` were relayed to ``remote_mta``
    (which answered ``reply``), reported by ``reporting_mta`` (our hostname)."""
    utf8 = not envelope.sender.isascii() or any(
        not envelope.recipients[i].isascii() for i in indices
    )
    boundary = f"{envelope.queue_id}.{secrets.token_hex(8)}/{_ascii(reporting_mta)}"
    date = format_datetime(datetime.fromtimestamp(now, timezone.utc))
    arrival = format_datetime(datetime.fromtimestamp(envelope.received_at, timezone.utc))
    names = ", ".join(f"<{envelope.recipients[i]}>" for i in indices)
    diagnostic = " ".join(f"{reply.code} {reply.message}".split())
    status = "message/global-delivery-status" if utf8 else "message/delivery-status"
    headers_type = "message/global-headers" if utf8 else "text/rfc822-headers"
    per_message = [f"Reporting-MTA: dns; {reporting_mta}"]
    envid = envelope.dsn_envid
    if envid is not None:
        per_message.append(f"Original-Envelope-Id: {_one_line(envid)}")
    per_message.append(f"Arrival-Date: {arrival}")
    per_recipient = []
    dsns = envelope.recipient_dsn
    for i in indices:
        rcpt = envelope.recipients[i]
        orcpt = dsns[i].orcpt
        fields = []
        if orcpt is not None:
            fields.append(f"Original-Recipient: {_report_field(orcpt, utf8)}")
        fields += [
            f"Final-Recipient: {_report_field(OriginalRecipient.for_address(rcpt), utf8)}",
            "Action: relayed",
            "Status: 2.0.0",
            f"Remote-MTA: dns; {remote_mta}",
            f"Diagnostic-Code: smtp; {_one_line(diagnostic)}",
        ]
        per_recipient.append("\r\n".join(fields))
    text = (
        f"This is the mail system at {reporting_mta}.\r\n\r\n"
        f"Your message was relayed to {remote_mta} for {names}, which does not offer\r\n"
        "delivery notifications: no notice of its final delivery will follow.\r\n"
    )
    report = "\r\n\r\n".join(["\r\n".join(per_message), *per_recipient]) + "\r\n"
    parts = [
        f"From: Mail Delivery System <MAILER-DAEMON@{reporting_mta}>",
        f"To: <{envelope.sender}>",
        "Subject: Delivery Status Notification (relayed)",
        f"Date: {date}",
        f"Message-ID: <{envelope.queue_id}.{secrets.token_hex(6)}.relayed@{reporting_mta}>",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        "Content-Type: multipart/report; report-type=delivery-status;",
        f'\tboundary="{boundary}"',
        "",
        "This is a MIME-encapsulated message.",
        "",
        f"--{boundary}",
        "Content-Type: text/plain; charset=" + ("utf-8" if utf8 else "us-ascii"),
        "",
        text,
        f"--{boundary}",
        f"Content-Type: {status}" + ("; charset=utf-8" if utf8 else ""),
        "",
        report,
        f"--{boundary}",
        f"Content-Type: {headers_type}",
        "",
    ]
    head = "\r\n".join(parts).encode("utf-8") + b"\r\n"
    original = _original_headers(envelope)
    tail = f"\r\n--{boundary}--\r\n".encode("ascii")
    return Notice(envelope.sender, head + original + tail, utf8)


def _original_headers(envelope: Envelope) -> bytes:
    """The original header section (Received: first), without its blank line."""
    spool = envelope.message
    head = envelope.received_header() + (spool.head(HEADER_LIMIT) if spool is not None else b"")
    end = head.find(b"\r\n\r\n")
    head = head[: end + 2] if end >= 0 else head[: head.rfind(b"\r\n") + 2]
    return head


def _report_field(address: OriginalRecipient, utf8: bool) -> str:
    """``rfc822;a@b`` or ``utf-8;...``: unitext in the global form, else utf-8-addr-xtext."""
    if address.addr_type == "utf-8":
        return address.to_param(smtputf8=utf8)
    return f"{address.addr_type};{_one_line(address.address)}"


def _one_line(text: str) -> str:
    return "".join(ch if ch.isprintable() else "?" for ch in text)


def _ascii(text: str) -> str:
    return text.encode("ascii", "replace").decode("ascii")

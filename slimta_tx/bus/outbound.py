"""What the relay bus may send a next hop for an envelope, and in which words.

Sans-I/O, from the envelope and the next hop's EHLO/LHLO keywords:

- :func:`capability_refusal`: what the next hop cannot take is refused before anything is sent
  (SMTPUTF8, 8BITMIME, BINARYMIME, SIZE; REQUIRETLS needs verified TLS and a next hop that
  offers it, else ``550 5.7.30``, RFC 8689); never a downgrade;
- :func:`mail_command`, :func:`rcpt_command`: the MAIL and RCPT lines with the parameters the
  next hop understands. DSN parameters (RFC 3461 5.2.1) go to a next hop that offers DSN:
  ``RET`` and ``ENVID`` as received, ``NOTIFY`` as received, ``ORCPT`` as received or, when the
  client gave none, the recipient address (which 5.2.1 allows a relay to add). A next hop
  without DSN gets none of them (5.2.2); see :func:`wants_relayed_notice`.
"""

from __future__ import annotations

from dataclasses import dataclass

from slimta_tx.address import xtext_encode
from slimta_tx.bus.smtp_client import Extensions
from slimta_tx.dsn import OriginalRecipient, RecipientDsn
from slimta_tx.envelope import Envelope
from slimta_tx.reply import Reply

__all__ = [
    "NextHop",
    "capability_refusal",
    "mail_command",
    "rcpt_command",
    "wants_relayed_notice",
]


@dataclass(frozen=True)
class NextHop:
    """What a transaction needs to know of the connection: its keywords and its TLS."""

    extensions: Extensions
    verified_tls: bool = False  # TLS with the next hop's certificate checked


def capability_refusal(envelope: Envelope, hop: NextHop, size: int) -> Reply | None:
    """Refuse what the next hop said it cannot take, before sending anything."""
    ext = hop.extensions
    if envelope.smtputf8 and "SMTPUTF8" not in ext:
        return Reply("554", "Next hop does not support SMTPUTF8", "5.6.7")
    body = envelope.body
    if body == "8BITMIME" and "8BITMIME" not in ext:
        return Reply("554", "Next hop does not support 8BITMIME", "5.6.3")
    if body == "BINARYMIME" and ("BINARYMIME" not in ext or "CHUNKING" not in ext):
        # RFC 3030: no conversion of binary content; it goes by BDAT or not at all.
        return Reply("554", "Next hop does not support BINARYMIME (no conversion)", "5.6.3")
    if envelope.requiretls:
        # RFC 8689 4.2: only over TLS with the certificate checked, to a next hop that
        # promises to do the same.
        if not hop.verified_tls:
            return Reply(
                "550", "REQUIRETLS support required: no verified TLS to the next hop", "5.7.30"
            )
        if "REQUIRETLS" not in ext:
            return Reply(
                "550", "REQUIRETLS support required: the next hop does not offer it", "5.7.30"
            )
    limit = ext.max_size
    if limit is not None and size > limit:
        return Reply("552", f"Message too big for next hop (limit {limit} bytes)", "5.3.4")
    return None


def mail_command(envelope: Envelope, ext: Extensions, size: int) -> bytes:
    """``MAIL FROM:<sender>`` with the parameters the next hop understands."""
    params: list[str] = []
    if "SIZE" in ext:
        params.append(f"SIZE={size}")
    body = envelope.body
    if body and ("BINARYMIME" if body == "BINARYMIME" else "8BITMIME") in ext:
        params.append(f"BODY={body}")
    if envelope.smtputf8:
        params.append("SMTPUTF8")
    if envelope.requiretls:
        params.append("REQUIRETLS")
    if "DSN" in ext:
        ret, envid = envelope.dsn_ret, envelope.dsn_envid
        if ret is not None:
            params.append(f"RET={ret}")
        if envid is not None:
            params.append(f"ENVID={xtext_encode(envid)}")
    return _command("MAIL FROM", envelope.sender, params)


def rcpt_command(envelope: Envelope, index: int, ext: Extensions) -> bytes:
    """``RCPT TO:<recipient>`` (the ``index``-th), with DSN parameters for a DSN next hop."""
    rcpt = envelope.recipients[index]
    params: list[str] = []
    if "DSN" in ext:
        dsn = envelope.recipient_dsn[index]
        if dsn.notify is not None:
            params.append("NOTIFY=" + ",".join(_notify_order(dsn)))
        orcpt = dsn.orcpt or OriginalRecipient.for_address(rcpt)
        params.append("ORCPT=" + orcpt.to_param(smtputf8=envelope.smtputf8))
    return _command("RCPT TO", rcpt, params)


def wants_relayed_notice(envelope: Envelope, ext: Extensions) -> list[int]:
    """The recipients (indices) whose sender must get a "relayed" DSN once the message is
    with a next hop that does not offer DSN: those that asked ``NOTIFY=SUCCESS`` (RFC 3461
    5.2.2). None for the null sender (nothing is ever sent to ``<>``)."""
    if "DSN" in ext or not envelope.sender:
        return []
    return [i for i, dsn in enumerate(envelope.recipient_dsn) if dsn.success_requested]


def _notify_order(dsn: RecipientDsn) -> list[str]:
    assert dsn.notify is not None
    return [word for word in ("NEVER", "SUCCESS", "FAILURE", "DELAY") if word in dsn.notify]


def _command(verb: str, address: str, params: list[str]) -> bytes:
    return " ".join([f"{verb}:<{address}>", *params]).encode("utf-8")

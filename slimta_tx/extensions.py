"""The EHLO keyword list, from policy and what this connection can do."""

from __future__ import annotations

from collections.abc import Sequence

from slimta_tx.policy import Policy

__all__ = ["ehlo_keywords"]


def ehlo_keywords(
    policy: Policy,
    *,
    starttls: bool = False,
    auth_mechanisms: Sequence[str] = (),
) -> list[str]:
    """Keywords for the EHLO reply, in a stable order.

    :param starttls: offer STARTTLS (TLS configured and the connection still plaintext).
    :param auth_mechanisms: SASL mechanisms offered on this connection (none: no AUTH line).
    """
    keywords = ["PIPELINING"]
    size = policy.max_message_size
    keywords.append(f"SIZE {size}" if size else "SIZE")
    keywords += ["8BITMIME", "ENHANCEDSTATUSCODES"]
    if policy.smtputf8:
        keywords.append("SMTPUTF8")
    if starttls:
        keywords.append("STARTTLS")
    if auth_mechanisms:
        keywords.append("AUTH " + " ".join(auth_mechanisms))
    return keywords

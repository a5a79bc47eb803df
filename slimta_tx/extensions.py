"""The core EHLO keyword list, from policy. Features (TLS, AUTH) add theirs through
``SmtpEdge.ehlo_extensions``."""

from __future__ import annotations

from slimta_tx.policy import Policy

__all__ = ["ehlo_keywords"]


def ehlo_keywords(policy: Policy) -> list[str]:
    """The keywords every EHLO reply carries, in a stable order."""
    size = policy.max_message_size
    keywords = [
        "PIPELINING",
        f"SIZE {size}" if size else "SIZE",
        "8BITMIME",
        "ENHANCEDSTATUSCODES",
    ]
    if policy.smtputf8:
        keywords.append("SMTPUTF8")
    if policy.chunking:
        keywords.append("CHUNKING")
    if policy.dsn:
        keywords.append("DSN")
    return keywords

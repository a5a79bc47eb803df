"""The core EHLO keyword list, from policy and the session. Features (TLS, AUTH) add theirs
through ``SmtpEdge.ehlo_extensions``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from slimta_tx.policy import Policy

if TYPE_CHECKING:  # pragma: no cover
    from slimta_tx.envelope import Session

__all__ = ["ehlo_keywords"]


def ehlo_keywords(policy: Policy, session: Session | None = None) -> list[str]:
    """The keywords every EHLO reply carries, in a stable order (REQUIRETLS only on a TLS
    session: RFC 8689)."""
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
        if policy.binarymime:
            keywords.append("BINARYMIME")
    if policy.dsn:
        keywords.append("DSN")
    if policy.requiretls and session is not None and session.security is not None:
        keywords.append("REQUIRETLS")
    return keywords

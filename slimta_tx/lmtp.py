"""An LMTP server (RFC 2033): the edge's protocol with LHLO and one reply per recipient.

LMTP is ESMTP for a final hop into a mail store, with two differences that matter:

- ``LHLO`` replaces ``EHLO`` (same reply, same keywords); ``EHLO`` and ``HELO`` are unknown
  commands (``500 5.5.2``);
- after the final dot (or ``BDAT ... LAST``) the server answers once for **each** recipient it
  accepted, in the order of the RCPT commands, so a message can be delivered to some mailboxes
  and refused (or deferred) for others. The bus's per-recipient result gives each reply
  (:mod:`slimta_tx.results`); a single reply from the bus, and a refusal of the message itself
  (too big, bare newlines, a bus failure), is repeated for every recipient.

Everything else (policies, validators, TLS, AUTH, limits, pipelining discipline) is the
edge's. Serve it with ``SmtpEdge(bus, lmtp=True)``, or next to SMTP listeners of the same edge
with :class:`LmtpFactory` (``twistd slimta --lmtp-listen``). The session's protocol is
``LMTP`` (``LMTPS``, ``LMTPA``, ``LMTPSA``: RFC 3848), which the ``Received:`` header and
``Envelope.replies_per_recipient`` show.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet.protocol import ServerFactory

from slimta_tx import commands
from slimta_tx.envelope import Envelope
from slimta_tx.protocol import ESMTPServerProtocol
from slimta_tx.reply import Reply
from slimta_tx.results import RecipientReplies, per_recipient

if TYPE_CHECKING:  # pragma: no cover
    from slimta_tx.factory import SmtpEdge

__all__ = ["LMTP_HANDLERS", "LMTPServerProtocol", "LmtpFactory"]

_NEED_HELO = "Send EHLO or HELO first"  # slimta_tx.state's text, said in LMTP's words here

LMTP_HANDLERS = {
    **{verb: h for verb, h in commands.HANDLERS.items() if verb not in ("EHLO", "HELO")},
    "LHLO": commands.lhlo,
}


class LMTPServerProtocol(ESMTPServerProtocol):
    """One LMTP session. Built by an edge with ``lmtp=True`` or by :class:`LmtpFactory`."""

    handlers = LMTP_HANDLERS

    def __init__(self, edge: SmtpEdge) -> None:
        super().__init__(edge)
        self.session.lmtp = True

    def refuse(self, reply: Reply) -> None:
        if reply.message == _NEED_HELO:
            reply = Reply(reply.code, "Send LHLO first", reply.enhanced_status_code)
        super().refuse(reply)

    def client_reply(self, envelope: Envelope, result: object) -> Reply:
        """One reply per recipient, in RCPT order (RFC 2033 4.2)."""
        replies = per_recipient(result, len(envelope.recipients))
        return RecipientReplies(replies, envelope.recipients)

    def _complete_transaction(self, reply: Reply) -> None:
        envelope = self.session.envelope
        if (
            envelope is not None
            and envelope.recipients
            and not isinstance(reply, RecipientReplies)
        ):
            # A refusal of the message itself: every recipient gets it.
            reply = RecipientReplies([reply] * len(envelope.recipients), envelope.recipients)
        super()._complete_transaction(reply)


class LmtpFactory(ServerFactory):
    """Serve LMTP for ``edge``: the same policy, validators, bus and shutdown as its SMTP
    listeners (connections count among ``edge.connections``, so ``edge.close()`` drains
    them too)."""

    def __init__(self, edge: SmtpEdge) -> None:
        self.edge = edge

    def buildProtocol(self, addr: Any) -> LMTPServerProtocol:
        proto = LMTPServerProtocol(self.edge)
        proto.factory = self
        return proto

"""From what the next hop answered to what the edge answers its client.

The rules (also in ``docs/bus-relay.md``):

- the next hop's 2xx after the data becomes our ``250``, with its text (its queue id) kept;
- its 4xx/5xx is passed on with its enhanced status code (or ``X.1.0`` for a recipient,
  ``X.0.0`` otherwise, when it sent none); a ``421`` becomes ``451`` (it closes the next hop's
  connection, not our client's);
- anything that is not a reply (no connection, a timeout, a lost connection, garbage) is
  ``451 4.4.x``: the client keeps the message and tries again;
- several recipients: ``250`` only when every recipient took the message. Otherwise the first
  temporary refusal if there is one (the client retries), else the first permanent refusal
  (the client bounces the message to its sender).
"""

from __future__ import annotations

from collections.abc import Sequence

from slimta_tx.reply import Reply

__all__ = [
    "CONNECTION_LOST",
    "CONNECT_FAILED",
    "combine_recipients",
    "from_next_hop",
    "success",
]

CONNECT_FAILED = Reply("451", "Next hop unreachable, try again later", "4.4.1")
TIMED_OUT = Reply("451", "Next hop did not answer in time, try again later", "4.4.1")
CONNECTION_LOST = Reply("451", "Connection to next hop lost, try again later", "4.4.2")
CONGESTED = Reply("451", "All connections to next hop busy, try again later", "4.4.5")
PROTOCOL_ERROR = Reply("451", "Next hop broke the protocol, try again later", "4.5.0")


def from_next_hop(reply: Reply, default_detail: str = "0.0") -> Reply:
    """The next hop's refusal as our reply (class kept, 421 made 451, code sanitised)."""
    code = reply.code
    if code == "421" or code[:1] not in ("4", "5"):
        code = "451"
    esc = reply.enhanced_status_code
    if esc is None or esc[:1] != code[:1]:
        esc = f"{code[0]}.{esc[2:] if esc else default_detail}"
    return Reply(code, reply.message or "Refused by next hop", esc)


def success(reply: Reply) -> Reply:
    """The next hop's 2xx after the data, as our 250 (text and enhanced code kept)."""
    esc = reply.enhanced_status_code
    if esc is None or not esc.startswith("2."):
        esc = "2.0.0"
    return Reply("250", reply.message or "Delivered to next hop", esc)


def combine_recipients(
    recipients: Sequence[str], replies: Sequence[Reply], delivered: bool
) -> Reply | None:
    """One reply for many per-recipient replies; None when every recipient accepted.

    :param delivered: the message already reached the recipients that accepted (LMTP replies
        after the data); the reply text says so, as a retry may duplicate it for them.
    """
    refusals = [
        (rcpt, reply)
        for rcpt, reply in zip(recipients, replies, strict=True)
        if not reply.code.startswith("2")
    ]
    if not refusals:
        return None
    temporary = [pair for pair in refusals if pair[1].code[:1] != "5"]
    rcpt, chosen = (temporary or refusals)[0]
    reply = from_next_hop(chosen, "1.0")
    if rcpt not in reply.message:
        reply.message = f"<{rcpt}>: {reply.message}"
    accepted = len(recipients) - len(refusals)
    if accepted:
        if delivered:
            reply.message += (
                f"\nNext hop took the message for {accepted} of {len(recipients)} recipients"
            )
        else:
            reply.message += (
                f"\nNext hop refused {len(refusals)} of {len(recipients)} recipients; "
                "delivered to none"
            )
    return reply

"""Per-recipient bus results, and the one reply an SMTP client gets from them.

A bus answers a message with one :class:`~slimta_tx.reply.Reply` for all its recipients, or
with a sequence of replies, one per recipient in the envelope's order (an LMTP next hop, or a
store that takes some mailboxes and not others). What the client hears:

- over LMTP (RFC 2033), one reply per recipient after the data, in order: the bus's own for
  each, or its one reply repeated;
- over SMTP, one reply (:func:`fold`): ``250`` when every recipient was accepted (the first
  recipient's reply), otherwise the first temporary failure if there is one (the client keeps
  the message and tries again later), else the first permanent failure (the client bounces it
  to the sender). Its text names the recipient and how many recipients were accepted.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Union

from slimta_tx.reply import Reply

if TYPE_CHECKING:  # pragma: no cover
    from slimta_tx.envelope import Envelope

__all__ = ["BusResult", "RecipientReplies", "fold", "per_recipient", "smtp_reply"]

BusResult = Union[Reply, Sequence[Reply]]


class RecipientReplies(Reply):
    """One reply per recipient, written one after another (LMTP after the data).

    As a :class:`Reply` it is their :func:`fold` (what the transaction log records), so code
    that looks at ``code`` sees the verdict for the whole message.
    """

    def __init__(self, replies: Sequence[Reply], recipients: Sequence[str] = ()) -> None:
        if not replies:
            raise ValueError("RecipientReplies needs at least one reply")
        self.replies = list(replies)
        self.recipients = list(recipients)
        summary = fold(self.replies, self.recipients)
        super().__init__(summary.code, summary.message, summary.enhanced_status_code)

    def copy(self) -> RecipientReplies:
        return RecipientReplies([r.copy() for r in self.replies], self.recipients)

    def render(self, with_enhanced: bool = True) -> bytes:
        return b"".join(reply.render(with_enhanced) for reply in self.replies)


def per_recipient(result: object, count: int) -> list[Reply]:
    """``result`` as ``count`` replies; TypeError when it is neither a Reply nor ``count``
    of them."""
    if isinstance(result, RecipientReplies):
        result = result.replies
    if isinstance(result, Reply):
        return [result.copy() for _ in range(count)]
    if isinstance(result, (list, tuple)) and all(isinstance(r, Reply) for r in result):
        if len(result) != count:
            raise TypeError(f"the bus returned {len(result)} replies for {count} recipients")
        return list(result)
    raise TypeError(f"the bus returned {result!r}, not a Reply or one per recipient")


def fold(replies: Sequence[Reply], recipients: Sequence[str] = ()) -> Reply:
    """The one reply for many (see the module docstring)."""
    failures = [i for i, reply in enumerate(replies) if not reply.code.startswith("2")]
    if not failures:
        return replies[0].copy()
    temporary = [i for i in failures if not replies[i].code.startswith("5")]
    index = (temporary or failures)[0]
    chosen = replies[index].copy()
    if index < len(recipients) and recipients[index] not in chosen.message:
        chosen.message = f"<{recipients[index]}>: {chosen.message}"
    accepted = len(replies) - len(failures)
    if accepted:
        chosen.message += f"\nAccepted for {accepted} of {len(replies)} recipients"
    return chosen


def smtp_reply(result: object, envelope: Envelope) -> Reply:
    """What an SMTP client gets for the bus's ``result``: a Reply as it is, else the fold."""
    if isinstance(result, Reply) and not isinstance(result, RecipientReplies):
        return result
    replies = per_recipient(result, len(envelope.recipients))
    return fold(replies, envelope.recipients)

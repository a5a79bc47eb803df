"""Buses made of buses: :class:`ChainBus` (one after another) and :class:`TeeBus` (all at once).

The rule for both: the client gets a 2xx only if every *required* member answered 2xx. An
*optional* member (wrap it with :func:`optional`) is given the message too, but its failure is
logged and changes nothing for the client.

A partial failure leaves copies behind: when the Maildir copy succeeded and the relay then
answered 451, the client retries and the Maildir gets a second copy. That is the price of never
losing an acknowledged message (at-least-once delivery); consumers that care deduplicate by the
queue id, which is the same in every copy of one transaction.

Which reply the client sees:

- success: the reply of the last required member (``ChainBus([maildir, relay])`` passes on
  the relay's ``250`` with the next hop's queue id);
- failure: the reply of the first required member that failed, in member order.

:class:`ChainBus` stops at the first required failure (a relay is not tried once the local
copy failed). :class:`TeeBus` sends to every member concurrently and waits for all of them,
optional ones included, because no member may still be reading the spooled message when the
edge discards it.

Both forward ``start()`` and ``stop()`` to members that have them (see
:mod:`slimta_tx.bus.loader`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from slimta_tx.envelope import Envelope
from slimta_tx.interfaces import IBus
from slimta_tx.reply import Reply

__all__ = ["ChainBus", "Member", "TeeBus", "optional"]

_LOCAL_ERROR = ("451", "Local error in processing; try again later", "4.3.0")


@dataclass(frozen=True)
class Member:
    """A bus in a composition. ``required=False``: its failure does not fail the message."""

    bus: Any
    required: bool = True
    name: str = ""

    @property
    def label(self) -> str:
        return self.name or type(self.bus).__name__


def optional(bus: Any, name: str = "") -> Member:
    """Mark ``bus`` as a best-effort member (e.g. an archive copy)."""
    return Member(bus, required=False, name=name)


def _members(buses: Sequence[Any]) -> list[Member]:
    members = [b if isinstance(b, Member) else Member(b) for b in buses]
    if not members:
        raise ValueError("a composed bus needs at least one member")
    if not any(m.required for m in members):
        raise ValueError("a composed bus needs at least one required member")
    for member in members:
        if not callable(getattr(member.bus, "send", None)):
            raise TypeError(f"{member.bus!r} is not a bus: it needs a send(envelope) method")
    return members


class _Composed:
    log = Logger()

    def __init__(self, buses: Sequence[Any]) -> None:
        self.members = _members(buses)

    def _send_one(self, member: Member, envelope: Envelope) -> Deferred[Reply]:
        """One member's reply; an exception or a non-reply becomes 451 4.3.0 (logged)."""

        def failed(failure: Failure) -> Reply:
            self.log.failure(
                "bus {member} failed on {queue_id}",
                failure,
                member=member.label,
                queue_id=envelope.queue_id,
            )
            return Reply(*_LOCAL_ERROR)

        def checked(reply: object) -> Reply:
            if not isinstance(reply, Reply):
                self.log.error(
                    "bus {member} answered {reply!r}, not a Reply",
                    member=member.label,
                    reply=reply,
                )
                return Reply(*_LOCAL_ERROR)
            return reply

        d: Deferred[Reply] = maybeDeferred(member.bus.send, envelope)
        return d.addCallbacks(checked, failed)

    def send(self, envelope: Envelope) -> Deferred[Reply]:
        return Deferred.fromCoroutine(self._send(envelope))

    async def _send(self, envelope: Envelope) -> Reply:
        raise NotImplementedError

    def _verdict(self, envelope: Envelope, replies: list[tuple[Member, Reply]]) -> Reply:
        """The first refusal of a required member, else the last required member's reply."""
        answer: Reply | None = None
        for member, reply in replies:
            self._note(member, envelope, reply)
            if not member.required:
                continue
            if not reply.code.startswith("2"):
                return reply
            answer = reply
        assert answer is not None  # at least one required member
        return answer

    def _note(self, member: Member, envelope: Envelope, reply: Reply) -> None:
        if not reply.code.startswith("2"):
            self.log.warn(
                "{kind} bus {member} refused {queue_id}: {reply}",
                kind="required" if member.required else "optional",
                member=member.label,
                queue_id=envelope.queue_id,
                reply=str(reply),
            )

    def start(self) -> None:
        for member in self.members:
            start = getattr(member.bus, "start", None)
            if callable(start):
                start()

    def stop(self) -> Deferred[None]:
        async def stop_all() -> None:
            for member in reversed(self.members):
                stop = getattr(member.bus, "stop", None)
                if callable(stop):
                    try:
                        await maybeDeferred(stop)
                    except Exception:
                        self.log.failure("stopping bus {member} failed", member=member.label)

        return Deferred.fromCoroutine(stop_all())


@implementer(IBus)
class ChainBus(_Composed):
    """Send to each member in order; stop at the first required member that refuses.

    ``ChainBus([MaildirBus(path), relay])``: a local copy, then the next hop.
    """

    async def _send(self, envelope: Envelope) -> Reply:
        replies: list[tuple[Member, Reply]] = []
        for member in self.members:
            reply = await self._send_one(member, envelope)
            replies.append((member, reply))
            if member.required and not reply.code.startswith("2"):
                break  # later members never see a message the chain refused
        return self._verdict(envelope, replies)


@implementer(IBus)
class TeeBus(_Composed):
    """Send to every member at once; wait for all; 2xx only if all required members said 2xx."""

    async def _send(self, envelope: Envelope) -> Reply:
        sent = [(member, self._send_one(member, envelope)) for member in self.members]
        return self._verdict(envelope, [(member, await d) for member, d in sent])

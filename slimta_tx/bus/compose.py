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

Per-recipient results (see :mod:`slimta_tx.results`): when a member answers one reply per
recipient, the rule holds recipient by recipient, and the composition answers one reply per
recipient too (a recipient's verdict is its first required refusal, else the last required
member's reply for it). :class:`ChainBus` hands each next member only the recipients that every
earlier required member accepted (:meth:`Envelope.subset`); it stops when none is left. When
every member answers one reply, so does the composition, as before.

Both forward ``start()`` and ``stop()`` to members that have them (see
:mod:`slimta_tx.bus.loader`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Union, cast

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from slimta_tx.envelope import Envelope
from slimta_tx.interfaces import IBus, IReadiness
from slimta_tx.reply import Reply
from slimta_tx.results import per_recipient

__all__ = ["ChainBus", "Member", "TeeBus", "optional"]

_LOCAL_ERROR = ("451", "Local error in processing; try again later", "4.3.0")
Result = Union[Reply, list[Reply]]
# A member, what it answered, and the recipients (indices in the envelope) it was given.
_Answer = tuple["Member", Result, list[int]]


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

    def _send_one(self, member: Member, envelope: Envelope) -> Deferred[Result]:
        """One member's reply (or one per recipient); an exception or anything else becomes
        451 4.3.0 (logged)."""

        def failed(failure: Failure) -> Reply:
            self.log.failure(
                "bus {member} failed on {queue_id}",
                failure,
                member=member.label,
                queue_id=envelope.queue_id,
            )
            return Reply(*_LOCAL_ERROR)

        def checked(result: object) -> Result:
            if isinstance(result, Reply):
                return result
            try:
                return per_recipient(result, len(envelope.recipients))
            except TypeError as e:
                self.log.error("bus {member}: {problem}", member=member.label, problem=str(e))
                return Reply(*_LOCAL_ERROR)

        d: Deferred[Result] = maybeDeferred(member.bus.send, envelope)
        return d.addCallbacks(checked, failed)

    def send(self, envelope: Envelope) -> Deferred[Result]:
        return Deferred.fromCoroutine(self._send(envelope))

    async def _send(self, envelope: Envelope) -> Result:
        raise NotImplementedError

    def _verdict(self, envelope: Envelope, answers: list[_Answer]) -> Result:
        """Recipient by recipient: the first refusal of a required member, else the last
        required member's reply. One reply when every member gave one."""
        count = len(envelope.recipients)
        verdict: list[Reply | None] = [None] * count
        refused = [False] * count
        for member, result, indices in answers:
            self._note(member, envelope, result)
            if not member.required:
                continue
            for index, reply in zip(indices, per_recipient(result, len(indices)), strict=True):
                if refused[index]:
                    continue
                verdict[index] = reply
                refused[index] = not reply.code.startswith("2")
        if all(isinstance(result, Reply) for _, result, _ in answers):
            # As before per-recipient results: the first required refusal, else the last
            # required member's reply.
            for member, result, _ in answers:
                if member.required and not cast(Reply, result).code.startswith("2"):
                    return cast(Reply, result)
            return [result for member, result, _ in answers if member.required][-1]
        assert all(reply is not None for reply in verdict)
        return cast(list[Reply], verdict)

    def _note(self, member: Member, envelope: Envelope, result: Result) -> None:
        refusals = [str(r) for r in _replies(result) if not r.code.startswith("2")]
        if refusals:
            self.log.warn(
                "{kind} bus {member} refused {queue_id}: {reply}",
                kind="required" if member.required else "optional",
                member=member.label,
                queue_id=envelope.queue_id,
                reply=" | ".join(refusals),
            )

    def start(self) -> None:
        for member in self.members:
            start = getattr(member.bus, "start", None)
            if callable(start):
                start()

    def ready(self) -> Deferred[str | None]:
        """IReadiness: the first reason a required member gives for not being ready."""

        async def check_all() -> str | None:
            for member in self.members:
                ready = getattr(member.bus, "ready", None)
                if member.required and callable(ready):
                    reason = await maybeDeferred(ready)
                    if reason:
                        return f"{member.label}: {reason}"
            return None

        return Deferred.fromCoroutine(check_all())

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


@implementer(IBus, IReadiness)
class ChainBus(_Composed):
    """Send to each member in order; stop at the first required member that refuses.

    ``ChainBus([MaildirBus(path), relay])``: a local copy, then the next hop.
    """

    async def _send(self, envelope: Envelope) -> Result:
        answers: list[_Answer] = []
        alive = list(range(len(envelope.recipients)))
        for member in self.members:
            target = envelope if len(alive) == len(envelope.recipients) else envelope.subset(alive)
            result = await self._send_one(member, target)
            answers.append((member, result, alive))
            if member.required:
                replies = per_recipient(result, len(alive))
                alive = [i for i, r in zip(alive, replies, strict=True) if r.code.startswith("2")]
                if not alive:
                    break  # later members never see a message the chain refused
        return self._verdict(envelope, answers)


@implementer(IBus, IReadiness)
class TeeBus(_Composed):
    """Send to every member at once; wait for all; 2xx only if all required members said 2xx."""

    async def _send(self, envelope: Envelope) -> Result:
        everyone = list(range(len(envelope.recipients)))
        sent = [(member, self._send_one(member, envelope)) for member in self.members]
        return self._verdict(envelope, [(member, await d, everyone) for member, d in sent])


def _replies(result: Result) -> list[Reply]:
    return [result] if isinstance(result, Reply) else list(result)

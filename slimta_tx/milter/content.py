"""The message stage of the milters: headers, body, end of message, and what they change.

:func:`send_message` streams one message to one milter (each header field, end of headers,
the body in chunks from the spool, end of message; within the milter's content timeout, which
``SMFIR_PROGRESS`` starts again) and gathers what it asks for (:class:`Modifications`);
:func:`apply` makes the accepted changes the message (a new spool) and envelope that the next
milter and the bus get, and records them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from slimta_tx.address import ArgumentError, parse_rcpt_argument
from slimta_tx.envelope import Envelope
from slimta_tx.milter import codec
from slimta_tx.milter.client import MilterTimeout
from slimta_tx.milter.codec import Negotiated, ProtocolError, Response
from slimta_tx.milter.macros import MacroContext
from slimta_tx.milter.message import (
    MAX_HEAD_SIZE,
    BodyWriter,
    Edits,
    Head,
    body_chunks,
    rewrite,
    split_field,
)
from slimta_tx.reply import Reply

if TYPE_CHECKING:  # pragma: no cover
    from slimta_tx.milter.link import Link
    from slimta_tx.milter.session import MilterSession

__all__ = ["DISCARD", "Modifications", "Verdict", "apply", "send_message"]

#: Modification requests one milter may send at the end of one message.
MAX_MODIFICATIONS = 10_000
#: Bytes a batch of header packets may take before waiting for the socket to drain.
_WRITE_BATCH = 64 * 1024
DISCARD = "discard"
_EOB = codec.packet(codec.SMFIC_BODYEOB)
Verdict = Reply | str | None  # a reply, "discard", or None: go on
# What each modification needs to have been negotiated.
_NEEDS = {
    "add_header": codec.SMFIF_ADDHDRS,
    "insert_header": codec.SMFIF_ADDHDRS,
    "change_header": codec.SMFIF_CHGHDRS,
    "change_from": codec.SMFIF_CHGFROM,
    "delete_rcpt": codec.SMFIF_DELRCPT,
    "replace_body": codec.SMFIF_CHGBODY,
}


@dataclass
class Modifications:
    """What one milter asked for at the end of one message."""

    edits: Edits
    body: BodyWriter | None = None
    sender: tuple[str, tuple[str, ...]] | None = None
    added: list[tuple[str, tuple[str, ...]]] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    quarantine: str | None = None
    actions: list[dict[str, str]] = field(default_factory=list)
    count: int = 0


async def send_message(
    session: MilterSession, link: Link, envelope: Envelope, head: Head
) -> tuple[Verdict, Modifications | None]:
    """One message to one milter: its verdict, and its changes (None if it asked for none)."""
    return await _MessageStage(session, link, envelope).run(head)


class _MessageStage:
    """One message on its way to one milter.

    Packets that need no answer (no-reply flags, macros) wait in ``_out`` and go out with the
    next packet that does, or once ``_WRITE_BATCH`` bytes have gathered (then the socket
    buffer is let drain): one write for what libmilter reads in one go.
    """

    def __init__(self, session: MilterSession, link: Link, envelope: Envelope) -> None:
        connection, negotiated = link.connection, link.negotiated
        assert connection is not None and negotiated is not None
        self.session = session
        self.clock = session.clock
        self.link = link
        self.connection = connection
        self.negotiated = negotiated
        self.envelope = envelope
        self.timeout = link.milter.content_timeout
        self.deadline = self.clock.seconds() + self.timeout
        self.context = MacroContext(session.session, envelope=envelope)
        self._out: list[bytes] = []
        self._size = 0

    def _late(self) -> MilterTimeout:
        return MilterTimeout(f"message not filtered within {self.timeout:g} seconds")

    async def write(self, data: bytes, answered: bool) -> None:
        """Queue ``data``; out now if an answer is due next (or the batch is full)."""
        if data:
            self._out.append(data)
            self._size += len(data)
        if answered or self._size >= _WRITE_BATCH:
            self.flush()
            if not answered:
                await self.drained()

    def flush(self) -> None:
        out = self._out
        if out:
            self.connection.send(out[0] if len(out) == 1 else b"".join(out))
            self._out, self._size = [], 0

    async def drained(self) -> None:
        d = self.connection.drained()
        if d.called:
            return
        timer = self.clock.callLater(max(self.deadline - self.clock.seconds(), 0.001), d.cancel)
        try:
            await d
        except Exception:
            raise self._late() from None
        finally:
            if timer.active():
                timer.cancel()

    async def answer(self, command: bytes) -> Verdict:
        left = self.deadline - self.clock.seconds()
        if left <= 0:
            raise self._late()
        response = await self.link.answer(self.clock, command, left)
        return self.session.decide(self.link, command, response)

    async def event(self, command: bytes) -> Verdict:
        """End of headers: its macros and the event, and the answer if one is due."""
        link = self.link
        no_event, no_reply = codec.EVENT_FLAGS[command]
        skipped = link.flag(no_event)
        await self.write(link.macro_packet(command, self.context), False)
        if skipped:
            return None
        answered = not link.flag(no_reply)
        await self.write(codec.packet(command), answered)
        return await self.answer(command) if answered else None

    async def run(self, head: Head) -> tuple[Verdict, Modifications | None]:
        link = self.link
        message = self.envelope.message
        assert message is not None
        leading_space = link.flag(codec.SMFIP_HDR_LEADSPC)
        # Headers.
        if not link.flag(codec.SMFIP_NOHDRS):
            answered = not link.flag(codec.SMFIP_NR_HDR)
            for raw in head.fields:
                if link.skip == codec.SMFIC_HEADER:
                    break
                name, value = split_field(raw, leading_space)
                await self.write(codec.header_packet(name, value), answered)
                if answered:
                    verdict = await self.answer(codec.SMFIC_HEADER)
                    if verdict is not None or link.message_done:
                        return verdict, None
        verdict = await self.event(codec.SMFIC_EOH)
        if verdict is not None or link.message_done:
            return verdict, None
        # Body, from the spool in chunks.
        if not link.flag(codec.SMFIP_NOBODY):
            answered = not link.flag(codec.SMFIP_NR_BODY)
            for chunk in body_chunks(message, head.body_offset):
                if link.skip == codec.SMFIC_BODY:
                    break
                await self.write(codec.packet(codec.SMFIC_BODY, chunk), answered)
                if answered:
                    verdict = await self.answer(codec.SMFIC_BODY)
                    if verdict is not None or link.message_done:
                        return verdict, None
        link.skip = None
        # End of message: modifications, then the decision.
        await self.write(link.macro_packet(codec.SMFIC_BODYEOB, self.context) + _EOB, True)
        return await self.end(head, leading_space)

    async def end(self, head: Head, leading_space: bool) -> tuple[Verdict, Modifications | None]:
        """The milter's answer to the end of the message and the changes it asks for."""
        changes: Modifications | None = None
        negotiated = self.negotiated
        while True:
            left = self.deadline - self.clock.seconds()
            if left <= 0:
                raise self._late()
            response = codec.parse_response(*await self.connection.next_packet(left))
            if response.kind == "progress":
                self.deadline = self.clock.seconds() + self.timeout
                continue
            if response.kind == "quarantine":
                if not negotiated.actions & codec.SMFIF_QUARANTINE:
                    raise ProtocolError("quarantine without negotiating it")
                if changes is None:
                    changes = Modifications(Edits(list(head.fields), leading_space))
                changes.quarantine = response.text or "quarantined by milter"
                changes.actions.append({"action": "quarantine", "detail": changes.quarantine})
                continue
            if response.is_modification:
                if changes is None:
                    changes = Modifications(Edits(list(head.fields), leading_space))
                modify(self.session, self.link, negotiated, response, changes)
                continue
            return self.session.decide(self.link, codec.SMFIC_BODYEOB, response), changes


def modify(
    session: MilterSession,
    link: Link,
    negotiated: Negotiated,
    response: Response,
    changes: Modifications,
) -> None:
    kind = response.kind
    needed = _NEEDS.get(kind)
    if kind == "add_rcpt":
        needed = codec.SMFIF_ADDRCPT_PAR
        if not response.args:
            needed |= codec.SMFIF_ADDRCPT
    if needed is not None and not negotiated.actions & needed:
        raise ProtocolError(f"{kind} without negotiating it")
    changes.count += 1
    if changes.count > MAX_MODIFICATIONS:
        raise ProtocolError(f"more than {MAX_MODIFICATIONS} modifications")
    if kind == "add_header":
        changes.edits.add(response.name, response.value)
    elif kind == "insert_header":
        changes.edits.insert(response.index, response.name, response.value)
    elif kind == "change_header":
        changes.edits.change(response.index, response.name, response.value)
    elif kind == "replace_body":
        if changes.body is None:
            limit = session.proto.policy.max_message_size
            changes.body = BodyWriter(session.proto.edge.spool_factory(), limit)
        changes.body.write(response.data)
        if changes.count == 1 or changes.actions[-1]["action"] != "replace_body":
            changes.actions.append({"action": "replace_body", "detail": ""})
        return
    elif kind == "change_from":
        changes.sender = (bare(response.address), response.args)
    elif kind == "add_rcpt":
        changes.added.append((bare(response.address), response.args))
    elif kind == "delete_rcpt":
        changes.deleted.append(bare(response.address))
    if kind.endswith("_header") and sum(map(len, changes.edits.fields)) > MAX_HEAD_SIZE:
        raise ProtocolError(f"header section grew past {MAX_HEAD_SIZE} bytes")
    detail = (
        response.name.decode("utf-8", "replace")
        if kind.endswith("_header")
        else bare(response.address)
    )
    changes.actions.append({"action": kind, "detail": detail})


def apply(
    session: MilterSession, link: Link, envelope: Envelope, head: Head, changes: Modifications
) -> Head:
    """Make one milter's accepted changes the message and envelope the rest see."""
    for action in changes.actions:
        session.note(link, action["action"], action["detail"])
    if changes.quarantine is not None:
        envelope.quarantine = changes.quarantine
    if changes.sender is not None:
        sender, args = changes.sender
        envelope.sender = sender
        for arg in args:
            key, _, value = arg.partition("=")
            envelope.mail_params[key.upper()] = value or None
    for address in changes.deleted:
        kept = [
            (rcpt, params)
            for rcpt, params in zip(envelope.recipients, envelope.rcpt_params, strict=True)
            if rcpt.lower() != address.lower()
        ]
        envelope.recipients = [rcpt for rcpt, _ in kept]
        envelope.rcpt_params = [params for _, params in kept]
    for address, args in changes.added:
        try:
            parsed = parse_rcpt_argument(f"TO:<{address}>", utf8=True)
        except ArgumentError:
            session.warn(link, codec.SMFIC_BODYEOB, f"ignored invalid recipient {address!r}")
            continue
        params: dict[str, str | None] = {}
        for arg in args:
            key, _, value = arg.partition("=")
            params[key.upper()] = value or None
        envelope.add_recipient(parsed.address, params)
    body = changes.body.finish() if changes.body is not None else None
    if body is not None:
        session.spools.append(body)
    if not changes.edits.changed and body is None:
        return head
    assert envelope.message is not None
    edited = Head(changes.edits.fields, head.body_offset, head.separator)
    target = session.proto.edge.spool_factory()
    session.spools.append(target)
    edited = rewrite(target, edited, body, envelope.message)
    envelope.message = target
    return edited


def bare(address: str) -> str:
    """An address without its angle brackets."""
    address = address.strip()
    if address.startswith("<") and address.endswith(">"):
        address = address[1:-1]
    return address

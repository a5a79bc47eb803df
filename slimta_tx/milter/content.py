"""The message stage of the milters: headers, body, end of message, and what they change.

:func:`send_message` streams one message to one milter (each header field, end of headers,
the body in chunks from the spool, end of message; within the milter's content timeout, which
``SMFIR_PROGRESS`` starts again) and gathers what it asks for (:class:`Modifications`);
:func:`apply` makes the accepted changes the message (a new spool) and envelope that the next
milter and the bus get, and records them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from slimta_tx.address import ArgumentError, parse_rcpt_argument
from slimta_tx.envelope import Envelope
from slimta_tx.milter import codec
from slimta_tx.milter.client import MilterTimeout
from slimta_tx.milter.codec import Negotiated, ProtocolError, Response
from slimta_tx.milter.macros import MacroContext, macro_values
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
    connection = link.connection
    negotiated = link.negotiated
    assert connection is not None and negotiated is not None and envelope.message is not None
    timeout = link.milter.content_timeout
    deadline = [session.clock.seconds() + timeout]
    context = MacroContext(session.session, envelope=envelope)
    leading_space = link.flag(codec.SMFIP_HDR_LEADSPC)

    async def answer(command: bytes) -> Verdict:
        left = deadline[0] - session.clock.seconds()
        if left <= 0:
            raise MilterTimeout(f"message not filtered within {timeout:g} seconds")
        response = await link.answer(session.clock, command, left)
        return session.decide(link, command, response)

    async def drained() -> None:
        d = connection.drained()
        timer = session.clock.callLater(
            max(deadline[0] - session.clock.seconds(), 0.001), d.cancel
        )
        try:
            await d
        except Exception:
            raise MilterTimeout(f"message not filtered within {timeout:g} seconds") from None
        finally:
            if timer.active():
                timer.cancel()

    # Headers.
    if not link.flag(codec.SMFIP_NOHDRS):
        replies = not link.flag(codec.SMFIP_NR_HDR)
        batch = b""
        for raw in head.fields:
            if link.skip == codec.SMFIC_HEADER:
                break
            name, value = split_field(raw, leading_space)
            batch += codec.header_packet(name, value)
            if replies:
                connection.send(batch)
                batch = b""
                verdict = await answer(codec.SMFIC_HEADER)
                if verdict is not None or link.message_done:
                    return verdict, None
            elif len(batch) >= _WRITE_BATCH:
                connection.send(batch)
                batch = b""
                await drained()
        if batch:
            connection.send(batch)
    verdict = await _message_event(session, link, codec.SMFIC_EOH, b"", context, answer)
    if verdict is not None or link.message_done:
        return verdict, None
    # Body, from the spool in chunks.
    if not link.flag(codec.SMFIP_NOBODY):
        replies = not link.flag(codec.SMFIP_NR_BODY)
        for chunk in body_chunks(envelope.message, head.body_offset):
            if link.skip == codec.SMFIC_BODY:
                break
            connection.send(codec.packet(codec.SMFIC_BODY, chunk))
            if replies:
                verdict = await answer(codec.SMFIC_BODY)
                if verdict is not None or link.message_done:
                    return verdict, None
            else:
                await drained()
    link.skip = None
    # End of message: modifications, then the decision.
    macros = macro_values(link.macros(codec.SMFIC_BODYEOB), context)
    out = codec.macro_packet(codec.SMFIC_BODYEOB, macros) if macros else b""
    connection.send(out + codec.packet(codec.SMFIC_BODYEOB))
    changes = Modifications(Edits(list(head.fields), leading_space))
    while True:
        left = deadline[0] - session.clock.seconds()
        if left <= 0:
            raise MilterTimeout(f"message not filtered within {timeout:g} seconds")
        response = codec.parse_response(*await connection.next_packet(left))
        if response.kind == "progress":
            deadline[0] = session.clock.seconds() + timeout
            continue
        if response.kind == "quarantine":
            if not negotiated.actions & codec.SMFIF_QUARANTINE:
                raise ProtocolError("quarantine without negotiating it")
            changes.quarantine = response.text or "quarantined by milter"
            changes.actions.append({"action": "quarantine", "detail": changes.quarantine})
            continue
        if response.is_modification:
            modify(session, link, negotiated, response, changes)
            continue
        return session.decide(link, codec.SMFIC_BODYEOB, response), changes


async def _message_event(
    session: MilterSession,
    link: Link,
    command: bytes,
    data: bytes,
    context: MacroContext,
    answer: Callable[[bytes], Awaitable[Verdict]],
) -> Verdict:
    connection = link.connection
    assert connection is not None
    macros = macro_values(link.macros(command), context)
    out = codec.macro_packet(command, macros) if macros else b""
    skipped = link.flag(codec.EVENT_FLAGS[command][0])
    if not skipped:
        out += codec.packet(command, data)
    if out:
        connection.send(out)
    if skipped or link.flag(codec.EVENT_FLAGS[command][1]):
        return None
    return await answer(command)


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

"""One transaction of the relay bus on a connection that is set up and ready for MAIL.

::

    RSET (reused connections only), MAIL, RCPT..., DATA    <- one write with PIPELINING
    <message, streamed and dot-stuffed from the spool>     <- see below for who gets it
    one reply (SMTP) or one per accepted recipient (LMTP)

A ``BODY=BINARYMIME`` message goes as ``BDAT <size> LAST`` and its octets as they are
(RFC 3030) instead of DATA, only to a next hop that offers BINARYMIME and CHUNKING.

Recipients refused at RCPT: when the client can be told per recipient (an LMTP listener, see
:attr:`Envelope.replies_per_recipient`) the message goes to the others and each recipient gets
its own result; otherwise nothing is delivered to anyone (all or nothing, since an SMTP client
has one reply left to give: see :mod:`slimta_tx.bus.replies`).

After a delivery to a next hop that does not offer DSN, recipients that asked
``NOTIFY=SUCCESS`` are reported "relayed" to the sender (RFC 3461 5.2.2) by a notice sent on
the same connection (:mod:`slimta_tx.bus.notices`).
"""

from __future__ import annotations

import time
from itertools import chain
from typing import cast

from twisted.internet.defer import DeferredList
from twisted.logger import Logger
from twisted.python.failure import Failure

from slimta_tx.bus import replies
from slimta_tx.bus.notices import Notice, relayed_notice
from slimta_tx.bus.outbound import (
    NextHop,
    capability_refusal,
    mail_command,
    rcpt_command,
    wants_relayed_notice,
)
from slimta_tx.bus.smtp_client import NextHopClosed, SmtpClientProtocol
from slimta_tx.envelope import Envelope
from slimta_tx.reply import Reply
from slimta_tx.results import BusResult

__all__ = ["RetryOnFresh", "run"]

log = Logger(namespace="slimta_tx.bus.relay")


class RetryOnFresh(Exception):
    """A reused connection was dead before it answered anything of this transaction."""


def _ok(reply: Reply) -> bool:
    return reply.code.startswith("2")


async def run(
    client: SmtpClientProtocol,
    hop: NextHop,
    envelope: Envelope,
    reused: bool,
    lmtp: bool,
    hostname: str,
    hop_name: str,
) -> tuple[BusResult, bool]:
    """Our result for ``envelope`` and whether the connection is clean for another message."""
    message = envelope.message
    assert message is not None, "the envelope has no message"
    header = envelope.received_header()
    size = len(header) + message.size
    refusal = capability_refusal(envelope, hop, size)
    if refusal is not None:
        return refusal, True
    ext = hop.extensions
    binary = envelope.body == "BINARYMIME"
    partial = envelope.replies_per_recipient
    count = len(envelope.recipients)
    commands = [b"RSET"] if reused else []
    commands.append(mail_command(envelope, ext, size))
    commands += [rcpt_command(envelope, i, ext) for i in range(count)]
    if not binary:
        commands.append(b"DATA")
    answers = await _exchange(client, commands, "PIPELINING" in ext, reused, partial)
    if reused:
        if not _ok(answers.pop(0)):
            raise RetryOnFresh()
    mail, rcpts = answers[0], answers[1 : 1 + count]
    data = answers[1 + count] if not binary and len(answers) > 1 + count else None
    # A 354 to DATA that we will not follow with a message: drop the connection, so the
    # next hop discards the transaction.
    clean = data is None or data.code != "354"
    if not _ok(mail):
        return replies.from_next_hop(mail), clean
    accepted = [i for i, answer in enumerate(rcpts) if _ok(answer)]
    if len(accepted) < count and (not partial or not accepted):
        if partial:
            return [replies.from_next_hop(answer, "1.0") for answer in rcpts], clean
        refused = replies.combine_recipients(envelope.recipients, rcpts, delivered=False)
        assert refused is not None
        return refused, clean
    chunks = chain((header,), message.chunks())
    if binary:
        await client.send_bdat(chunks, size)
    else:
        assert data is not None
        if data.code != "354":
            failed = replies.from_next_hop(data)
            if partial:
                return _merge(rcpts, accepted, [failed] * len(accepted)), True
            return failed, True
        await client.send_body(chunks)
    if lmtp:
        finals = [await client.expect() for _ in accepted]
    else:
        final = await client.expect()
        finals = [final] * len(accepted)
    clean = True  # the transaction is over: the connection may take another
    delivered = [i for i, final in zip(accepted, finals, strict=True) if _ok(final)]
    result: BusResult
    if partial:
        result = _merge(rcpts, accepted, finals)
    elif lmtp:
        refused = replies.combine_recipients(envelope.recipients, finals, delivered=True)
        result = refused or replies.success(finals[-1])
    else:
        result = replies.success(finals[0]) if _ok(finals[0]) else replies.from_next_hop(finals[0])
    notify = [i for i in wants_relayed_notice(envelope, ext) if i in delivered]
    if notify:
        notice = relayed_notice(
            envelope, notify, hostname, hop_name, finals[accepted.index(notify[0])], time.time()
        )
        clean = await _send_notice(client, hop, notice, lmtp, envelope.queue_id)
    return result, clean


def _merge(rcpts: list[Reply], accepted: list[int], finals: list[Reply]) -> list[Reply]:
    """One result per recipient: the RCPT refusal, or what followed the data."""
    out = [replies.from_next_hop(answer, "1.0") for answer in rcpts]
    for index, final in zip(accepted, finals, strict=True):
        out[index] = replies.success(final) if _ok(final) else replies.from_next_hop(final)
    return out


async def _exchange(
    client: SmtpClientProtocol,
    commands: list[bytes],
    pipelined: bool,
    reused: bool,
    partial: bool,
) -> list[Reply]:
    """Send the commands up to DATA; their replies (fewer when stopping early without
    PIPELINING: after a refused RSET/MAIL, or before DATA when no RCPT was accepted, or any
    was refused and ``partial`` delivery is not wanted)."""
    if pipelined:
        results = await DeferredList(client.send_lines(commands), consumeErrors=True)
        if reused and results[0][0] and not _ok(results[0][1]):
            raise RetryOnFresh()  # e.g. a 421 to RSET: the next hop hung up on us
        answers: list[Reply] = []
        for index, (ok, value) in enumerate(results):
            if not ok:
                failure = cast(Failure, value)
                if index == 0 and reused and failure.check(NextHopClosed):
                    raise RetryOnFresh()
                failure.raiseException()
            answers.append(value)
        return answers
    answers = []
    rcpts: list[Reply] = []
    for index, line in enumerate(commands):
        if line == b"DATA":
            if not any(_ok(a) for a in rcpts) or (not partial and not all(map(_ok, rcpts))):
                break
        try:
            answer = await client.command(line)
        except NextHopClosed:
            if index == 0 and reused:
                raise RetryOnFresh() from None
            raise
        answers.append(answer)
        if line[:4] in (b"RSET", b"MAIL") and not _ok(answer):
            break
        if line[:4] == b"RCPT":
            rcpts.append(answer)
    return answers


async def _send_notice(
    client: SmtpClientProtocol, hop: NextHop, notice: Notice, lmtp: bool, queue_id: str
) -> bool:
    """Send a notice from ``<>`` through the next hop (best effort: a failure is logged).
    Returns whether the connection is clean for another message."""
    ext = hop.extensions
    if notice.smtputf8 and "SMTPUTF8" not in ext:
        log.warn("relayed notice for {queue_id}: next hop lacks SMTPUTF8", queue_id=queue_id)
        return True
    params = " SMTPUTF8" if notice.smtputf8 else ""
    if notice.smtputf8 and "8BITMIME" in ext:
        params += " BODY=8BITMIME"
    lines = [b"MAIL FROM:<>" + params.encode(), f"RCPT TO:<{notice.recipient}>".encode()]
    for line in lines:
        answer = await client.command(line)
        if not _ok(answer):
            log.warn(
                "relayed notice for {queue_id} refused: {reply}", queue_id=queue_id, reply=answer
            )
            return await _reset(client)
    answer = await client.command(b"DATA")
    if answer.code != "354":
        log.warn("relayed notice for {queue_id} refused: {reply}", queue_id=queue_id, reply=answer)
        return await _reset(client)
    await client.send_body([notice.data])
    final = await client.expect()
    log.info(
        "relayed notice for {queue_id} to <{sender}>: {reply}",
        queue_id=queue_id,
        sender=notice.recipient,
        reply=final,
    )
    return True


async def _reset(client: SmtpClientProtocol) -> bool:
    return _ok(await client.command(b"RSET"))

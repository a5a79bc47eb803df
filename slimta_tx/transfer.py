"""The message part of a session: the body's spool and decoder, then the bus, then the reply.

:class:`MessageTransfer` is one half of :class:`slimta_tx.protocol.ESMTPServerProtocol`
(which it is mixed into): what happens from the ``354`` (or the first ``BDAT``) to the reply
after the final dot. The body goes through the sans-I/O :class:`slimta_tx.data.DataDecoder`
into a :class:`slimta_tx.spool.Spool`; a refused body (too big, bare newlines, NUL, a long
line) or a spool error gets its reply here; otherwise the ``HAVE_DATA`` hook and the milters,
then the bus, decide the reply. Subclasses (LMTP) change :meth:`client_reply` and
:meth:`_complete_transaction`.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IReactorTime

from slimta_tx.data import DataDecoder, DataResult
from slimta_tx.reply import Reply
from slimta_tx.results import smtp_reply
from slimta_tx.spool import Spool, not_stored
from slimta_tx.state import State

if TYPE_CHECKING:  # pragma: no cover
    from slimta_tx.deadlines import SessionDeadlines
    from slimta_tx.envelope import Envelope, Session
    from slimta_tx.factory import SmtpEdge
    from slimta_tx.lines import LineReader
    from slimta_tx.milter.session import MilterSession
    from slimta_tx.policy import Policy

__all__ = ["MessageTransfer"]

_DATA_REFUSALS = {
    DataResult.TOO_BIG: Reply("552", "Message too big for system", "5.3.4"),
    DataResult.LINE_TOO_LONG: Reply("500", "Line too long in message", "5.5.6"),
    DataResult.BARE_NEWLINE: Reply(
        "550", "Message contains bare CR or LF; lines must end with CRLF", "5.5.2"
    ),
    DataResult.NUL: Reply("550", "Message contains NUL characters", "5.6.0"),
}
_REFUSAL_REASONS = {  # the smtp.reject event's reason (slimta_tx.events)
    DataResult.TOO_BIG: "size",
    DataResult.LINE_TOO_LONG: "line_length",
    DataResult.BARE_NEWLINE: "bare_newline",
    DataResult.NUL: "nul",
}
_DATA_OK = DataResult.OK
_READY = State.READY


class MessageTransfer:
    """The body and the transaction's end, for the protocol it is mixed into."""

    if TYPE_CHECKING:  # what the protocol provides
        edge: SmtpEdge
        policy: Policy
        clock: IReactorTime
        session: Session
        reader: LineReader
        state: State
        deadlines: SessionDeadlines
        milters: MilterSession | None

        def restart_timer(self, seconds: float) -> None: ...
        def send(self, reply: Reply, enhanced: bool = True) -> None: ...
        def call_hook(self, name: str, reply: Reply, *extra: Any) -> Deferred[Reply] | Reply: ...
        def run_step(
            self,
            d: Deferred[Reply] | Reply,
            then: Callable[[Reply], None],
            check: Callable[[Any], Reply] | None = None,
        ) -> None: ...

    decoder: DataDecoder | None = None
    _spool: Spool | None = None
    # When the body began (354 or first BDAT) and ended: the transaction event's timings.
    _data_at = 0.0
    _dot_at = 0.0

    def start_data(self, unstuff: bool = True) -> None:
        """Spool a message body: DATA (``unstuff``) or BDAT chunks (as they are)."""
        self._spool = self.edge.spool_factory()
        self.decoder = DataDecoder(
            self._spool.write,
            max_size=self.policy.max_message_size,
            max_line_length=self.policy.max_line_length,
            bare_newline=self.policy.bare_newline,
            unstuff=unstuff,
            nul=self.policy.nul,
        )
        self._data_at = self.clock.seconds()
        self.deadlines.transfer_started()
        self.restart_timer(self.policy.data_timeout)

    def _data_bytes(self, data: bytes) -> None:
        assert self.decoder is not None
        self.deadlines.received += len(data)
        rest = self.decoder.feed(data)
        if rest is None:
            return
        if rest:
            self.reader.feed(rest)
        self.finish_message()

    def finish_message(self) -> None:
        """The body is complete (final dot, BDAT LAST) or refused: check it, then the bus."""
        decoder, spool, envelope = self.decoder, self._spool, self.session.envelope
        assert decoder is not None and spool is not None and envelope is not None
        self.decoder = None
        result = decoder.result
        refusal = None if result is _DATA_OK else _DATA_REFUSALS.get(result)
        self._dot_at = self.clock.seconds()
        if refusal is not None:
            refusal = refusal.copy()
            self.edge.events.rejected(self.session, _REFUSAL_REASONS[result], refusal)
            self._complete_transaction(refusal)
            return
        if spool.error is not None:  # full disk, I/O error: a 4xx, and the session goes on
            self._complete_transaction(not_stored(spool, self.session.address))
            return
        envelope.refresh_from(self.session)
        envelope.message = spool
        if "HAVE_DATA" not in self.edge.validators.active and self.milters is None:
            # Nothing could change the proposed 250: straight to the bus, whose Deferred gets
            # one pair of callbacks (which also check its reply).
            sent = maybeDeferred(self.edge.bus.send, envelope)
            self.run_step(sent, self._complete_transaction, partial(self.client_reply, envelope))
            return
        queued = Reply("250", f"Message queued as {envelope.queue_id}", "2.6.0")

        def deliver(reply: Reply) -> Deferred[Reply] | Reply:
            if not reply.code.startswith("2"):
                return reply
            if self.milters is not None and self.milters.discarded:
                return reply  # accepted and dropped: a milter's discard (logged there)
            sent = maybeDeferred(self.edge.bus.send, envelope)
            return sent.addCallback(lambda result: self.client_reply(envelope, result))

        hooked = self.call_hook("HAVE_DATA", queued, envelope)
        d: Any = hooked.addCallback(deliver) if isinstance(hooked, Deferred) else deliver(hooked)
        self.run_step(d, self._complete_transaction)

    def client_reply(self, envelope: Envelope, result: object) -> Reply:
        """The bus's result (one Reply, or one per recipient) as the reply to send: one
        summary for SMTP (:func:`slimta_tx.results.smtp_reply`); raises TypeError for
        anything else (the client then gets 451 4.3.0)."""
        return smtp_reply(result, envelope)

    @property
    def spool(self) -> Spool | None:
        """The body of the message in transfer, if any."""
        return self._spool

    def _complete_transaction(self, reply: Reply) -> None:
        envelope = self.session.envelope
        self.session.transactions += 1
        if envelope is not None:
            dot_at = self._dot_at
            self.edge.events.transaction(
                self.session,
                envelope,
                reply,
                dot_at - self._data_at,
                self.clock.seconds() - dot_at,
            )
        self.reset_transaction()
        self.state = _READY
        self.send(reply)

    def reset_transaction(self) -> None:
        self._discard_spool()
        self.session.envelope = None
        if self.milters is not None:
            self.milters.reset()

    def _discard_spool(self) -> None:
        self.decoder = None
        if self._spool is not None:
            self._spool.close()
            self._spool = None

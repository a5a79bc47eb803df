"""The session's replies out and its end: queued, written at the end of the reactor pass (or at
once), then the close.

:class:`ReplyOutput` is mixed into :class:`slimta_tx.protocol.ESMTPServerProtocol`. Replies are
queued by :meth:`~ReplyOutput.send` and written by :meth:`~ReplyOutput.flush`: on plain TCP at
the end of the reactor pass with the other connections' replies (:func:`slimta_tx.fastwrite.
flush_later`), at once otherwise. A 421 or 221 ends the session after it is written: on an idle
plain TCP connection at the end of the pass, without ``loseConnection``'s round through the
reactor (:func:`slimta_tx.fastwrite.close_now`); else with ``loseConnection`` and a 30 s
deadline for a client that does not read.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

from twisted.internet.interfaces import IDelayedCall, IReactorTime, ITransport

from slimta_tx import fastwrite
from slimta_tx.reply import Reply
from slimta_tx.state import State

if TYPE_CHECKING:  # pragma: no cover
    from slimta_tx.deadlines import SessionDeadlines
    from slimta_tx.factory import SmtpEdge

__all__ = ["ReplyOutput"]

_CONNECTED, _READY, _CLOSED = State.CONNECTED, State.READY, State.CLOSED


class ReplyOutput:
    """Queued replies, their writes and the session's close, for the protocol it is mixed
    into."""

    if TYPE_CHECKING:  # what the protocol provides
        edge: SmtpEdge
        clock: IReactorTime
        state: State
        deadlines: SessionDeadlines
        transport: ITransport | None
        _out: list[bytes]
        _last_words: Reply | None
        _closing: bool
        _flush_pending: bool
        _close_due: bool
        _abort_timer: IDelayedCall | None
        _timer_due: float | None

        def cancel_timer(self) -> None: ...

    def send(self, reply: Reply, enhanced: bool = True) -> None:
        """Queue ``reply``; a 421/221 also ends the session after it is written."""
        self._out.append(reply.render(enhanced))
        code = reply.code
        if code == "421" or code == "221":  # reply.closes_connection
            self.close_after_flush()
        elif self._last_words is not None and self.state in (_CONNECTED, _READY):
            self._out.append(self._last_words.render())
            self.close_after_flush()

    def send_wire(self, wire: bytes) -> None:
        """Queue a reply already rendered (one that neither closes nor follows the edge's
        shutdown: the caller sees to that)."""
        self._out.append(wire)

    def flush(self) -> None:
        """Send the queued replies: at the end of this reactor pass on plain TCP (see
        :func:`fastwrite.flush_later`), at once otherwise and whenever the session closes."""
        if self._out and not self._closing:
            if self._flush_pending:
                return
            # Alone on the edge, nothing could share the pass: send now (saves a callLater).
            if len(self.edge.connections) > 1 and fastwrite.flush_later(
                self.transport, self.flush_now
            ):
                self._flush_pending = True
                return
        self.flush_now()

    def flush_now(self) -> None:
        """Send the queued replies now (and close, if the session is closing)."""
        self._flush_pending = False
        out = self._out
        if out and self.transport is not None and self.state is not _CLOSED:
            self._out = []
            fastwrite.write(self.transport, out[0] if len(out) == 1 else b"".join(out))
        if (
            self._closing
            and self._abort_timer is None
            and not self._close_due
            and self.state is not _CLOSED
            and self.transport is not None
        ):
            if fastwrite.close_later(self.transport, self._close_at_end_of_pass):
                # Plain TCP: at the end of this pass, outside the transport's doRead, it
                # closes at once if the last reply is on the wire (no writability round
                # through the reactor).
                self._close_due = True
                return
            self._lose_connection()

    def _close_at_end_of_pass(self) -> None:
        self._close_due = False
        if self.state is _CLOSED or self.transport is None or self._abort_timer is not None:
            return
        if not fastwrite.close_now(self.transport):
            self._lose_connection()  # something was queued meanwhile: the usual way

    def _lose_connection(self) -> None:
        if self.transport is not None:
            self.transport.loseConnection()
            # A client that never reads cannot hold the connection open: 30 s to take the
            # last reply, then abort.
            self.cancel_timer()
            self._abort_timer = self.clock.callLater(30, self._abort_if_open)

    def close_after_flush(self) -> None:
        self._closing = True
        self._timer_due = None  # the idle timer is kept until the connection is closing
        self.deadlines.stop()

    def _abort_if_open(self) -> None:
        if self.state is not _CLOSED and self.transport is not None:
            cast(Any, self.transport).abortConnection()

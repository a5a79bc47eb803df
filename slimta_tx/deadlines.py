"""Deadlines an idle timer cannot give: the whole body transfer, a minimum rate, the session.

The idle timers (``Policy.command_timeout``, ``Policy.data_timeout``) restart with every byte,
so a client that drips one byte every few seconds is never cut off by them. These limits are
measured from the start instead:

- **data deadline** (``Policy.data_deadline``, 600 s): a message body, from the ``354`` (or
  the first ``BDAT`` chunk) to its end, including a body that is drained to its end only to be
  refused (too big, bare newlines);
- **minimum data rate** (``Policy.min_data_rate`` bytes/s after ``Policy.data_rate_grace``
  seconds): after the grace period the body must have averaged at least the rate since its
  start, counting the grace period (a client has ``grace`` seconds of credit, and every
  ``rate`` bytes it sends buy one more second). This is Postfix's ``smtpd_min_data_rate``
  model, with the grace period as the starting credit;
- **session deadline** (``Policy.session_deadline``, 3600 s): the whole connection. When it
  passes between transactions, or before a body has started, the session ends at once; a
  body in transfer or at the bus may finish (within the data deadline).

Each cut is ``421 4.4.2`` (RFC 3463 "bad connection": the transaction could not complete
because of a time-out or poor connection quality) and the connection closes; RFC 5321 3.8
allows closing after a timeout waiting for data.

Cheap on the hot path: one timer per session (a ``DelayedCall`` moved later, never sooner),
one clock read when a body starts, and a byte count per batch of input. The timer is set to the
earliest moment a limit could be crossed; when it fires early (more bytes arrived since), it
only moves itself on. Between bodies it is due within the time a body's first check needs
(``data_rate_grace``, 30 s), so a body that starts finds it due soon enough and leaves it alone:
a session of one message creates one timer and cancels it once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from twisted.internet.interfaces import IDelayedCall, IReactorTime

from slimta_tx import timers
from slimta_tx.reply import Reply
from slimta_tx.state import State

if TYPE_CHECKING:  # pragma: no cover
    from slimta_tx.protocol import ESMTPServerProtocol

__all__ = ["SessionDeadlines"]

_NEVER = float("inf")
# While a body is in transfer (or at the bus): the session deadline lets it finish.
_BODY_STATES = frozenset({State.DATA, State.BDAT, State.CHUNKING})


class SessionDeadlines:
    """The data deadline, minimum data rate and session deadline of one session.

    :param proto: the session; its ``policy`` holds the limits.
    :param clock: the edge's reactor (a ``Clock`` in tests).
    """

    __slots__ = (
        "_due",
        "_first",
        "_timer",
        "clock",
        "expired",
        "proto",
        "received",
        "session_ends",
        "started",
    )

    def __init__(self, proto: ESMTPServerProtocol, clock: IReactorTime) -> None:
        self.proto = proto
        self.clock = clock
        self.session_ends = _NEVER
        #: When the body in transfer started (None: none has yet).
        self.started: float | None = None
        #: Octets of the body in transfer received so far (counted by the protocol).
        self.received = 0
        self.expired = False
        self._timer: IDelayedCall | None = None
        self._due = _NEVER  # when the timer fires (_NEVER: no timer)
        # Seconds from a body's start to its first check (None: no body limits).
        self._first: float | None = None

    # -- called by the protocol ------------------------------------------------------------

    def start(self) -> None:
        """The connection is made: the session deadline starts now."""
        self.clock = self.proto.clock  # the session's (a test kit may have given it a Clock)
        policy = self.proto.policy
        first = policy.data_deadline or _NEVER
        if policy.min_data_rate and policy.data_rate_grace < first:
            first = policy.data_rate_grace
        self._first = first if first != _NEVER else None
        limit = policy.session_deadline
        now = self.clock.seconds()
        if limit:
            self.session_ends = now + limit
        self._schedule_idle(now)

    def _schedule_idle(self, now: float) -> None:
        """Between bodies: check again at the session deadline, or sooner (within the time a
        body's first check would need), so a body that starts never moves the timer sooner:
        moving it sooner is a cancel and a new timer, and that was twice per connection."""
        due = self.session_ends
        first = self._first
        if first is not None and now + first < due:
            due = now + first
        if due != _NEVER:
            self._schedule(due, max(due - now, 0.0))

    def transfer_started(self) -> None:
        """A message body starts (``354`` sent, or a first or refused ``BDAT`` chunk)."""
        self.started = now = self.clock.seconds()
        self.received = 0
        first = self._first
        # Usually nothing to do: the timer is already due sooner (a previous body's check),
        # and then it fires, finds this body and moves itself on.
        if first is not None and self._due > now + first:
            self._schedule(now + first, first)

    def stop(self) -> None:
        """The connection is gone (or closing): no more checks."""
        timer, self._timer = self._timer, None
        self._due = _NEVER
        if timer is not None and timer.active():
            timer.cancel()

    def _schedule(self, due: float, delay: float) -> None:
        """Run the check ``delay`` seconds from now (at ``due``), moving the one timer."""
        self._due = due
        self._timer = timers.move(self.clock, self._timer, delay, self._check)

    # -- the timer ---------------------------------------------------------------------------

    def _check(self) -> None:
        self._timer = None
        self._due = _NEVER
        proto = self.proto
        if proto.state is State.CLOSED:
            return
        now = self.clock.seconds()
        in_body = proto.state in _BODY_STATES
        if now >= self.session_ends and self._session_over(now, in_body):
            return
        started = self.started
        if started is None or not in_body or proto.waiting:
            self._schedule_idle(now)
            return
        body_due = self._body_due(now, started)
        if body_due is None:
            return  # cut off
        due = min(self.session_ends, body_due)
        if due != _NEVER:
            self._schedule(due, max(due - now, 0.0))

    def _session_over(self, now: float, in_body: bool) -> bool:
        """The session deadline has passed: True when the session was closed."""
        proto = self.proto
        reply = Reply(
            "421",
            f"{proto.policy.hostname} Session time limit reached, closing connection",
            "4.4.2",
        )
        if self.expired or not in_body:
            proto.edge.events.timed_out(
                proto.session,
                proto.state.value,
                "session_deadline",
                f"session time limit reached ({proto.policy.session_deadline:g}s)",
            )
            proto.force_close(reply)
            return True
        # A body in transfer or at the bus: let the transaction finish, then close.
        self.expired = True
        proto.shutdown(reply)
        if proto.state is State.CLOSED or proto.closing:
            return True
        grace = proto.policy.data_deadline or proto.policy.shutdown_grace
        self.session_ends = now + grace
        return False

    def _body_due(self, now: float, started: float) -> float | None:
        """Check the body in transfer: None if it was cut off, else when to look again."""
        policy = self.proto.policy
        elapsed = now - started
        due = _NEVER
        if policy.data_deadline:
            if elapsed >= policy.data_deadline:
                self._cut(
                    "data_deadline", "took too long", "Data transfer time limit reached", elapsed
                )
                return None
            due = started + policy.data_deadline
        rate, grace = policy.min_data_rate, policy.data_rate_grace
        if rate:
            # The moment the average falls under the rate if nothing more arrives.
            behind = started + grace + self.received / rate
            if now >= behind and elapsed >= grace:
                self._cut(
                    "min_data_rate",
                    f"too slow (minimum {rate} bytes/s)",
                    "Data transfer too slow",
                    elapsed,
                )
                return None
            due = min(due, behind)
        return due

    def _cut(self, limit: str, why: str, text: str, elapsed: float) -> None:
        proto = self.proto
        proto.edge.events.timed_out(
            proto.session,
            proto.state.value,
            limit,
            f"body {why}: {self.received} bytes in {elapsed:.0f}s",
        )
        proto.force_close(
            Reply("421", f"{proto.policy.hostname} {text}, closing connection", "4.4.2")
        )

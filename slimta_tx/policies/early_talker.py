"""Early talkers: a greeting delay, as Postfix's postscreen does (``greet_wait``).

RFC 5321 4.3.1: a client must wait for the greeting before it speaks. Spam engines often do
not. With this policy the greeting waits ``delay`` seconds; a client that sends anything before
it gets ``554 5.5.1`` and the connection is closed (what it sent is not answered). Clients in
trusted networks or listed in a DNSWL (:mod:`slimta_tx.policies.dnsbl`, installed before this
policy) get the greeting at once. Off by default: the delay slows every legitimate client too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet.task import deferLater

if TYPE_CHECKING:  # pragma: no cover
    from slimta_tx.envelope import Session
    from slimta_tx.factory import SmtpEdge
    from slimta_tx.reply import Reply

__all__ = ["EarlyTalkerPolicy"]

_STARTED = "early_talker.started"


class EarlyTalkerPolicy:
    """Delay the greeting by ``delay`` seconds and refuse clients that talk first."""

    def __init__(self, delay: float = 6.0) -> None:
        if delay <= 0:
            raise ValueError("the greeting delay must be more than 0 seconds")
        self.delay = delay
        self.edge: SmtpEdge | None = None

    def install(self, edge: SmtpEdge) -> None:
        """The delay starts before the other greeting checks (DNS lookups overlap it) and is
        waited out after them."""
        self.edge = edge
        edge.validators.add_check("BANNER", self.start, first=True)
        edge.validators.add_check("BANNER", self.check)

    def start(self, session: Session, reply: Reply, *extra: Any) -> None:
        assert self.edge is not None, "install() the policy first"
        session.extra[_STARTED] = self.edge.reactor.seconds()

    async def check(self, session: Session, reply: Reply, *extra: Any) -> None:
        edge = self.edge
        assert edge is not None, "install() the policy first"
        if edge.policy.is_trusted(session.address[0]) or session.extra.get("dnswl"):
            return
        started = session.extra.get(_STARTED, edge.reactor.seconds())
        remaining = started + self.delay - edge.reactor.seconds()
        if not session.early_talker and remaining > 0:
            await deferLater(edge.reactor, remaining)
        if session.early_talker:
            reply.set("554", "Protocol error: talking before the greeting", "5.5.1")
            edge.events.rejected(session, "early_talker", reply)

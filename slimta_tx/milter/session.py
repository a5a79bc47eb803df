"""The milters of one SMTP session: each SMTP step, told to each milter in turn.

The protocol calls :meth:`MilterSession.after_hook` with every hook's reply once the
validators have had their say (``BANNER`` is the connect event, then ``EHLO``, ``MAIL``,
``RCPT``, ``DATA``, ``HAVE_DATA`` (the message), ``UNKNOWN`` and ``QUIT``); :meth:`reset` when
a transaction ends; :meth:`close` when the connection does. Milters see a step only if the
reply is still positive (a rejected recipient only if the milter asked, with
``SMFIP_RCPT_REJ``), in the order they were given; the first milter that does not continue
decides, as in Postfix.

What a milter's answer means (as Postfix has it):

- reject, tempfail or its own reply: the command gets it (RCPT: that recipient only). At the
  connect or HELO event it holds for the rest of the session: the greeting becomes
  ``554``/``421`` for a 5xx/421, and MAIL, RCPT and DATA get the reply;
- accept: the milter is done (for the session at connect or HELO, else for the message);
- discard: the message is accepted (``250``) and dropped: logged, never given to the bus;
- quarantine: the message is stored with ``envelope.quarantine`` set;
- at the end of the message, header, body, sender and recipient changes apply to what the
  next milter and the bus get; ``envelope.milter_actions`` records which milter did what.

A milter that is down, too slow, closes or sends garbage gets its ``default_action``
(``tempfail``: 451 4.7.1 for the rest of the session; ``reject``: 550 5.7.1; ``accept``: the
session goes on without it) and the reason is logged. Nothing here waits without a timeout.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from slimta_tx.envelope import Envelope, Session
from slimta_tx.milter import codec
from slimta_tx.milter.client import Connector, MilterFailure
from slimta_tx.milter.codec import ProtocolError, Response
from slimta_tx.milter.config import Milter
from slimta_tx.milter.content import DISCARD, Verdict, apply, send_message
from slimta_tx.milter.link import EVENT_NAMES, Link, connect_facts
from slimta_tx.milter.macros import MacroContext
from slimta_tx.milter.message import (
    HeadTooBig,
    read_head,
)
from slimta_tx.reply import Reply
from slimta_tx.spool import Spool

if TYPE_CHECKING:  # pragma: no cover
    from slimta_tx.protocol import ESMTPServerProtocol

__all__ = ["MilterSession", "Milters"]


_REJECT = Reply("550", "Command rejected", "5.7.1")
_TEMPFAIL = Reply("451", "Service unavailable - try again later", "4.7.1")
_SHUTDOWN = Reply("421", "Server closing connection", "4.7.0")
_DEFAULT_REPLIES = {
    "tempfail": Reply("451", "Service unavailable - try again later", "4.7.1"),
    "reject": Reply("550", "Service unavailable", "5.7.1"),
}
Handler = Callable[..., Coroutine[Any, Any, Reply]]


class Milters:
    """The milters of an edge (``SmtpEdge(..., milters=[...])``): their settings and the
    connections to them, shared by the sessions."""

    def __init__(self, milters: list[Milter], reactor: Any, connector: Connector | None = None):
        self.milters = list(milters)
        self.reactor = reactor
        self.connector = connector or Connector(reactor)

    def __bool__(self) -> bool:
        return bool(self.milters)

    def session(self, proto: ESMTPServerProtocol) -> MilterSession:
        return MilterSession(self, proto)


class MilterSession:
    """The per-session driver (see the module docstring)."""

    log = Logger()

    def __init__(self, milters: Milters, proto: ESMTPServerProtocol) -> None:
        self.milters = milters
        self.proto = proto
        self.session: Session = proto.session
        self.clock: IReactorTime = milters.reactor
        self.links = [Link(m) for m in milters.milters]
        self.discarded = False  # the current message is to be accepted and dropped
        self.spools: list[Spool] = []  # rewritten messages of this transaction
        self._notes: list[dict[str, str]] = []  # what milters did, for the envelope
        self._closed = False
        self._handlers: dict[str, Handler] = {
            "BANNER": self._connect,
            "EHLO": self._helo,
            "MAIL": self._mail,
            "RCPT": self._rcpt,
            "DATA": self._data,
            "HAVE_DATA": self._message,
            "UNKNOWN": self._unknown,
        }

    # -- entry points -------------------------------------------------------------------------

    def after_hook(
        self, name: str, result: Reply | Deferred[Reply], *extra: Any
    ) -> Reply | Deferred[Reply]:
        """The milters' turn at hook ``name``, after the validators (``result``)."""
        if name == "QUIT":
            self.close()
            return result
        handler = self._handlers.get(name)
        if handler is None or self._closed:
            return result
        if isinstance(result, Deferred):
            return result.addCallback(lambda reply: self._run(name, handler, reply, extra))
        return self._run(name, handler, result, extra)

    def _run(
        self,
        name: str,
        handler: Handler,
        reply: Reply,
        extra: tuple[Any, ...],
    ) -> Reply | Deferred[Reply]:
        if not self._concerned(name, reply):
            return reply
        return Deferred.fromCoroutine(handler(reply, *extra))

    def _concerned(self, name: str, reply: Reply) -> bool:
        """False when no milter could change anything at this step (the common fast path)."""
        if name == "RCPT" and not reply.is_positive:
            return any(
                link.wants(codec.SMFIC_RCPT) and link.flag(codec.SMFIP_RCPT_REJ)
                for link in self.links
            )
        if name == "UNKNOWN":
            return any(link.wants(codec.SMFIC_UNKNOWN) for link in self.links)
        if not reply.is_positive:
            return False
        if name == "BANNER" or self.discarded:
            return True
        for link in self.links:
            if link.state == "open" or link.state == "refused" or link.verdict is not None:
                return True
        return False

    def reset(self) -> None:
        """The transaction is over (done, refused or reset): abort it at the milters that are
        still in it and drop this transaction's rewritten copies of the message."""
        for link in self.links:
            self._abort(link)
        self.discarded = False
        self._notes = []
        spools, self.spools = self.spools, []
        for spool in spools:
            spool.close()

    def close(self) -> None:
        """The SMTP session ended: QUIT to every milter, connections closed."""
        if self._closed:
            return
        self._closed = True
        for link in self.links:
            connection, link.connection = link.connection, None
            if connection is not None:
                if connection.failure is None:
                    try:
                        connection.send(codec.packet(codec.SMFIC_QUIT))
                    except MilterFailure:
                        pass
                connection.close()
            if link.state == "open":
                link.state = "done"

    def _abort(self, link: Link) -> None:
        if link.in_transaction and link.connection is not None and link.state == "open":
            try:
                link.connection.send(codec.packet(codec.SMFIC_ABORT))
            except MilterFailure:
                pass
        link.in_transaction = False
        link.message_done = False

    # -- the SMTP steps ---------------------------------------------------------------------

    async def _connect(self, reply: Reply, address: tuple[str, int]) -> Reply:
        context = MacroContext(self.session)
        hostname, family, port, ip = connect_facts(self.session.address, self.session)
        verdict: Verdict = None
        for link in self.links:
            if not await self._open(link):
                verdict = link.verdict
            else:
                packet = codec.connect_packet(hostname, family, port, ip)
                verdict = await self._event(link, codec.SMFIC_CONNECT, packet, context)
            if verdict is not None:
                break
        if isinstance(verdict, Reply):
            hostname = self.proto.policy.hostname
            if verdict.code == "421":
                return Reply("421", f"{hostname} Service unavailable - try again later", "4.7.0")
            if verdict.code.startswith("5"):
                return Reply("554", f"{hostname} ESMTP not accepting connections", "5.7.1")
        return reply  # a 4xx holds for MAIL and what follows, as in Postfix

    async def _helo(self, reply: Reply, name: str) -> Reply:
        verdict = await self._each(codec.SMFIC_HELO, codec.helo_packet(name), abort_first=True)
        # Only a 421 refuses the greeting itself; other refusals hold for MAIL (as Postfix).
        if isinstance(verdict, Reply) and verdict.code == "421":
            return verdict
        return reply

    async def _mail(self, reply: Reply, sender: str, params: dict[str, str | None]) -> Reply:
        args = [f"<{sender}>"] + [k if v is None else f"{k}={v}" for k, v in params.items()]
        context = MacroContext(self.session, sender=sender, mail_params=params)
        verdict = await self._each(
            codec.SMFIC_MAIL,
            codec.args_packet(codec.SMFIC_MAIL, args),
            context,
            abort_first=True,
            starts_transaction=True,
        )
        return self._reply(verdict, reply)

    async def _rcpt(self, reply: Reply, rcpt: str, params: dict[str, str | None]) -> Reply:
        args = [f"<{rcpt}>"] + [k if v is None else f"{k}={v}" for k, v in params.items()]
        packet = codec.args_packet(codec.SMFIC_RCPT, args)
        if not reply.is_positive:
            # Rejected already: only to milters that asked to see it, their answer unused.
            context = MacroContext(self.session, recipient=rcpt, rcpt_refusal=reply)
            for link in self.links:
                if link.flag(codec.SMFIP_RCPT_REJ) and link.in_message:
                    await self._event(link, codec.SMFIC_RCPT, packet, context)
            return reply
        context = MacroContext(self.session, recipient=rcpt)
        return self._reply(await self._each(codec.SMFIC_RCPT, packet, context), reply)

    async def _data(self, reply: Reply) -> Reply:
        return self._reply(
            await self._each(codec.SMFIC_DATA, codec.packet(codec.SMFIC_DATA)), reply
        )

    async def _unknown(self, reply: Reply, line: str) -> Reply:
        # Milters may only answer an unknown command with a refusal; only a 4xx is used (a
        # "500 unknown command" is more accurate than a filter's 5xx, as Postfix reasons).
        verdict = await self._each(codec.SMFIC_UNKNOWN, codec.unknown_packet(line), None)
        if isinstance(verdict, Reply) and verdict.code.startswith("4"):
            return verdict
        return reply

    # -- events ------------------------------------------------------------------------------

    async def _each(
        self,
        command: bytes,
        packet: bytes,
        context: MacroContext | None = None,
        abort_first: bool = False,
        starts_transaction: bool = False,
    ) -> Verdict:
        """Event ``command`` to each milter in turn until one does not continue."""
        if self.discarded and command not in (codec.SMFIC_HELO, codec.SMFIC_MAIL):
            return None
        if context is None:
            context = MacroContext(self.session)
        for link in self.links:
            if link.state in ("refused", "failed"):
                if link.verdict is not None:
                    return link.verdict.copy()  # (the caller may change its reply)
                continue
            if link.state != "open":
                continue
            if abort_first:
                self._abort(link)
            elif command != codec.SMFIC_UNKNOWN and not link.in_message:
                continue
            if starts_transaction:
                link.in_transaction = True  # until a refusal or an accept ends it
            verdict = await self._event(link, command, packet, context)
            if verdict is not None:
                return verdict
        return None

    async def _event(
        self, link: Link, command: bytes, packet: bytes, context: MacroContext | None
    ) -> Verdict:
        """Macros and the event to one milter, and its answer (unless it said none comes)."""
        connection = link.connection
        assert connection is not None
        if not link.wants(command):
            return link.verdict
        no_event, no_reply = codec.EVENT_FLAGS[command]
        out = link.macro_packet(command, context) if context is not None else b""
        skipped = link.flag(no_event) or link.skip == command
        if link.skip is not None and link.skip != command:
            link.skip = None
        if not skipped:
            out += packet
        try:
            if out:
                connection.send(out)
            if skipped or link.flag(no_reply):
                return None
            response = await link.answer(self.clock, command, link.milter.command_timeout)
        except (MilterFailure, ProtocolError) as e:
            return self._fail(link, command, e)
        return self.decide(link, command, response)

    def decide(self, link: Link, command: bytes, response: Response) -> Verdict:
        """What a final answer means (see the module docstring)."""
        kind = response.kind
        session_event = command in (codec.SMFIC_CONNECT, codec.SMFIC_HELO)
        if kind == "continue":
            return None
        if kind == "skip":
            link.skip = command
            return None
        if kind == "accept":
            if session_event:
                link.state = "done"
                self._drop(link)
            else:
                link.message_done = True
                link.in_transaction = False
            return None
        if kind == "discard":
            if session_event:
                self.warn(link, command, "discard is not allowed at connect or HELO")
                return None
            link.message_done = True
            link.in_transaction = False
            self.discarded = True
            self.note(link, "discard", "")
            return DISCARD
        reply: Reply
        if kind == "reject":
            reply = _REJECT.copy()
        elif kind == "tempfail":
            reply = _TEMPFAIL.copy()
        elif kind == "replycode":
            assert response.reply is not None
            reply = response.reply
        else:  # shutdown, conn_fail
            reply = _SHUTDOWN.copy()
            session_event = True
        if command not in (codec.SMFIC_RCPT, codec.SMFIC_UNKNOWN):
            link.in_transaction = False  # libmilter leaves the transaction on a refusal
        if reply.code.startswith("5"):
            self.proto.edge.events.rejected(self.session, "milter", reply, detail=link.milter.name)
        if session_event:
            link.state = "refused"
            link.verdict = reply
            self._drop(link)
        return reply

    def _fail(self, link: Link, command: bytes, error: Exception) -> Verdict:
        """The milter failed: log why, drop it, apply its default action."""
        self._drop(link)
        action = link.milter.default_action
        link.state = "failed"
        default = _DEFAULT_REPLIES.get(action)
        link.verdict = default.copy() if default is not None else None
        if not self._closed:
            self.log.warn(
                "{peer}: milter {milter} failed at {event}: {why}; default action {action}",
                peer=self.session.address,
                milter=link.milter.name,
                event=EVENT_NAMES.get(command, repr(command)),
                why=str(error) or type(error).__name__,
                action=action,
            )
        return link.verdict.copy() if link.verdict is not None else None

    def warn(self, link: Link, command: bytes, what: str) -> None:
        self.log.warn(
            "{peer}: milter {milter} at {event}: {what}",
            peer=self.session.address,
            milter=link.milter.name,
            event=EVENT_NAMES.get(command, repr(command)),
            what=what,
        )

    def _drop(self, link: Link) -> None:
        connection, link.connection = link.connection, None
        link.in_transaction = False
        if connection is not None:
            connection.abort()

    def _reply(self, verdict: Verdict, reply: Reply) -> Reply:
        return verdict if isinstance(verdict, Reply) else reply

    def note(self, link: Link, action: str, detail: str) -> None:
        """Record in the envelope what ``link`` did (held until there is an envelope)."""
        self._notes.append({"milter": link.milter.name, "action": action, "detail": detail})
        envelope = self.session.envelope
        if envelope is not None:
            envelope.milter_actions.extend(self._notes)
            self._notes = []

    # -- connecting ------------------------------------------------------------------------

    async def _open(self, link: Link) -> bool:
        """Connect and negotiate; False (with the default action in place) on failure."""
        milter = link.milter
        try:
            connection = await self.milters.connector.open(milter)
        except MilterFailure as e:
            self._fail(link, codec.SMFIC_OPTNEG, e)
            return False
        if self._closed:
            connection.close()
            return False
        try:
            await link.negotiate(connection)
        except (MilterFailure, ProtocolError) as e:
            self._fail(link, codec.SMFIC_OPTNEG, e)
            return False
        link.state = "open"
        return True

    # -- the message ---------------------------------------------------------------------------

    async def _message(self, reply: Reply, envelope: Envelope) -> Reply:
        if self.discarded:
            return self._discard(reply, envelope)
        links = [link for link in self.links if link.state != "new"]
        assert envelope.message is not None
        try:
            head = read_head(envelope.message)
        except HeadTooBig as e:
            self.log.info(
                "{peer}: message refused for the milters: {why}",
                peer=self.session.address,
                why=str(e),
            )
            return Reply("552", "Message header section too big", "5.3.4")
        for link in links:
            if link.state in ("refused", "failed"):
                if link.verdict is not None:
                    return link.verdict.copy()
                continue
            if link.state != "open" or not link.in_message:
                continue
            try:
                verdict, changes = await send_message(self, link, envelope, head)
            except (MilterFailure, ProtocolError) as e:
                verdict, changes = self._fail(link, codec.SMFIC_BODYEOB, e), None
            link.in_transaction = False
            if changes is not None and verdict in (None, DISCARD):
                head = apply(self, link, envelope, head, changes)
            if verdict == DISCARD:
                return self._discard(reply, envelope)
            if isinstance(verdict, Reply):
                return verdict
        if not envelope.recipients:
            self.discarded = True
            self.log.info(
                "{peer}: {queue_id}: the milters removed every recipient; message dropped",
                peer=self.session.address,
                queue_id=envelope.queue_id,
            )
        return reply

    def _discard(self, reply: Reply, envelope: Envelope) -> Reply:
        self.discarded = True
        self.log.info(
            "{peer}: {queue_id} from=<{sender}>: discarded by a milter (accepted, not stored)",
            peer=self.session.address,
            queue_id=envelope.queue_id,
            sender=envelope.sender,
        )
        return reply

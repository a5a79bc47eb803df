"""The ESMTP server protocol: thin glue between a transport and the sans-I/O core.

One command at a time. While a validator or the bus has not answered, reading is paused (the
transport too, so TCP pushes back) and buffered pipelined commands wait; replies therefore
always go out in order. Replies produced while working through one batch of input are written
together, in one ``write``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import (
    IDelayedCall,
    IHandshakeListener,
    ISSLTransport,
    ITCPTransport,
)
from twisted.internet.protocol import Protocol
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from zope.interface import implementer

from slimta_tx import chunking, commands, pipelining, proxy, starttls
from slimta_tx.deadlines import SessionDeadlines
from slimta_tx.envelope import Session
from slimta_tx.lines import TOO_LONG, LineReader, _TooLong
from slimta_tx.output import ReplyOutput
from slimta_tx.reply import Reply
from slimta_tx.state import COMMANDS, UNIMPLEMENTED, State, after, check
from slimta_tx.transfer import MessageTransfer

if TYPE_CHECKING:  # pragma: no cover
    from slimta_tx.factory import SmtpEdge

__all__ = ["ESMTPServerProtocol"]

# MAIL and RCPT lines may exceed 512 octets by these allowances (RFC 1870 SIZE 26, RFC 4954
# AUTH= 500, RFC 6531 SMTPUTF8 10, RFC 6152 BODY 16); the reader's limit is the sum.
_EXTENSION_ALLOWANCE = 26 + 500 + 10 + 16
_LONG_LINE_VERBS = frozenset({"MAIL", "RCPT", "AUTH"})
# States in which what arrives is message octets, not commands.
_BODY_STATES = frozenset({State.DATA, State.BDAT})
# States in which a message is being spooled (and a lost connection discards it).
_SPOOLING_STATES = frozenset({State.DATA, State.BDAT, State.CHUNKING})
# Module globals for the hot paths: ``State.X`` goes through EnumType.__getattr__ (~70 ns).
_GREETING, _CONNECTED, _READY = State.GREETING, State.CONNECTED, State.READY
_DATA, _BDAT, _CLOSED = State.DATA, State.BDAT, State.CLOSED

# Replies that count as the client's errors (see refuse()).
_REFUSAL_CODES = frozenset({"500", "501", "502", "503", "504", "555"})
_DEBUG = LogLevel.debug
_MUST_BE_LAST = pipelining.CHECKED_WHEN_READ
TEMPFAIL = Reply("451", "Temporary local problem, try again later", "4.3.0")

LineHandler = Callable[[bytes], None]


@implementer(IHandshakeListener)
class ESMTPServerProtocol(MessageTransfer, ReplyOutput, Protocol):
    """One SMTP session. Built by :class:`slimta_tx.factory.SmtpEdge`."""

    log = Logger()
    #: The core commands (LMTP's subclass has LHLO instead of EHLO and HELO).
    handlers = commands.HANDLERS

    def __init__(self, edge: SmtpEdge) -> None:
        self.edge = edge
        self.policy = edge.policy
        self.clock = edge.reactor
        self.session = Session(hostname=self.policy.hostname)
        self.state = _GREETING
        self.reader = LineReader(self.policy.max_command_length - 2 + _EXTENSION_ALLOWANCE)
        self.line_handler: LineHandler = self._command_line
        self.bad_commands = 0
        self._out: list[bytes] = []
        self._waiting = False
        self._processing = False
        self._paused = False
        self._closing = False
        # The 421 to send after the transaction under way (the edge is closing, time is up).
        self._last_words: Reply | None = None
        self._banner_pending = False
        self._timer: IDelayedCall | None = None  # the idle timer's call (see _set_timer)
        self._timer_at = 0.0  # when that call fires
        self._idle_at = 0.0  # when the idle time is up (the call re-arms for it if sooner)
        # A restart asked for while processing input, applied once when processing stops.
        self._timer_due: float | None = None
        self._abort_timer: IDelayedCall | None = None
        self.chunk: chunking.Chunk | None = None
        self.tls_started = False  # STARTTLS accepted, or TLS from the first byte
        self.started = False  # start_session() ran (not before a PROXY header is in)
        self._flush_pending = False  # a flush_now is due at the end of this reactor pass
        self._close_due = False  # the connection closes at the end of this reactor pass
        # policy.is_trusted(client address), remembered with the policy and address it is for.
        self._trusted: tuple[object, object, bool] = (None, None, False)
        # The milters' driver for this session (slimta_tx.milter), None without milters.
        self.milters = edge.milters.session(self) if edge.milters else None
        self.deadlines = SessionDeadlines(self, self.clock)

    # -- transport events -----------------------------------------------------------------

    def connectionMade(self) -> None:
        if proxy.hold_for_header(self, self.start_session):
            return  # a PROXY header is still to come: the session starts once it is in
        self.start_session()

    def start_session(self) -> None:
        """The client is known (its address is final): greet it, or start TLS first."""
        self.started = True
        if ITCPTransport.providedBy(self.transport):
            self.transport.setTcpNoDelay(True)
        transport = cast(Any, self.transport)
        peer, host = transport.getPeer(), transport.getHost()
        # (not getattr(peer, "host", str(peer)): that formats the address every time)
        peer_host = peer.host if hasattr(peer, "host") else str(peer)
        self.session.address = (peer_host, getattr(peer, "port", 0))
        self.session.server_address = (getattr(host, "host", ""), getattr(host, "port", 0))
        self.edge.connection_made(self)
        self.edge.events.connection_opened(self.session, ISSLTransport.providedBy(transport))
        self.deadlines.start()
        if starttls.begin_implicit(self):
            # TLS from the first byte (RFC 8314): the banner waits for the handshake.
            self.restart_timer(self.policy.command_timeout)
            return
        self.greet()

    def greet(self) -> None:
        if self._closing or self.state is _CLOSED:
            return  # turned away already (the edge is closing): 421 instead of a banner
        edge = self.edge
        if self.milters is None and "BANNER" not in edge.validators.active:
            # Nothing can change the greeting (no BANNER check or validator, no milter): the
            # usual 220, rendered once per edge, as _banner_done would send it.
            wire = edge.banner_wire()
            if wire is not None:
                self._out.append(wire)
                self.state = _CONNECTED
                self._set_timer(self.policy.command_timeout)
                if self.reader.buffered:
                    self.process()  # (bytes that came with a PROXY header) flushes too
                else:
                    self.flush()
                return
        reply = edge.banner_reply()
        # Input stays unpaused until the banner is out, so early talkers are noticed.
        self._banner_pending = True
        self.run_step(self.call_hook("BANNER", reply, self.session.address), self._banner_done)

    def _banner_done(self, reply: Reply) -> None:
        self._banner_pending = False
        self.send(reply, enhanced=reply.is_error)
        if not reply.closes_connection and reply.code.startswith("2"):
            self.state = _CONNECTED
        elif not reply.closes_connection:
            # A 554 greeting: RFC 5321 3.1 says answer 503 to all but QUIT.
            self.state = _CONNECTED
            self.line_handler = self._refused_session_line
            if self.session.early_talker:
                # What it sent before the greeting is not answered: refused, then closed.
                self.close_after_flush()
        self.restart_timer(self.policy.command_timeout)

    def dataReceived(self, data: bytes) -> None:
        if self._banner_pending:
            # Sent before the greeting (RFC 5321 4.3.1: clients must wait for it).
            self.session.early_talker = True
            self.pause_input()
        self.reader.feed(data)
        state = self.state
        if (state is _DATA or state is _BDAT) and not self._waiting:
            self._timer_due = self.policy.data_timeout  # restarted when process() stops
        self.process()

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.cancel_timer()
        self.deadlines.stop()
        if self._abort_timer is not None and self._abort_timer.active():
            self._abort_timer.cancel()
        previous, self.state = self.state, _CLOSED
        if not self.started:
            return  # closed before its PROXY header: there never was a session
        if previous in _SPOOLING_STATES and not self._waiting:
            self._discard_spool()
        starttls.connection_lost(self, reason)
        if self.milters is not None:
            self.milters.close()
        self.edge.connection_lost(self)
        self.edge.events.connection_closed(self.session)

    def handshakeCompleted(self) -> None:
        """TLS is up (IHandshakeListener): record its facts in the session."""
        starttls.handshake_completed(self)

    # -- the processing loop ---------------------------------------------------------------

    def process(self) -> None:
        """Work through buffered input until it runs out or a step must wait; then flush."""
        if self._processing:
            return
        self._processing = True
        reader = self.reader
        try:
            while not self._waiting and not self._closing:
                state = self.state
                if state is _DATA or state is _BDAT:
                    data = reader.take_rest()
                    if not data:
                        break
                    if state is _DATA:
                        self._data_bytes(data)
                    else:
                        chunking.consume(self, data)
                elif state is _CLOSED or state is _GREETING:
                    break
                else:
                    line = reader.next_line()
                    if line is None:
                        break
                    self.line_handler(line)  # type: ignore[arg-type]
        finally:
            self._processing = False
            due = self._timer_due
            if due is not None:
                self._timer_due = None
                self._set_timer(due)
        if not (self._waiting and reader.buffered):
            # Waiting with commands still buffered: the rest of the group is answered in the
            # same write (RFC 2920 only requires a flush before waiting for input).
            self.flush()

    def run_step(
        self,
        d: Deferred[Reply] | Reply,
        then: Callable[[Reply], None],
        check: Callable[[Any], Reply] | None = None,
    ) -> None:
        """Wait for ``d`` (a hook or the bus) with input paused, then call ``then`` in order.

        ``d`` may also be a ready :class:`Reply` (nothing to wait for). ``check`` turns what
        ``d`` fires with into a Reply, or raises (then, as when ``d`` fails, the failure is
        logged and the client gets 451 4.3.0).
        """
        if not isinstance(d, Reply) and d.called and not d.paused:
            # Fired, and not waiting on another Deferred (a bus or validator that answers at
            # once): its result is final, so read it now instead of running callbacks on it.
            result = d.result
            if check is not None and not isinstance(result, Failure):
                try:
                    d = check(result)
                except Exception:
                    d = fail()  # to failed() below: logged, and 451 4.3.0
            elif isinstance(result, Reply):
                d = result
        if isinstance(d, Reply):
            # Answered at once: input was never paused and the command's timer still runs.
            if self.state is not _CLOSED:
                then(d)
                if not self._processing:
                    self.process()  # flushes (and closes, after a 421/221)
            return
        self._waiting = True

        def finish(reply: Reply) -> None:
            self._waiting = False
            if self.state is not _CLOSED:
                then(reply)
                if not self._closing:
                    self.resume_input()
                    self.process()
                elif not self._processing:  # process() flushes when it returns
                    self.flush()  # e.g. 250 then 421 when the edge is shutting down

        def failed(failure: Failure) -> None:
            self.log.failure("{peer}: step failed", failure, peer=self.session.address)
            finish(TEMPFAIL.copy())

        def checked(result: Any) -> None:
            assert check is not None
            try:
                reply = check(result)
            except Exception:
                failed(Failure())
            else:
                finish(reply)

        d.addCallbacks(finish if check is None else checked, failed)
        if self._waiting:
            # Not answered yet: no command timeout meanwhile, and no reading. (A step answered
            # at once needs neither: nothing can arrive in between; this saves two epoll calls.)
            self.cancel_timer()
            if not self._banner_pending:
                self.pause_input()

    def call_hook(self, name: str, reply: Reply, *extra: Any) -> Deferred[Reply] | Reply:
        """Run the checks and validator of hook ``name``, then the milters; a plain Reply if
        there are none."""
        validators = self.edge.validators
        hooked: Deferred[Reply] | Reply = reply  # most hooks on a busy edge: no Deferred
        if name in validators.active:
            hooked = validators.run(name, self.session, reply, *extra)
        if self.milters is not None:
            return self.milters.after_hook(name, hooked, *extra)
        return hooked

    def client_trusted(self) -> bool:
        """``policy.is_trusted(client address)``, asked once per session (not per RCPT)."""
        policy, address = self.policy, self.session.address
        known_policy, known_address, trusted = self._trusted
        if known_policy is policy and known_address is address:
            return trusted
        trusted = policy.is_trusted(address[0])
        self._trusted = (policy, address, trusted)
        return trusted

    # -- refusals --------------------------------------------------------------------------

    def refuse(self, reply: Reply) -> None:
        """Send an error caused by the client's input; too many of them end the session."""
        self.send(reply)
        self.edge.events.rejected(
            self.session, "sequence" if reply.code == "503" else "syntax", reply, _DEBUG
        )
        self.bad_commands += 1
        if self.bad_commands >= self.policy.max_bad_commands and not self._closing:
            self.send(
                Reply(
                    "421", f"{self.policy.hostname} Too many errors, closing connection", "4.7.0"
                )
            )

    # -- flow control and timers -----------------------------------------------------------

    def pause_input(self) -> None:
        if not self._paused and self.transport is not None:
            self._paused = True
            cast(Any, self.transport).pauseProducing()

    def resume_input(self) -> None:
        if self._paused and self.transport is not None:
            self._paused = False
            cast(Any, self.transport).resumeProducing()
        timeout = (
            self.policy.data_timeout if self.state in _BODY_STATES else self.policy.command_timeout
        )
        self.restart_timer(timeout)

    def restart_timer(self, seconds: float) -> None:
        """Restart the idle timer (``seconds`` from now); cancelled while closing.

        While input is being processed the restart is only noted, and applied once when
        processing stops: the clock does not move in between, so only the last one counts
        (a command line and the DATA that follows it, a body and the bus's reply, a pipelined
        group each cost one timer reset, not one each).
        """
        if self._processing:
            self._timer_due = seconds
        else:
            self._set_timer(seconds)

    def _set_timer(self, seconds: float) -> None:
        """The idle timer is due ``seconds`` from now.

        Lazily: a restart to a later time (several times a message) only notes the new time;
        the reactor's call stays where it is, and when it fires early it re-arms itself for
        the time noted (:meth:`_idle_check`). Only a restart to a sooner time replaces it.
        """
        if self.state is _CLOSED or self._closing:
            self.cancel_timer()
            return
        clock = self.clock
        due = clock.seconds() + seconds
        self._idle_at = due
        timer = self._timer
        if timer is None or self._timer_at > due:
            if timer is not None and timer.active():
                timer.cancel()
            self._timer = clock.callLater(seconds, self._idle_check)
            self._timer_at = due

    def _idle_check(self) -> None:
        """The idle timer's call: time is up, or (the timer was restarted since) re-arm."""
        self._timer = None
        if not self._closing:
            left = self._idle_at - self.clock.seconds()
            if left > 0:
                self._timer = self.clock.callLater(left, self._idle_check)
                self._timer_at = self._idle_at
                return
        self._timed_out()

    def cancel_timer(self) -> None:
        self._timer_due = None
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _timed_out(self) -> None:
        if self._closing:  # closing, and the client has not let us finish: abort
            self._abort_if_open()
            return
        self.edge.events.timed_out(self.session, self.state.value)
        if self.state in _SPOOLING_STATES:
            self._discard_spool()
        self.send(
            Reply("421", f"{self.policy.hostname} Timeout exceeded, closing connection", "4.4.2")
        )
        self.flush()

    # -- commands ------------------------------------------------------------------------------

    def _command_line(self, line: bytes | _TooLong) -> None:
        self.restart_timer(self.policy.command_timeout)
        if line is TOO_LONG:
            self.refuse(Reply("500", "Line too long", "5.5.6"))
            return
        assert isinstance(line, bytes)
        if b"\r" in line or b"\n" in line or b"\0" in line:
            self.refuse(
                Reply("500", "Bare CR, LF or NUL in command; lines end with CRLF", "5.5.2")
            )
            return
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            self.refuse(Reply("500", "Command is not valid UTF-8", "5.5.2"))
            return
        verb, _, argument = text.partition(" ")
        verb = verb.upper()
        if len(line) > self.policy.max_command_length - 2 and verb not in _LONG_LINE_VERBS:
            # Only MAIL and RCPT get the extension allowances (AUTH has its own limit).
            self.refuse(Reply("500", "Line too long", "5.5.6"))
            return
        handler = self.edge.extra_commands.get(verb) or self.handlers.get(verb)
        if handler is None:
            self._unknown(verb, text)
            return
        if verb in _MUST_BE_LAST and pipelining.improper(self, verb, argument):
            return  # sent ahead of a reply it had to wait for (RFC 2920 3.1): 554, closing
        spec = COMMANDS.get(verb)
        if spec is None or self.state not in spec.allowed:  # (check() is a call more)
            refusal = check(self.state, verb)
            if refusal is not None:
                self.refuse(refusal)
                return
        handler(self, argument)

    def _unknown(self, verb: str, text: str) -> None:
        if verb in UNIMPLEMENTED:
            reply = Reply("502", "Command not implemented", "5.5.1")
        else:
            reply = Reply("500", "Command not recognized", "5.5.2")
        if "UNKNOWN" in self.edge.validators or self.milters is not None:
            self.run_step(self.call_hook("UNKNOWN", reply, text), self.refuse)
        else:
            self.refuse(reply)

    def _refused_session_line(self, line: bytes | _TooLong) -> None:
        if isinstance(line, bytes) and line.upper().strip() == b"QUIT":
            self.send(Reply("221", f"{self.policy.hostname} Bye", "2.0.0"))
        else:
            self.refuse(Reply("503", "Service refused; only QUIT is allowed", "5.5.1"))

    def finish_command(self, verb: str, reply: Reply, enhanced: bool = True) -> None:
        """Send the reply to ``verb`` and move the state machine on."""
        self.state = after(self.state, verb, reply)
        if reply.code in _REFUSAL_CODES:
            self.refuse(reply)
        else:
            self.send(reply, enhanced=enhanced)

    # -- shutdown --------------------------------------------------------------------------

    @property
    def waiting(self) -> bool:
        """A hook or the bus has not answered yet (input is paused)."""
        return self._waiting

    @property
    def closing(self) -> bool:
        """The session has sent its last reply and is closing."""
        return self._closing

    def shutdown(self, reply: Reply | None = None) -> None:
        """Close at the next point between transactions with ``reply`` (a 421; by default
        ``421 4.3.2``: the edge is closing)."""
        self._last_words = reply or self._shutting_down()
        if self.state in (_CONNECTED, _READY, _GREETING) and not self._waiting:
            self.force_close(self._last_words)

    def force_close(self, reply: Reply | None = None) -> None:
        """Close now with ``reply`` (by default ``421 4.3.2``); a body in transfer is dropped."""
        if self.state is _CLOSED or self._closing:
            return
        if self.state in _SPOOLING_STATES and not self._waiting:  # not while the bus reads it
            self._discard_spool()
        self.send(reply or self._shutting_down())
        self.flush()

    def _shutting_down(self) -> Reply:
        return Reply("421", f"{self.policy.hostname} Service shutting down", "4.3.2")

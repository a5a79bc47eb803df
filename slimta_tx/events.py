"""What happens on an edge, said in one place: the log events (and the points metrics hang off).

Every event an operator may want to see or count goes through one method of
:class:`EdgeEvents`, the edge's ``events`` attribute: a connection opened or closed, a
transaction's result, a TLS handshake or its failure, an AUTH failure, a rejection and its
reason, a timeout. Each method knows the facts (the session, the reply, the reason) once, so a
counter added later (issue 13's metrics) is one line beside the log event, not a search through
the protocol.

The events are ``twisted.logger`` events with structured fields: ``event`` names the kind
(``smtp.transaction``, ``connection.open``, ...; see :data:`EVENTS`) and the other fields are
plain data (strings, numbers, None), so the JSON log format (:mod:`slimta_tx.logsink`) writes
them as they are. No field ever holds a SASL payload or a password.

Metrics: with a sink in :attr:`EdgeEvents.metrics` (``twistd slimta --metrics``, see
:mod:`slimta_tx.metrics`), each method also counts its event, whatever the log level. Without
one (the default) that costs one attribute test per event.

Cost: an event below :attr:`EdgeEvents.level` is not built at all (``twistd slimta
--log-level``, default ``info``: the per-connection ``debug`` events cost one comparison).
The events are handed to the logger's observer directly, as ``Logger.emit`` would after
checking the level (it sorts the log levels on every call to validate one that is constant
here). That relies on ``Logger.observer`` and on the keys ``Logger.emit`` adds (:data:`EMIT_KEYS`;
``tests/test_events.py`` pins both); on a Twisted whose ``Logger`` has no ``observer``, one
warning says so and the events go through ``Logger.emit``. The transaction, which is every
message's, is not even an event when a :class:`~slimta_tx.logsink.LogSink` is the only
observer of the global publisher (``twistd slimta``'s log): see :meth:`EdgeEvents.transaction`.
"""

from __future__ import annotations

import time
from functools import partial
from typing import TYPE_CHECKING, Any, NamedTuple

from twisted.logger import Logger, LogLevel, globalLogPublisher

if TYPE_CHECKING:  # pragma: no cover
    from slimta_tx.envelope import Envelope, Session, TLSInfo
    from slimta_tx.logsink import LogSink
    from slimta_tx.metrics.sink import EdgeMetrics
    from slimta_tx.reply import Reply

__all__ = [
    "EVENTS",
    "REJECTION_REASONS",
    "TIME_LIMITS",
    "EdgeEvents",
    "level_named",
    "result_of",
]

_DEBUG, _INFO = LogLevel.debug, LogLevel.info

#: The keys ``Logger.emit`` adds to an event, which the events here add themselves.
EMIT_KEYS = ("log_logger", "log_level", "log_namespace", "log_source", "log_format", "log_time")

#: Whether a ``Logger`` has the ``observer`` that ``Logger.emit`` calls (checked once).
_DIRECT = callable(getattr(Logger(namespace=__name__), "observer", None))
_warned = False

#: The observers of the global publisher (``LogPublisher._observers``, private: pinned by
#: ``tests/test_log_direct.py``): the direct way below is taken only when they are exactly one
#: :class:`~slimta_tx.logsink.LogSink`. Without that list (another Twisted), never.
_PUBLISHER = globalLogPublisher
_SOLE = _DIRECT and type(getattr(_PUBLISHER, "_observers", None)) is list
_SINK: type[LogSink] | None = None  # slimta_tx.logsink.LogSink (imported by the first EdgeEvents)
_warned_sole = False


def _through_emit(log: Logger, event: dict[str, Any]) -> None:
    """The fallback: hand ``event`` (built for the observer) to ``Logger.emit`` instead."""
    level = event["log_level"]
    log_format = event["log_format"]
    fields = {key: value for key, value in event.items() if key not in EMIT_KEYS}
    log.emit(level, log_format, **fields)


_ORDER = {level: rank for rank, level in enumerate(LogLevel.iterconstants())}

#: ``event`` field -> what it says (docs/logging.md lists the fields of each).
EVENTS = {
    "connection.open": "a client connected",
    "connection.close": "a connection ended",
    "smtp.transaction": "a message got its final reply (accepted, refused or tempfailed)",
    "smtp.reject": "a command or message was refused by a policy or as malformed",
    "smtp.timeout": "a client was idle too long",
    "tls.handshake": "a TLS handshake completed",
    "tls.failure": "a TLS handshake did not complete",
    "auth.failure": "an AUTH exchange failed",
}

#: The ``limit`` of an ``smtp.timeout`` event: the idle timers (``--timeout``,
#: ``--data-timeout``) and the deadlines of slimta_tx.deadlines.
TIME_LIMITS = frozenset({"idle", "data_deadline", "min_data_rate", "session_deadline"})

#: The ``reason`` of an ``smtp.reject`` event: a closed set, never client text.
REJECTION_REASONS = frozenset(
    {
        "relay",
        "dnsbl",
        "limits",
        "lists",
        "early_talker",
        "size",
        "bare_newline",
        "line_length",
        "nul",
        "pipelining",
        "milter",
        "recipients",
        "syntax",
        "sequence",
        "tls_required",
        "auth_required",
        "policy",
    }
)

TRANSACTION_FORMAT = (
    "{client} helo={helo} from=<{sender}> rcpts={rcpts} size={size} id={queue_id} "
    "result={result} {seconds:.3f}s"
)
OPEN_FORMAT = "{client}:{client_port} connected"
CLOSE_FORMAT = "{client}:{client_port} disconnected after {seconds:.3f}s, {transactions} messages"
REJECT_FORMAT = "{client} rejected ({reason}): {result} {text}"
REJECT_DETAIL_FORMAT = REJECT_FORMAT + " [{detail}]"
TIMEOUT_FORMAT = "{client} timed out in state {state}"
LIMIT_FORMAT = "{client} cut off in state {state}: {limit} ({detail})"
TLS_FORMAT = "{client} TLS {tls_version} {tls_cipher}"
TLS_SNI = " sni={sni}"
TLS_CLIENT_CERT = " client-cert={client_certificate!r} verified={client_certificate_verified}"
TLS_FAILURE_FORMAT = "{client} TLS handshake failed: {why}"
AUTH_FAILURE_FORMAT = (
    "{client} AUTH {mechanism} failed ({here} on this connection, "
    "{from_address} recently from this address)"
)


class TransactionFacts(NamedTuple):
    """What a transaction's line says: the ``smtp.transaction`` event's own fields, in the
    event's order (built once per message by :meth:`EdgeEvents.transaction`,
    or from an event by :func:`transaction_facts`)."""

    client: Any
    helo: Any
    sender: Any
    rcpts: Any
    size: Any
    queue_id: Any
    session_id: Any
    result: Any
    code: Any
    tls_version: Any
    tls_cipher: Any
    auth: Any
    seconds: Any
    connect_to_mail_seconds: Any
    data_seconds: Any
    bus_seconds: Any


TRANSACTION_FIELDS = TransactionFacts._fields


def transaction_facts(event: dict[str, Any]) -> TransactionFacts:
    """The facts of an ``smtp.transaction`` event (KeyError when one is missing)."""
    return TransactionFacts._make([event[name] for name in TRANSACTION_FIELDS])


def _us(seconds: float) -> float:
    """``seconds`` to the microsecond: a float whose shortest repr is short (a JSON log line
    then holds ``0.000852``, not ``0.0008516311645507812``, and writes it 3 times faster)."""
    return int(seconds * 1e6) / 1e6


def level_named(name: str) -> LogLevel:
    """``"info"`` -> ``LogLevel.info`` (also ``warning``); ValueError for anything else."""
    name = name.strip().lower()
    if name == "warning":
        name = "warn"
    try:
        level: LogLevel = LogLevel.levelWithName(name)
    except Exception:
        raise ValueError(f"not a log level: {name!r}") from None
    return level


def result_of(code: str) -> str:
    """The bounded result of a final reply: ``accepted``, ``tempfailed`` or ``rejected``."""
    first = code[:1]
    if first == "2":
        return "accepted"
    if first == "4":
        return "tempfailed"
    return "rejected"


class EdgeEvents:
    """The events of one :class:`~slimta_tx.factory.SmtpEdge` (its ``events`` attribute).

    :param source: the edge (the events' ``log_source``).
    :param level: events below it are not built. ``LogLevel.debug`` (everything) unless set,
        so an embedding application's own observers see what they always saw;
        ``twistd slimta --log-level`` sets it.
    """

    def __init__(self, source: object = None, level: LogLevel = _DEBUG) -> None:
        self.log = Logger(namespace="slimta_tx.factory.SmtpEdge", source=source)
        #: Counts each event when set (slimta_tx.metrics.EdgeMetrics); None: no metrics.
        self.metrics: EdgeMetrics | None = None
        self.debug = True
        self.info = True
        self.level = level
        self.set_level(level)
        global _warned, _SINK
        if _SINK is None:
            from slimta_tx import logsink

            _SINK = logsink.LogSink
        if not _DIRECT and not _warned:
            _warned = True
            self.log.warn("twisted.logger.Logger has no observer: events go through Logger.emit")
        global _warned_sole
        if _DIRECT and not _SOLE and not _warned_sole:
            _warned_sole = True
            self.log.warn(
                "twisted.logger.LogPublisher has no _observers list: "
                "transactions go to the log sink as events"
            )

    def set_level(self, level: LogLevel) -> None:
        """Build only events at ``level`` or above from now on."""
        self.level = level
        rank = _ORDER[level]
        self.debug = rank <= _ORDER[_DEBUG]
        self.info = rank <= _ORDER[_INFO]

    def _emit(self, level: LogLevel, log_format: str, event: dict[str, Any]) -> None:
        log = self.log
        event["log_logger"] = log
        event["log_level"] = level
        event["log_namespace"] = log.namespace
        event["log_source"] = log.source
        event["log_format"] = log_format
        event["log_time"] = time.time()
        if _DIRECT:
            log.observer(event)
        else:
            _through_emit(log, event)

    # -- connections ---------------------------------------------------------------------------

    def connection_opened(self, session: Session, tls: bool = False) -> None:
        """``tls``: the connection is TLS from the first byte (port 465)."""
        if self.metrics is not None:
            self.metrics.opened(session, tls)
        if self.debug:
            self._emit(
                _DEBUG,
                OPEN_FORMAT,
                {
                    "event": "connection.open",
                    "client": session.address[0],
                    "client_port": session.address[1],
                    "session_id": session.session_id,
                },
            )

    def connection_closed(self, session: Session) -> None:
        if self.metrics is not None:
            self.metrics.closed(session)
        if self.debug:
            self._emit(
                _DEBUG,
                CLOSE_FORMAT,
                {
                    "event": "connection.close",
                    "client": session.address[0],
                    "client_port": session.address[1],
                    "session_id": session.session_id,
                    "seconds": _us(time.time() - session.connected_at),
                    "transactions": session.transactions,
                },
            )

    def timed_out(
        self, session: Session, state: str, limit: str = "idle", detail: str | None = None
    ) -> None:
        """The session was closed in ``state`` for a time limit: ``limit`` is one of
        :data:`TIME_LIMITS` (``idle``: the command or data timeout), ``detail`` says more."""
        if self.metrics is not None:
            self.metrics.timed_out(state, limit)
        if self.info:
            self._emit(
                _INFO,
                TIMEOUT_FORMAT if limit == "idle" else LIMIT_FORMAT,
                {
                    "event": "smtp.timeout",
                    "client": session.address[0],
                    "session_id": session.session_id,
                    "state": state,
                    "limit": limit,
                    **({} if detail is None else {"detail": detail}),
                },
            )

    # -- transactions and rejections -----------------------------------------------------------

    def transaction(
        self,
        session: Session,
        envelope: Envelope,
        reply: Reply,
        data_seconds: float | None = None,
        bus_seconds: float | None = None,
    ) -> None:
        """A message got its final reply: one event, with everything issue 13 asks for.

        Built in one dict display, without helper calls: this runs for every message.

        The direct way: when this edge logs to the global publisher and its only observer is
        a :class:`~slimta_tx.logsink.LogSink` (``twistd slimta``'s log, unless ``--logger``
        or ``--syslog``), nothing else would see the event, so its facts go straight to the
        sink's :meth:`~slimta_tx.logsink.LogSink.transaction` (the same line, without the
        dict and the publisher's loop). Any other observer added to the publisher (an
        embedding application's, a test's, a worker's link to its parent) is seen at the next
        message, which is then an event again.
        """
        if self.metrics is not None:
            self.metrics.transaction(envelope, reply, bus_seconds)
        if not self.info:
            return
        now = time.time()
        code = reply.code
        esc = reply.effective_enhanced_code()
        received_at = envelope.received_at
        message = envelope.message
        log = self.log
        client = session.address[0]
        result = f"{code} {esc}" if esc else code
        facts = TransactionFacts(
            client,
            session.ehlo_as,
            envelope.sender,
            len(envelope.recipients),
            message.size if message is not None else 0,
            envelope.queue_id,
            session.session_id,
            result,
            code,
            envelope.tls_version,
            envelope.tls_cipher,
            envelope.authed,
            # As measured: the log sink writes them to the microsecond (rounding here cost a
            # fifth of building the event).
            now - received_at,
            received_at - session.connected_at,
            data_seconds,
            bus_seconds,
        )
        if _SOLE and log.observer is _PUBLISHER:
            observers: list[Any] = _PUBLISHER._observers
            if (
                len(observers) == 1
                and type(sink := observers[0]) is _SINK
                and sink.transaction(now, log.namespace, facts)
            ):
                return
        event: dict[str, Any] = {"event": "smtp.transaction"}
        event.update(zip(TRANSACTION_FIELDS, facts, strict=True))
        event["log_logger"] = log
        event["log_level"] = _INFO
        event["log_namespace"] = log.namespace
        event["log_source"] = log.source
        event["log_format"] = TRANSACTION_FORMAT
        event["log_time"] = now
        (log.observer if _DIRECT else partial(_through_emit, log))(event)

    def rejected(
        self,
        session: Session,
        reason: str,
        reply: Reply,
        level: LogLevel = _INFO,
        detail: str | None = None,
    ) -> None:
        """A refusal for ``reason`` (one of :data:`REJECTION_REASONS`): relay, dnsbl, size...

        ``detail`` says more (the blocklist, the list file, the limit's key). Malformed input
        (``syntax``, ``sequence``) is logged at debug: a client's typos are not news to an
        operator.
        """
        if self.metrics is not None:
            self.metrics.rejected(reason, reply)
        if not (self.debug if level is _DEBUG else self.info):
            return
        esc = reply.effective_enhanced_code()
        self._emit(
            level,
            REJECT_FORMAT if detail is None else REJECT_DETAIL_FORMAT,
            {
                "event": "smtp.reject",
                "client": session.address[0],
                "session_id": session.session_id,
                "reason": reason,
                "result": f"{reply.code} {esc}" if esc else reply.code,
                "code": reply.code,
                "text": reply.message,
                "detail": detail,
            },
        )

    # -- TLS and AUTH --------------------------------------------------------------------------

    def tls_handshake(self, session: Session, info: TLSInfo) -> None:
        if self.metrics is not None:
            self.metrics.tls_handshake(info)
        if not self.info:
            return
        log_format = TLS_FORMAT
        if info.server_name:
            log_format += TLS_SNI
        if info.client_certificate:
            log_format += TLS_CLIENT_CERT
        self._emit(
            _INFO,
            log_format,
            {
                "event": "tls.handshake",
                "client": session.address[0],
                "session_id": session.session_id,
                "tls_version": info.version,
                "tls_cipher": info.cipher,
                "sni": info.server_name,
                "client_certificate": info.client_subject if info.client_certificate else None,
                "client_certificate_verified": info.client_certificate_verified,
            },
        )

    def tls_failed(self, session: Session, why: str) -> None:
        if self.metrics is not None:
            self.metrics.tls_failed()
        if self.info:
            self._emit(
                _INFO,
                TLS_FAILURE_FORMAT,
                {
                    "event": "tls.failure",
                    "client": session.address[0],
                    "session_id": session.session_id,
                    "why": why,
                },
            )

    def auth_failed(self, session: Session, mechanism: str, here: int, from_address: int) -> None:
        """Credentials refused. Only the mechanism's name and counts: never what was sent."""
        if self.metrics is not None:
            self.metrics.auth(mechanism, False)
        if self.info:
            self._emit(
                _INFO,
                AUTH_FAILURE_FORMAT,
                {
                    "event": "auth.failure",
                    "client": session.address[0],
                    "session_id": session.session_id,
                    "mechanism": mechanism,
                    "here": here,
                    "from_address": from_address,
                },
            )

    def authenticated(self, session: Session, mechanism: str) -> None:
        """AUTH succeeded: counted only (slimta_tx.auth logs it, with the identity)."""
        if self.metrics is not None:
            self.metrics.auth(mechanism, True)

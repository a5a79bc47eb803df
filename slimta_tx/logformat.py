"""The log's lines: the text and JSON forms of slimta_tx's own events, and their time stamps.

:class:`~slimta_tx.logsink.LogSink` writes them. Each usual event (the transaction, a
connection opened or closed) has a plain function here giving the same text as
``twisted.logger``'s ``formatEvent`` (:data:`FAST_FORMATS`); the transaction line, written for
every message, is one f-string, text (:func:`text_transaction_line`) or JSON
(:func:`json_transaction_line`), shared by the event's way and the sink's direct way
(:meth:`~slimta_tx.logsink.LogSink.transaction`). :class:`StampClock` formats a time stamp
once per second.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from twisted.logger import formatTime

from slimta_tx import events
from slimta_tx.events import TransactionFacts, transaction_facts

__all__ = [
    "FAST_FORMATS",
    "TRANSACTION",
    "StampClock",
    "json_transaction",
    "json_transaction_line",
    "quote",
    "text_transaction_line",
]

quote = json.encoder.encode_basestring_ascii  # str -> "JSON string", ASCII only (C)
TRANSACTION = events.TRANSACTION_FORMAT


def _seconds(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def _transaction(event: dict[str, Any]) -> str:
    return (
        f"{event['client']} helo={event['helo']} from=<{event['sender']}> "
        f"rcpts={event['rcpts']} size={event['size']} id={event['queue_id']} "
        f"result={event['result']} {event['seconds']:.3f}s"
    )


def _opened(event: dict[str, Any]) -> str:
    return f"{event['client']}:{event['client_port']} connected"


def _closed(event: dict[str, Any]) -> str:
    return (
        f"{event['client']}:{event['client_port']} disconnected after "
        f"{_seconds(event['seconds'])}s, {event['transactions']} messages"
    )


#: ``log_format`` -> a function giving the same text as ``formatEvent`` for that event.
FAST_FORMATS: dict[str, Callable[[dict[str, Any]], str]] = {
    events.TRANSACTION_FORMAT: _transaction,
    events.OPEN_FORMAT: _opened,
    events.CLOSE_FORMAT: _closed,
}


def text_transaction_line(stamp: str, system: str, facts: TransactionFacts) -> str:
    """The ``smtp.transaction`` text line (``system``: ``namespace#level``), one f-string: the
    event's way and the direct way (:meth:`LogSink.transaction`) both write it with this."""
    return (
        f"{stamp} [{system}] {facts.client} helo={facts.helo} from=<{facts.sender}> "
        f"rcpts={facts.rcpts} size={facts.size} id={facts.queue_id} result={facts.result} "
        f"{facts.seconds:.3f}s\n"
    )


def json_transaction(event: dict[str, Any], second: str, offset: float, rest: str) -> str:
    """The ``smtp.transaction`` event as one JSON line (see :func:`json_transaction_line`)."""
    return json_transaction_line(second, offset, rest, transaction_facts(event))


def json_transaction_line(second: str, offset: float, rest: str, facts: TransactionFacts) -> str:
    """The ``smtp.transaction`` event as one JSON line, from one f-string (it is written for
    every message; about a third of the generic encoder's cost).

    Every string field is escaped by the C JSON string encoder (``"``, ``\\``, control
    characters and everything outside ASCII): the HELO name and the sender are the client's
    text, and nothing here trusts the others either. ``rcpts`` and ``size`` are written as
    integers (``%d``). The durations are written to the microsecond (six decimals: half the
    cost of ``repr``, and a short number; ``%.6f``, and one %-format for the four of them when
    none is None: a tenth of this function's cost). A field of another type than these raises
    (TypeError), and the caller takes the generic way."""
    # One unpacking: a slice or an attribute per field costs more (timeit).
    (
        client,
        helo,
        sender,
        rcpts,
        size,
        queue_id,
        session_id,
        result,
        code,
        tls_version,
        tls_cipher,
        auth,
        seconds,
        to_mail,
        data_seconds,
        bus_seconds,
    ) = facts
    rcpts = "%d" % rcpts  # noqa: UP031 (integers, or TypeError)
    size = "%d" % size  # noqa: UP031
    if data_seconds is not None and bus_seconds is not None:  # the usual: one %-format
        tail = _JSON_DURATIONS % (seconds, to_mail, data_seconds, bus_seconds)
    else:
        tail = (
            f'"seconds":{"%.6f" % seconds},'  # noqa: UP031
            f'"connect_to_mail_seconds":{"%.6f" % to_mail},'  # noqa: UP031
            f'"data_seconds":{"null" if data_seconds is None else "%.6f" % data_seconds},'  # noqa: UP031
            f'"bus_seconds":{"null" if bus_seconds is None else "%.6f" % bus_seconds}}}\n'  # noqa: UP031
        )
    message = quote(
        f"{client} helo={helo} from=<{sender}> rcpts={rcpts} size={size} id={queue_id} "
        f"result={result} {seconds:.3f}s"
    )
    return (
        f'{{"time":"{second}.{"%03d" % (offset * 1000)}Z{rest},"message":{message},'  # noqa: UP031
        f'"event":"smtp.transaction","client":{quote(client)},'
        f'"helo":{"null" if helo is None else quote(helo)},"sender":{quote(sender)},'
        f'"rcpts":{rcpts},"size":{size},"queue_id":{quote(queue_id)},'
        f'"session_id":{quote(session_id)},"result":{quote(result)},'
        f'"code":{quote(code)},'
        f'"tls_version":{"null" if tls_version is None else quote(tls_version)},'
        f'"tls_cipher":{"null" if tls_cipher is None else quote(tls_cipher)},'
        f'"auth":{"null" if auth is None else quote(auth)},{tail}'
    )


_JSON_DURATIONS = (
    '"seconds":%.6f,"connect_to_mail_seconds":%.6f,"data_seconds":%.6f,"bus_seconds":%.6f}\n'
)


class StampClock:
    """Time stamps, each formatted once per second (the formats have no finer unit)."""

    def __init__(self) -> None:
        self.local_second = -1  # the second local_text says (read by the text format)
        self.local_text = ""
        self.utc_at = -1  # the second utc_text says (read by LogSink.transaction)
        self.utc_text = ""

    def local(self, when: float | None) -> str:
        """As ``twisted.logger.formatTime``: local time with its UTC offset."""
        if when is None:
            return "-"
        second = int(when)
        if second != self.local_second:
            self.local_text = formatTime(when)
            self.local_second = second
        return self.local_text

    def utc(self, when: float) -> str:
        """RFC 3339 in UTC with milliseconds, ``2026-11-24T06:49:30.123Z``."""
        second, offset = self.utc_second(when)
        return "%s.%03dZ" % (second, offset * 1000)  # noqa: UP031 (%d truncates: ms)

    def utc_second(self, when: float) -> tuple[str, float]:
        """``when``'s second (``2026-11-24T06:49:30``) and the time since it."""
        offset = when - self.utc_at
        if not 0.0 <= offset < 1.0:
            second = int(when // 1)
            self.utc_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self.utc_at = second
            offset = when - second
        return self.utc_text, offset

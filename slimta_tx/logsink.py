"""The log output of ``twistd slimta``: a level filter, text or JSON lines, batched writes.

:class:`LogSink` is a ``twisted.logger`` observer. For each event it:

1. drops it at once when its level is below the configured one (nothing is formatted);
2. formats it: ``text`` is exactly what ``twistd``'s own log file holds
   (``2026-11-24T06:49:30+0000 [namespace#level] message``), ``json`` one JSON object per line
   (below);
3. keeps the line, and writes what it kept once per reactor pass (a ``callLater(0)``, which the
   reactor runs after it has handled every socket that was ready): one ``write`` system call
   and one flush for all the lines of a pass, where ``twistd``'s observer writes and flushes
   every event. A warning, an error or a critical event is written at once with everything
   before it, and so is every event when the reactor is not running (start-up, shutdown) or
   comes from another thread. At reactor shutdown what is kept is written.

The usual events are formatted without ``twisted.logger``'s generic formatter: the sink keeps
a table of known ``log_format`` strings (the transaction line, connection events; see
:data:`FAST_FORMATS`) with a plain function each, and the time stamp is formatted once per
second. Anything else goes through Twisted's own formatting, so the output is the same.

The JSON format is for Loki, Vector, Elasticsearch and ``jq``: one object per line, UTF-8 safe
(non-ASCII escaped), with ``time`` (RFC 3339, UTC, milliseconds), ``level``, ``namespace``,
``message`` (the text line's message) and then the event's own fields (those not starting
with ``log_``) as they are: strings, numbers, booleans, null, lists. Other values are written as
their ``str()``. A field named like one of the first five gets a ``field_`` prefix. An event
with a failure also has ``error`` (the exception's type and text) and ``traceback``.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable
from threading import get_ident
from typing import IO, Any

from twisted.logger import (
    ILogObserver,
    LogLevel,
    formatEvent,
    formatEventAsClassicLogText,
)
from twisted.python import threadable
from zope.interface import implementer

from slimta_tx.events import TransactionFacts, transaction_facts
from slimta_tx.fastwrite import at_end_of_pass
from slimta_tx.logformat import (
    FAST_FORMATS,
    TRANSACTION,
    StampClock,
    json_transaction,
    json_transaction_line,
    quote,
    text_transaction_line,
)

__all__ = ["FAST_FORMATS", "FORMATS", "LogSink"]

FORMATS = ("text", "json")
_URGENT = frozenset({LogLevel.warn, LogLevel.error, LogLevel.critical})
_LEVELS = list(LogLevel.iterconstants())
_INFO = LogLevel.info
# Write at once when this much is kept, whatever the pass (a burst must not grow memory).
_MAX_KEPT = 64 * 1024
_RESERVED = frozenset({"time", "level", "namespace", "message", "event"})
_PLAIN = (str, int, float, bool, type(None))
_ENCODER = json.JSONEncoder(separators=(",", ":"), default=str)
# What twisted.python.log's events (namespace log_legacy) carry besides their text.
_LEGACY = frozenset({"message", "time", "isError", "format", "system", "why", "failure"})


@implementer(ILogObserver)
class LogSink:
    """Write log events at ``level`` or above to ``out`` as ``text`` or ``json`` lines.

    :param out: a file-like object with ``write(str)`` and ``flush()`` (``sys.stdout``, a
        ``twisted.python.logfile.LogFile``, an open text file).
    :param level: the lowest level written (a ``twisted.logger.LogLevel``).
    :param format: ``"text"`` (the default, as ``twistd`` writes) or ``"json"``.
    :param reactor: the reactor whose passes batch the writes; the global one when None.
    """

    def __init__(
        self,
        out: IO[str] | Any,
        level: LogLevel = LogLevel.info,
        format: str = "text",
        reactor: Any = None,
    ) -> None:
        if format not in FORMATS:
            raise ValueError(f"log format must be one of {', '.join(FORMATS)}, not {format!r}")
        if reactor is None:
            from twisted.internet import reactor as global_reactor

            reactor = global_reactor
        self.out = out
        self.level = level
        self.format = format
        self.reactor = reactor
        self._enabled = frozenset(_LEVELS[_LEVELS.index(level) :])
        self._format: Callable[[dict[str, Any], LogLevel], str | None] = (
            self._text if format == "text" else self._json
        )
        self._text_format = format == "text"
        self._info = _INFO in self._enabled
        # The direct way's (transaction) head for its namespace, kept for the next message.
        self._direct_namespace: Any = None
        self._direct_head = ""
        self._clock = StampClock()
        # (namespace, level) -> the JSON head after the time: '","level":...,"namespace":...'
        self._heads: dict[tuple[Any, LogLevel], str] = {}
        self._kept: list[str] = []
        self._kept_size = 0
        self._flush_due = False  # a flush is due at the end of this reactor pass
        self._lock = threading.Lock()
        self._shutdown_trigger: Any = None
        add_trigger = getattr(reactor, "addSystemEventTrigger", None)
        if add_trigger is not None:
            self._shutdown_trigger = add_trigger("after", "shutdown", self.flush)

    # -- the observer --------------------------------------------------------------------------

    def __call__(self, event: dict[str, Any]) -> None:
        level = event.get("log_level", LogLevel.info)
        if level not in self._enabled:
            return
        try:
            line = self._format(event, level)
        except Exception as e:  # a broken event must not break logging
            line = self._broken(event, e)
        if line:
            self._keep(line, level in _URGENT)

    def transaction(self, when: float, namespace: str, facts: TransactionFacts) -> bool:
        """An ``smtp.transaction`` at ``info`` from its facts, without its event: what
        :class:`~slimta_tx.events.EdgeEvents` does when this sink is the only observer of the
        global publisher (every message: no event dict, no publisher loop). The line is the
        one the event would give, with the same functions.

        Returns False, having written nothing, when a value needs more than the one f-string
        (a line break in the text, a field of an unexpected type): the caller then hands over
        the event, and the event's way says it as it always did."""
        if not self._info:
            return True  # the event would be dropped
        if namespace is not self._direct_namespace:  # "namespace#info", or the JSON head
            self._direct_head = (
                f"{namespace}#info" if self._text_format else self._head(namespace, _INFO)
            )
            self._direct_namespace = namespace
        clock = self._clock
        try:
            if self._text_format:
                line = text_transaction_line(
                    clock.local_text if int(when) == clock.local_second else clock.local(when),
                    self._direct_head,
                    facts,
                )
                if line.count("\n") != 1:
                    return False
            else:
                offset = when - clock.utc_at  # as clock.utc_second, without the call
                if 0.0 <= offset < 1.0:
                    second = clock.utc_text
                else:
                    second, offset = clock.utc_second(when)
                line = json_transaction_line(second, offset, self._direct_head, facts)
        except Exception:
            return False
        try:
            self._keep(line, False)
        except Exception:  # noqa: S110 (as the publisher would have swallowed it; this is
            pass  # the log: there is nowhere to say so. A try costs nothing, a suppress() does)
        return True

    def _keep(self, line: str, urgent: bool) -> None:
        """Keep ``line`` for the end of the pass, or write it (and all kept) now when it is
        ``urgent`` (a warning or worse), too much is kept, or the reactor cannot be waited on."""
        with self._lock:
            self._kept.append(line)
            self._kept_size += len(line)
            if (
                urgent
                or self._kept_size >= _MAX_KEPT
                or not getattr(self.reactor, "running", True)
                or (threadable.ioThread is not None and get_ident() != threadable.ioThread)
            ):
                self._write_kept()
            elif not self._flush_due:
                self._flush_due = True
                at_end_of_pass(self.reactor, self._end_of_pass)

    def _end_of_pass(self) -> None:
        self._flush_due = False
        self.flush()

    def flush(self) -> None:
        """Write every kept line now."""
        with self._lock:
            self._write_kept()

    def _write_kept(self) -> None:
        kept = self._kept
        if not kept:
            return
        self._kept = []
        self._kept_size = 0
        with contextlib.suppress(Exception):
            # If the destination fails there is nowhere left to say so (this is the log): the
            # lines are lost and logging goes on.
            self.out.write(kept[0] if len(kept) == 1 else "".join(kept))
            self.out.flush()

    def stop(self) -> None:
        """Write what is kept and stop watching for the reactor's shutdown."""
        self.flush()
        trigger, self._shutdown_trigger = self._shutdown_trigger, None
        if trigger is not None:
            try:
                self.reactor.removeSystemEventTrigger(trigger)
            except (ValueError, KeyError):
                pass

    # -- formats -------------------------------------------------------------------------------

    def _message(self, event: dict[str, Any]) -> str | None:
        fast = FAST_FORMATS.get(event.get("log_format"))  # type: ignore[arg-type]
        if fast is not None:
            return fast(event)
        return formatEvent(event) if "log_format" in event else None

    def _text(self, event: dict[str, Any], level: LogLevel) -> str | None:
        log_format = event.get("log_format")
        fast = FAST_FORMATS.get(log_format)  # type: ignore[arg-type]
        if fast is None or "log_system" in event or "log_failure" in event:
            return formatEventAsClassicLogText(event, self._clock.local)
        when = event.get("log_time")
        clock = self._clock
        if when is None or int(when) != clock.local_second:
            stamp = clock.local(when)
        else:
            stamp = clock.local_text
        try:
            if log_format == TRANSACTION:  # every message: one f-string
                line = text_transaction_line(
                    stamp, f"{event['log_namespace']}#{level.name}", transaction_facts(event)
                )
                if line.count("\n") == 1:
                    return line
            message = fast(event)
        except Exception:  # a field of an unexpected type: as Twisted would say it
            return formatEventAsClassicLogText(event, clock.local)
        if "\n" in message:
            message = message.replace("\n", "\n\t")
        return f"{stamp} [{event.get('log_namespace', '-')}#{level.name}] {message}\n"

    def _json(self, event: dict[str, Any], level: LogLevel) -> str | None:
        if event.get("log_format") in FAST_FORMATS:
            return self._json_fast(event, level)
        return self._json_generic(event, level)

    def _json_generic(self, event: dict[str, Any], level: LogLevel) -> str:
        when = event.get("log_time")
        record: dict[str, Any] = {
            "time": self._clock.utc(when if isinstance(when, float | int) else time.time()),
            "level": level.name,
            "namespace": event.get("log_namespace"),
            "message": self._message(event) or "",
        }
        legacy = _LEGACY if event.get("log_namespace") == "log_legacy" else ()
        for key, value in event.items():
            if key[:4] == "log_" or key in legacy:
                continue
            if key in _RESERVED:
                if key == "event":
                    record["event"] = value if isinstance(value, str) else str(value)
                    continue
                key = f"field_{key}"
            if not isinstance(value, _PLAIN):
                value = _plain(value)
            record[key] = value
        failure = event.get("log_failure")
        if failure is not None:
            record["error"] = f"{getattr(failure.type, '__name__', failure.type)}: {failure.value}"
            try:
                record["traceback"] = failure.getTraceback()
            except Exception:
                record["traceback"] = None
        return _ENCODER.encode(record) + "\n"

    def _json_fast(self, event: dict[str, Any], level: LogLevel) -> str:
        """slimta_tx's own events (slimta_tx.events): known identifiers for keys, plain
        values; written out directly (a third of the cost of building a record for the
        encoder)."""
        log_format = event["log_format"]
        when = event.get("log_time")
        namespace = event.get("log_namespace")
        rest = self._heads.get((namespace, level)) or self._head(namespace, level)
        second, offset = self._clock.utc_second(when if isinstance(when, float) else time.time())
        if log_format == TRANSACTION:
            try:
                line = json_transaction(event, second, offset, rest)
            except Exception:  # a field of an unexpected type: the generic way
                return self._json_generic(event, level)
            worker = event.get("worker")  # a worker of --workers N names itself
            return line if worker is None else f'{line[:-2]},"worker":{int(worker)}}}\n'
        head = '{"time":"%s.%03dZ%s' % (second, offset * 1000, rest)  # noqa: UP031
        parts = [head, f',"message":{quote(FAST_FORMATS[log_format](event))}']
        append = parts.append
        for key, value in event.items():
            if key[:4] == "log_":
                continue
            kind = type(value)
            if kind is str:
                append(f',"{key}":{quote(value)}')
            elif value is None:
                append(f',"{key}":null')
            elif kind is int or kind is float:
                append(f',"{key}":{value!r}')
            else:
                append(f',"{key}":{_ENCODER.encode(_plain(value))}')
        append("}\n")
        return "".join(parts)

    def _head(self, namespace: Any, level: LogLevel) -> str:
        """The JSON head after the time, ``","level":...,"namespace":...``, kept per namespace
        and level."""
        if len(self._heads) >= 256:  # namespaces are few; never let them grow memory
            self._heads.clear()
        rest = f'","level":"{level.name}","namespace":{quote(namespace or "-")}'
        self._heads[namespace, level] = rest
        return rest

    def _broken(self, event: dict[str, Any], error: Exception) -> str:
        what = f"unformattable log event ({type(error).__name__}: {error})"
        if self.format == "json":
            record = {
                "time": self._clock.utc(time.time()),
                "level": "error",
                "namespace": str(event.get("log_namespace")),
                "message": what,
            }
            return json.dumps(record, separators=(",", ":")) + "\n"
        return f"{self._clock.local(time.time())} [slimta_tx.logsink#error] {what}\n"


def _plain(value: Any) -> Any:
    """A JSON-ready form of ``value``: lists and tuples of plain values stay lists."""
    if isinstance(value, list | tuple) and all(isinstance(v, _PLAIN) for v in value):
        return list(value)
    if isinstance(value, dict) and all(
        isinstance(k, str) and isinstance(v, _PLAIN) for k, v in value.items()
    ):
        return value
    if isinstance(value, LogLevel):
        return value.name
    return str(value)

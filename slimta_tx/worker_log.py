"""How a worker logs: straight to the stdout it shares with the parent, or through the parent.

When ``twistd -n`` logs to its stdout (a terminal, a pipe to journald, a file), each worker
writes its own lines, formatted as the parent formats them, to that same descriptor
(:func:`shared_stdout_observer`): the formatting cost is spread over the workers, and a line is
one ``write``, so lines from several processes do not mix. Otherwise (``--logfile`` with its
rotation, ``--syslog``, ``--logger``, a daemon) events go to the parent as JSON lines
(:func:`line_observer`) and the parent re-emits them to its observers.

On the way through the parent:

A worker's events keep their fields (``client``, ``queue_id``, ...), so a JSON log observer in
the parent sees the same structure a single process would log. Plain values go as they are
(one ``json.dumps``: the per-transaction event costs a few microseconds, not the ~35 of
Twisted's ``eventAsJSON``); an event carrying objects JSON cannot hold (an address, a failure)
goes as the text it would have printed, formatted in the worker.
"""

from __future__ import annotations

import json
from typing import IO, Any, cast

from twisted.logger import ILogObserver, LogLevel, formatEvent
from zope.interface import implementer

__all__ = [
    "Switch",
    "decode_event",
    "encode_event",
    "line_observer",
    "mark",
    "shared_stdout_observer",
]

# Objects that stay in the worker (the logger, its source) or travel as text.
_DROP = frozenset({"log_logger", "log_source", "log_level", "log_failure", "log_io", "log_trace"})


def encode_event(event: dict[str, Any]) -> bytes:
    """One event as one line of JSON (ending in a newline)."""
    level = event.get("log_level")
    record: dict[str, Any] = {k: v for k, v in event.items() if k not in _DROP}
    record["log_level"] = getattr(level, "name", "info")
    if "log_failure" not in event:
        try:
            return json.dumps(record).encode("utf-8") + b"\n"
        except (TypeError, ValueError):
            pass
    text = formatEvent(event)
    failure = event.get("log_failure")
    if failure is not None:
        try:
            text = f"{text}\n{failure.getTraceback()}".rstrip("\n")
        except Exception:  # pragma: no cover - a failure that cannot print itself
            text = f"{text}\n(traceback unavailable)"
    plain = {
        "log_level": record["log_level"],
        "log_namespace": event.get("log_namespace", "-"),
        "log_time": event.get("log_time"),
        "log_format": "{worker_text}",
        "worker_text": text,
    }
    if "log_system" in event:
        plain["log_system"] = str(event["log_system"])
    return json.dumps(plain).encode("utf-8") + b"\n"


def decode_event(line: bytes, worker: int) -> dict[str, Any] | None:
    """A line from worker ``worker`` as an event for the parent's observers; None if it is not
    one (the caller logs it as text)."""
    try:
        event = json.loads(line)
    except ValueError:
        return None
    if not isinstance(event, dict) or "log_namespace" not in event:
        return None
    try:
        event["log_level"] = LogLevel.levelWithName(str(event.get("log_level")))
    except Exception:
        event["log_level"] = LogLevel.info
    return mark(event, worker)


def mark(event: dict[str, Any], worker: int) -> dict[str, Any]:
    """Name the worker in the event: a ``worker`` field, and ``worker-N`` at the start of the
    text's system prefix (``[worker-2 slimta_tx.factory.SmtpEdge#info]``)."""
    system = event.get("log_system")
    if system is None:
        level = event.get("log_level")
        system = f"{event.get('log_namespace', '-')}#{getattr(level, 'name', 'info')}"
    event["log_system"] = f"worker-{worker}" if system == "-" else f"worker-{worker} {system}"
    event["worker"] = worker
    return event


def shared_stdout_observer(out: IO[str], worker: int) -> ILogObserver:
    """Lines as twistd writes them to its stdout, marked with the worker, on ``out``."""
    from twisted.logger import textFileLogObserver

    text = textFileLogObserver(out)

    def observe(event: dict[str, Any]) -> None:
        text(mark(dict(event), worker))

    return cast(ILogObserver, observe)


def line_observer(out: IO[bytes]) -> ILogObserver:
    """An observer writing each event to ``out`` (a worker's stdout) as one JSON line."""

    def observe(event: dict[str, Any]) -> None:
        out.write(encode_event(event))
        out.flush()

    return cast(ILogObserver, observe)


@implementer(ILogObserver)
class Switch:
    """A worker's log observer, changed once its options are read (``--log-level``,
    ``--log-format``): until then events go to the observer it starts with."""

    def __init__(self, target: Any, worker: int) -> None:
        self.target = target
        self.worker = worker

    def __call__(self, event: dict[str, Any]) -> None:
        self.target(event)

    def honour(self, level: str, log_format: str, reactor: Any, stdout: IO[str] | None) -> None:
        """Apply the options: on a shared ``stdout``, a :class:`~slimta_tx.logsink.LogSink`
        of its own (level, format, writes batched per reactor pass), each event marked with the
        worker; through the parent, drop what is below the level here (the parent's own sink
        formats the rest)."""
        from slimta_tx.events import level_named

        threshold = level_named(level)
        if stdout is not None:
            from slimta_tx.logsink import LogSink

            sink = LogSink(stdout, threshold, log_format, reactor)
            worker = self.worker

            def observe(event: dict[str, Any]) -> None:
                sink(mark(dict(event), worker))

            self.target = observe
            return
        forward = self.target

        def filtered(event: dict[str, Any]) -> None:
            event_level = event.get("log_level")
            if event_level is None or event_level >= threshold:
                forward(event)

        self.target = filtered

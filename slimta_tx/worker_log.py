"""Log events from a worker to the parent: one JSON object per line (sans-I/O both ways).

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

__all__ = ["decode_event", "encode_event", "line_observer"]

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
    system = event.get("log_system")
    if system is None:
        system = f"{event['log_namespace']}#{event['log_level'].name}"
    event["log_system"] = f"worker-{worker}" if system == "-" else f"worker-{worker} {system}"
    event["worker"] = worker
    return event


def line_observer(out: IO[bytes]) -> ILogObserver:
    """An observer writing each event to ``out`` (a worker's stdout) as one JSON line."""

    def observe(event: dict[str, Any]) -> None:
        out.write(encode_event(event))
        out.flush()

    return cast(ILogObserver, observe)

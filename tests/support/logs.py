"""Capture the events of the global log publisher (and always stop capturing)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, cast

from twisted.logger import ILogObserver, globalLogPublisher


@contextmanager
def captured_events() -> Iterator[list[dict[str, Any]]]:
    """Like ``twisted.logger.capturedLogs``, but the observer goes even if the block raises."""
    events: list[dict[str, Any]] = []
    observer = cast(ILogObserver, events.append)  # a callable taking the event is one
    globalLogPublisher.addObserver(observer)
    try:
        yield events
    finally:
        globalLogPublisher.removeObserver(observer)

"""Log options: ``--log-level`` and ``--log-format``, and the log observer ``twistd`` installs.

``twistd`` builds its log observer itself after the plugin made the service: a text file
observer on stdout (``-n``), on the ``-l`` file, or on ``twistd.log`` when it daemonizes; it
formats, writes and flushes every event, debug ones included. Before it does, it asks the
application for an ``ILogObserver`` component and uses that one if there is one. So ``twistd
slimta`` gives its service a factory for a :class:`~slimta_tx.logsink.LogSink` (level filter,
text or JSON, batched writes) on the same destination ``twistd`` would have chosen; the
service hands it to the application when ``twistd`` adopts it
(:meth:`slimta_tx.service.EdgeService.setServiceParent`).

``twistd`` keeps the last word where the user chose: ``--logger`` (your own observer) and
``--syslog`` are left as they are (the edge's own events still honour ``--log-level``), and
``-l -`` without ``-n`` still stops with twistd's message.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable
from typing import Any

from twisted.python import usage

from slimta_tx.events import level_named
from slimta_tx.logsink import FORMATS, LogSink

LEVELS = ("debug", "info", "warn", "error", "critical")


class OptionGroup:
    optParameters: list[list[Any]] = [
        [
            "log-level",
            None,
            "info",
            "Lowest level logged: debug (adds connection events), info, warn, error, critical.",
        ],
        [
            "log-format",
            None,
            "text",
            "text (as twistd writes) or json (one object per line, for Loki, Vector, ...).",
        ],
    ]


def defaults(config: Any) -> None:
    pass


def validate(config: Any) -> None:
    try:
        level = level_named(config["log-level"])
    except ValueError:
        raise usage.UsageError(f"--log-level must be one of {', '.join(LEVELS)}") from None
    config["log-level"] = level.name
    config["log-format"] = config["log-format"].strip().lower()
    if config["log-format"] not in FORMATS:
        raise usage.UsageError(f"--log-format must be one of {', '.join(FORMATS)}")


def configure(config: Any, edge: Any, service: Any, reactor: Any) -> None:
    level = level_named(config["log-level"])
    edge.events.set_level(level)
    twistd = getattr(config, "parent", None)
    if twistd is not None:
        service.log_observer_factory = observer_factory(
            twistd, level, config["log-format"], reactor
        )


def observer_factory(
    twistd: Any, level: Any, log_format: str, reactor: Any
) -> Callable[[], LogSink] | None:
    """What builds the log observer for ``twistd``'s options; None: leave twistd's own."""
    if twistd.get("logger") or twistd.get("syslog"):
        return None
    logfile = twistd.get("logfile") or ""
    nodaemon = bool(twistd.get("nodaemon"))
    if logfile == "-" and not nodaemon:
        return None  # twistd says "Daemons cannot log to stdout, exiting!"

    def build() -> LogSink:
        if logfile == "-" or (nodaemon and not logfile):
            # The real stdout: twistd redirects sys.stdout into the log right after.
            return LogSink(sys.stdout, level, log_format, reactor)
        return _file_sink(logfile or "twistd.log", level, log_format, reactor)

    return build


def _file_sink(path: str, level: Any, log_format: str, reactor: Any) -> LogSink:
    """As twistd does: a rotating ``LogFile`` (1 MB a file), and SIGUSR1 rotates it unless
    something else already handles SIGUSR1."""
    from twisted.python.logfile import LogFile

    log_file = LogFile.fromFullPath(path)
    sink = LogSink(log_file, level, log_format, reactor)
    if hasattr(signal, "SIGUSR1") and not signal.getsignal(signal.SIGUSR1):

        def rotate() -> None:
            sink.flush()
            log_file.rotate()

        def on_sigusr1(signum: int, frame: Any) -> None:
            reactor.callFromThread(rotate)

        signal.signal(signal.SIGUSR1, on_sigusr1)
    return sink

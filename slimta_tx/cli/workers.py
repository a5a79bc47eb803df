"""``--workers N``: serve the listeners from N processes (see slimta_tx/workers.py and
docs/deployment.md). With 1, the default, nothing changes: one process does everything."""

from __future__ import annotations

import sys
from typing import Any

from twisted.python import usage

from slimta_tx.cli.coerce import whole_number
from slimta_tx.supervise import RestartLimits

#: More would be a typo: each worker is a whole Python process.
MAX_WORKERS = 256


class OptionGroup:
    optParameters: list[list[Any]] = [
        [
            "workers",
            None,
            1,
            "Processes serving the listeners (1: this process alone; one per core is usual).",
            whole_number("workers", 1),
        ],
        [
            "worker-restarts",
            None,
            "5/60",
            "N/SECONDS: a worker failing more than N times in SECONDS stops the service.",
        ],
    ]

    def parseOptions(self, options: Any = None) -> None:
        # Each worker parses the same arguments again.
        self["workers-argv"] = list(sys.argv[1:] if options is None else options)  # type: ignore[index]
        super().parseOptions(options)  # type: ignore[misc]


def defaults(config: Any) -> None:
    config["workers-argv"] = []


def parse_restarts(text: str) -> RestartLimits:
    """``"5/60"`` -> at most 5 restarts in any 60 s; ValueError with a one-line message."""
    count, sep, window = text.partition("/")
    if sep:
        try:
            return RestartLimits(max_restarts=int(count), window=float(window))
        except ValueError:
            pass
    raise ValueError(f"--worker-restarts takes N/SECONDS, e.g. 5/60, not {text!r}")


def validate(config: Any) -> None:
    from slimta_tx.workers import LISTENER_OPTIONS, split_listener

    if config["workers"] > MAX_WORKERS:
        raise usage.UsageError(f"--workers must be at most {MAX_WORKERS}")
    try:
        config["worker-restarts"] = parse_restarts(str(config["worker-restarts"]))
    except ValueError as e:
        raise usage.UsageError(str(e)) from None
    if config["workers"] > 1:
        for description in [d for option in LISTENER_OPTIONS for d in config.get(option, [])]:
            try:
                split_listener(description)
            except ValueError as e:
                raise usage.UsageError(str(e)) from None


def wanted(config: Any) -> bool:
    """True when ``makeService`` should build the parent of several workers."""
    return int(config.get("workers", 1)) > 1


def configure(config: Any, edge: Any, service: Any, reactor: Any) -> None:
    """Nothing to do in a single process (the parent is built instead, see ``wanted``)."""

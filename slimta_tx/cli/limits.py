"""Limits that keep one client, or one bad day, from taking the server down: body and session
deadlines, a minimum data rate, connection capacity, memory given back (see
slimta_tx/cli/__init__.py for the contract, docs/operations.md for what each limit answers).

The deadlines have defaults that need no tuning. Connection capacity is on by default too: at
start-up the soft descriptor limit is raised to the hard one and part of it is kept in reserve
for the bus and spool; ``--max-connections`` adds a limit of your own.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.logger import Logger

from slimta_tx.capacity import (
    DEFAULT_LISTEN_BACKLOG,
    ConnectionGate,
    raise_descriptor_limit,
    reactor_descriptor_cap,
    somaxconn,
)
from slimta_tx.cli.coerce import whole_number
from slimta_tx.memory import DEFAULT_TRIM_INTERVAL, MemoryTrimmer
from slimta_tx.policy import Policy

_DEFAULTS = Policy()


def _seconds_or_zero(name: str) -> Callable[[str], float]:
    def coerce(value: str) -> float:
        try:
            number = float(value)
        except ValueError:
            raise ValueError(f"--{name} takes a number of seconds, not {value!r}") from None
        if number < 0:
            raise ValueError(f"--{name} must be 0 (no limit) or more")
        return number

    coerce.coerceDoc = "(seconds; 0: no limit)"  # type: ignore[attr-defined]
    return coerce


class OptionGroup:
    optParameters: list[list[Any]] = [
        [
            "data-deadline",
            None,
            _DEFAULTS.data_deadline,
            "Seconds a whole message body (DATA, or all BDAT chunks) may take; then 421 4.4.2.",
            _seconds_or_zero("data-deadline"),
        ],
        [
            "min-data-rate",
            None,
            _DEFAULTS.min_data_rate,
            "Bytes/second a body must average after --data-rate-grace; slower: 421 4.4.2. 0: off.",
            whole_number("min-data-rate", 0),
        ],
        [
            "data-rate-grace",
            None,
            _DEFAULTS.data_rate_grace,
            "Seconds of a body before --min-data-rate applies (the credit of a slow start).",
            _seconds_or_zero("data-rate-grace"),
        ],
        [
            "session-deadline",
            None,
            _DEFAULTS.session_deadline,
            "Seconds a connection may last (a transaction under way may finish); 421 4.4.2.",
            _seconds_or_zero("session-deadline"),
        ],
        [
            "max-connections",
            None,
            None,
            "Connections at once, all clients together; more get 421 4.7.0 and are closed. "
            "(default: as many as file descriptors allow)",
            whole_number("max-connections", 1),
        ],
        [
            "descriptor-reserve",
            None,
            None,
            "File descriptors kept for the bus and spool; past the rest, new connections get "
            "421 4.3.2 (default: a tenth of the limit, at least 128).",
            whole_number("descriptor-reserve", 0),
        ],
        [
            "memory-trim",
            None,
            DEFAULT_TRIM_INTERVAL,
            "Seconds between returns of the allocator's free memory to the system (glibc "
            "malloc_trim); 0: never.",
            _seconds_or_zero("memory-trim"),
        ],
    ]


def defaults(config: Any) -> None:
    pass


def validate(config: Any) -> None:
    if "policy" in config:
        config["policy"] = config["policy"].evolve(
            data_deadline=config["data-deadline"],
            min_data_rate=config["min-data-rate"],
            data_rate_grace=config["data-rate-grace"],
            session_deadline=config["session-deadline"],
        )


def configure(config: Any, edge: Any, service: Any, reactor: Any) -> None:
    gate = ConnectionGate(config["max-connections"])
    gate.install(edge)
    DescriptorLimits(gate, reactor, config["descriptor-reserve"]).setServiceParent(service)
    if config["memory-trim"]:
        MemoryTrimmer(config["memory-trim"], reactor=reactor).setServiceParent(service)


class DescriptorLimits(Service):
    """At start-up: raise the soft descriptor limit to the hard one, tell the gate, and log
    what the server can hold (and the kernel's cap on listen backlogs)."""

    log = Logger()

    def __init__(self, gate: ConnectionGate, reactor: Any, reserve: int | None = None) -> None:
        self.gate = gate
        self.reactor = reactor
        self.reserve = reserve

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        limits = raise_descriptor_limit()
        usable = limits.soft
        cap = reactor_descriptor_cap(self.reactor)
        if cap is not None and cap < usable:
            usable = cap
        try:
            self.gate.set_descriptor_limit(usable, self.reserve)
        except ValueError as e:
            raise SystemExit(f"slimta: --descriptor-reserve: {e}") from None
        if limits.error is not None:
            self.log.warn(
                "file descriptors: could not raise the soft limit {soft} to the hard limit "
                "{hard}: {error}",
                soft=limits.before,
                hard=limits.hard,
                error=limits.error,
            )
        self.log.info(
            "file descriptors: soft limit {soft} (was {before}, hard limit {hard}){cap}; "
            "{reserve} kept for the bus and spool, so new connections get 421 past {ceiling} "
            "in use{maximum}",
            soft=limits.soft,
            before=limits.before,
            hard=limits.hard,
            cap=f", {cap} usable by this reactor" if cap is not None and cap < limits.soft else "",
            reserve=self.gate.reserve,
            ceiling=self.gate.descriptor_ceiling,
            maximum=(
                f" or {self.gate.max_connections} connections"
                if self.gate.max_connections is not None
                else ""
            ),
        )
        kernel_cap = somaxconn()
        if kernel_cap is not None and kernel_cap < DEFAULT_LISTEN_BACKLOG:
            self.log.warn(
                "listen backlog: the kernel caps it at net.core.somaxconn = {cap} (we ask for "
                "{backlog}); raise it with sysctl for bursts of connections",
                cap=kernel_cap,
                backlog=DEFAULT_LISTEN_BACKLOG,
            )

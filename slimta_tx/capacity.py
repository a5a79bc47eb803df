"""Connection capacity: the listen backlog, file descriptors, and a global connection limit.

Three things decide how a burst of clients fares:

- **The listen backlog.** Connections the kernel has completed but the server has not accepted
  yet wait there; Twisted's default is 50, so a burst of a thousand connects leaves most of them
  hanging without a banner (SMTP clients wait for the server to speak first). Listeners built
  from endpoint descriptions get :data:`DEFAULT_LISTEN_BACKLOG` unless the description names
  its own ``backlog=`` (:func:`with_backlog`). The kernel caps it at ``net.core.somaxconn``.
- **File descriptors.** Every connection holds one, a body over the spool's memory threshold
  another, and the bus needs some to store or forward mail (Maildir files, the broker or next
  hop). :func:`raise_descriptor_limit` raises the soft ``RLIMIT_NOFILE`` to the hard limit at
  start-up; the :class:`ConnectionGate` then keeps :func:`descriptor_reserve` of them for the
  bus and spool: past ``limit - reserve`` descriptors in use, new connections get
  ``421 4.3.2`` and are closed at once, so the bus never meets ``EMFILE``.
- **A global connection limit** (``max_connections``): above it, ``421 4.7.0`` and a close.

A turned-away connection is answered and closed without building a session: no banner hooks,
no DNS lookups, no TLS handshake (on an implicit-TLS edge it is closed without a reply, since
the client expects a handshake first).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from slimta_tx.reply import Reply
from slimta_tx.spool import Spool

if TYPE_CHECKING:  # pragma: no cover
    from slimta_tx.factory import SmtpEdge

__all__ = [
    "DEFAULT_LISTEN_BACKLOG",
    "ConnectionGate",
    "DescriptorLimit",
    "descriptor_reserve",
    "raise_descriptor_limit",
    "somaxconn",
    "with_backlog",
]

#: The listen backlog of listeners built from endpoint descriptions without a ``backlog=``.
DEFAULT_LISTEN_BACKLOG = 4096
# Endpoint types whose server parser takes a ``backlog`` argument.
_BACKLOG_TYPES = frozenset({"tcp", "tcp6", "unix", "ssl"})
# Descriptors select() can watch: with the select reactor, more are of no use.
_FD_SETSIZE = 1024


def with_backlog(description: str, backlog: int = DEFAULT_LISTEN_BACKLOG) -> str:
    """``description`` with ``:backlog=N`` added when its endpoint type takes one and it names
    none (``tcp:25`` -> ``tcp:25:backlog=4096``); anything else is returned as it is."""
    kind = description.split(":", 1)[0].strip().lower()
    if kind not in _BACKLOG_TYPES or re.search(r"(?:^|:)backlog=", description):
        return description
    if description.endswith("\\"):  # an escape with nothing after it: leave it to the parser
        return description
    return f"{description}:backlog={backlog}"


def somaxconn(path: str = "/proc/sys/net/core/somaxconn") -> int | None:
    """The kernel's cap on listen backlogs (Linux), or None where it cannot be read."""
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


@dataclass(frozen=True)
class DescriptorLimit:
    """``RLIMIT_NOFILE`` before and after :func:`raise_descriptor_limit`."""

    before: int
    soft: int
    hard: int
    error: str | None = None

    @property
    def raised(self) -> bool:
        return self.soft > self.before


def raise_descriptor_limit(resource_module: Any = None) -> DescriptorLimit:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard limit (an unlimited hard limit counts as
    ``fs.nr_open``, the most Linux allows); report what it was and what it is now."""
    if resource_module is None:
        import resource as resource_module
    limits = resource_module.RLIMIT_NOFILE
    soft, hard = resource_module.getrlimit(limits)
    target = hard
    if hard == resource_module.RLIM_INFINITY:
        target = _nr_open()
    if soft != resource_module.RLIM_INFINITY and soft < target:
        try:
            resource_module.setrlimit(limits, (target, hard))
        except (OSError, ValueError) as e:
            return DescriptorLimit(soft, soft, hard, str(e))
        return DescriptorLimit(soft, target, hard)
    return DescriptorLimit(soft, soft, hard)


def _nr_open() -> int:
    try:
        with open("/proc/sys/fs/nr_open") as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return 1024 * 1024


def descriptor_reserve(limit: int) -> int:
    """Descriptors kept for the bus, the spool, logs and the reactor: a tenth of the limit,
    at least 128 (enough for one accept batch of the reactor, Maildir's worker threads, the
    broker or next-hop connections), and never more than half."""
    return min(max(128, limit // 10), limit // 2)


class ConnectionGate:
    """Turn connections away before the server runs out of room.

    :param max_connections: sessions at once (None: as many as descriptors allow).
    :param descriptor_limit: the soft ``RLIMIT_NOFILE`` (None: descriptors are not watched).
    :param reserve: descriptors kept for everything but connections and spool files
        (default: :func:`descriptor_reserve`).
    """

    log = Logger()

    def __init__(
        self,
        max_connections: int | None = None,
        descriptor_limit: int | None = None,
        reserve: int | None = None,
    ) -> None:
        if max_connections is not None and max_connections < 1:
            raise ValueError("max_connections must be 1 or more")
        self.max_connections = max_connections
        self.descriptor_limit: int | None = None
        self.reserve = 0
        #: Past this many descriptors in use, new connections are turned away (None: never).
        self.descriptor_ceiling: int | None = None
        if descriptor_limit is not None:
            self.set_descriptor_limit(descriptor_limit, reserve)
        #: Connections being answered 421 and closed right now (each holds a descriptor).
        self.turning_away = 0
        #: Connections turned away so far, by reason: ``"max-connections"``, ``"descriptors"``.
        self.turned_away: dict[str, int] = {"max-connections": 0, "descriptors": 0}
        self._warned: set[str] = set()

    def set_descriptor_limit(self, limit: int, reserve: int | None = None) -> None:
        """Watch descriptors: at most ``limit`` (the soft ``RLIMIT_NOFILE``), ``reserve`` of
        them kept (default: :func:`descriptor_reserve`)."""
        reserve = descriptor_reserve(limit) if reserve is None else reserve
        if not 0 <= reserve < limit:
            raise ValueError(f"the descriptor reserve ({reserve}) must be less than {limit}")
        self.descriptor_limit = limit
        self.reserve = reserve
        self.descriptor_ceiling = limit - reserve

    def install(self, edge: SmtpEdge) -> None:
        edge.connection_gate = self

    def descriptors_in_use(self, edge: SmtpEdge) -> int:
        """Descriptors the gate accounts for: sessions, connections waiting for ``accept()``
        or being turned away, and spool files."""
        held = edge.held_connections()
        return len(edge.connections) + held + self.turning_away + Spool.files_open

    def check(self, edge: SmtpEdge) -> Reply | None:
        """None to admit a new connection, else the 421 it gets."""
        hostname = edge.policy.hostname
        ceiling = self.descriptor_ceiling
        if ceiling is not None and self.descriptors_in_use(edge) >= ceiling:
            self._count("descriptors", ceiling)
            return Reply("421", f"{hostname} Too busy, try again later", "4.3.2")
        limit = self.max_connections
        if limit is not None and len(edge.connections) + edge.held_connections() >= limit:
            self._count("max-connections", limit)
            return Reply("421", f"{hostname} Too many connections, try again later", "4.7.0")
        if self._warned:
            self._admitted()
        return None

    def turn_away(self, edge: SmtpEdge, reply: Reply) -> Protocol:
        """A protocol that answers ``reply`` and closes (silently on implicit TLS)."""
        silent = bool(edge.tls_immediately and edge.tls_context is not None)
        return _TurnAway(self, None if silent else reply.render())

    def _count(self, reason: str, limit: int) -> None:
        self.turned_away[reason] += 1
        if reason not in self._warned:
            # Once per episode: the log stays readable under a flood.
            self._warned.add(reason)
            what = "descriptors in use" if reason == "descriptors" else "connections"
            self.log.warn(
                "turning new connections away: {limit} {what} reached ({reason})",
                limit=limit,
                what=what,
                reason=reason,
            )

    def _admitted(self) -> None:
        if self._warned:
            self.log.info(
                "accepting connections again ({count} turned away)",
                count=sum(self.turned_away.values()),
            )
            self._warned.clear()


class _TurnAway(Protocol):
    """Write the refusal, close; count the descriptor until the connection is gone."""

    def __init__(self, gate: ConnectionGate, reply: bytes | None) -> None:
        self.gate = gate
        self.reply = reply

    def connectionMade(self) -> None:
        self.gate.turning_away += 1
        transport = cast(Any, self.transport)
        if self.reply is not None:
            transport.write(self.reply)
            transport.loseConnection()
        else:
            transport.abortConnection()

    def dataReceived(self, data: bytes) -> None:
        pass  # whatever it says, the answer is the refusal

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.gate.turning_away -= 1


def open_descriptors() -> int | None:
    """Descriptors this process has open (Linux ``/proc``), or None; for logs and tests."""
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return None


def reactor_descriptor_cap(reactor: object) -> int | None:
    """The most descriptors the reactor can watch (select(): FD_SETSIZE), or None."""
    name = type(reactor).__name__.lower()
    return _FD_SETSIZE if "select" in name else None

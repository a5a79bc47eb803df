"""What the DNS policies share: reverse names, answer parsing, and a cache with a timeout.

Lookups go through a ``twisted.names`` resolver (any ``IResolver``; tests use a fake one). A
lookup that fails or takes longer than its timeout gives the caller a fallback value and is not
cached: a DNS problem must never turn into a rejection.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Coroutine
from typing import Any, Generic, TypeVar, cast

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.names import dns
from twisted.python.failure import Failure

__all__ = [
    "IPAddress",
    "LookupCache",
    "addresses_in",
    "client_ip",
    "default_resolver",
    "names_in",
    "reverse_pointer",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
V = TypeVar("V")


def client_ip(host: str) -> IPAddress | None:
    """The client's address as an ``ipaddress`` object (IPv4-mapped IPv6 unwrapped)."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def reverse_pointer(ip: IPAddress, zone: str | None = None) -> str:
    """``192.0.2.1`` -> ``1.2.0.192.in-addr.arpa`` (or ``1.2.0.192.<zone>`` for a DNSBL);
    IPv6 in nibbles (RFC 3596 and RFC 5782)."""
    labels = ip.reverse_pointer.rsplit(".", 2)[0]
    return f"{labels}.{zone.strip('.')}" if zone else ip.reverse_pointer


def addresses_in(answers: list[dns.RRHeader]) -> list[IPAddress]:
    """The A and AAAA addresses among ``answers`` (CNAMEs and the rest are skipped)."""
    found: list[IPAddress] = []
    for record in answers:
        payload: Any = record.payload
        if record.type == dns.A:
            found.append(ipaddress.IPv4Address(socket.inet_ntoa(payload.address)))
        elif record.type == dns.AAAA:
            found.append(ipaddress.IPv6Address(socket.inet_ntop(socket.AF_INET6, payload.address)))
    return found


def names_in(answers: list[dns.RRHeader]) -> list[str]:
    """The PTR target names among ``answers``, lower case, without the final dot."""
    return [
        str(cast(Any, record.payload).name).lower().rstrip(".")
        for record in answers
        if record.type == dns.PTR
    ]


def default_resolver() -> Any:
    """The shared ``twisted.names`` resolver (reads ``/etc/resolv.conf`` and ``/etc/hosts``)."""
    from twisted.names import client

    return client.getResolver()


class LookupCache(Generic[V]):
    """Results by key for a while; one lookup in flight per key; a timeout on each lookup.

    :param clock: for expiry and timeouts (the edge's reactor, or a ``Clock`` in tests).
    :param timeout: seconds a lookup may take before the fallback is used.
    :param ttl: seconds to keep a result, as a function of the result (0: do not keep).
    :param max_entries: the oldest entries go first when the cache is full.
    """

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        timeout: float,
        ttl: Callable[[V], float],
        max_entries: int = 10000,
    ) -> None:
        self.clock = clock
        self.timeout = timeout
        self.ttl = ttl
        self.max_entries = max_entries
        self._entries: dict[str, tuple[float, V]] = {}
        self._in_flight: dict[str, Deferred[V]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(
        self, key: str, compute: Callable[[], Coroutine[Any, Any, V]], fallback: V
    ) -> Deferred[V]:
        """The cached result for ``key``, or ``compute()``'s (``fallback`` if it fails)."""
        now = self.clock.seconds()
        entry = self._entries.get(key)
        if entry is not None:
            if entry[0] > now:
                return succeed(entry[1])
            del self._entries[key]
        shared = self._in_flight.get(key)
        if shared is None:
            shared = self._start(key, compute, fallback)
        if shared.called:  # answered synchronously
            return succeed(cast(V, shared.result))
        return _observe(shared)

    def _start(
        self, key: str, compute: Callable[[], Coroutine[Any, Any, V]], fallback: V
    ) -> Deferred[V]:
        d = Deferred.fromCoroutine(compute())
        d.addTimeout(self.timeout, self.clock)

        def store(value: V) -> V:
            ttl = self.ttl(value)
            if ttl > 0:
                while len(self._entries) >= self.max_entries:
                    del self._entries[next(iter(self._entries))]
                self._entries[key] = (self.clock.seconds() + ttl, value)
            return value

        def failed(failure: Failure) -> V:
            self.log.info(
                "DNS lookup for {key} failed ({error}); carrying on without it",
                key=key,
                error=failure.getErrorMessage() or repr(failure.value),
            )
            return fallback

        def done(value: V) -> V:
            self._in_flight.pop(key, None)
            return value

        d.addCallbacks(store, failed).addCallback(done)
        if not d.called:
            self._in_flight[key] = d
        return d


def _observe(shared: Deferred[V]) -> Deferred[V]:
    """A Deferred of ``shared``'s result; cancelling it leaves ``shared`` running."""
    out: Deferred[V] = Deferred()

    def relay(value: V) -> V:
        if not out.called:
            out.callback(value)
        return value

    shared.addCallback(relay)
    return out

"""Reverse DNS of the client: PTR, then forward-confirm (FCrDNS), with a timeout and a cache.

Before the greeting, the client's address is looked up (PTR); each name found (up to
``max_names``) is looked up forward (A or AAAA); the first that leads back to the client's
address becomes ``session.reverse_name``, which validators read and the ``Received:`` header
shows (``from helo (name [ip])``). Unconfirmed, missing or timed out: ``reverse_name`` stays
None (``unknown`` in ``Received:``). This policy never refuses a client by itself; a validator
can (``if session.reverse_name is None: reply.set("450", ..., "4.7.25")``, RFC 7372).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.names import dns, error

from slimta_tx.policies.dns import (
    IPAddress,
    LookupCache,
    addresses_in,
    client_ip,
    default_resolver,
    names_in,
    reverse_pointer,
)

if TYPE_CHECKING:  # pragma: no cover
    from slimta_tx.envelope import Session
    from slimta_tx.factory import SmtpEdge
    from slimta_tx.reply import Reply

__all__ = ["ReverseDnsPolicy"]


class ReverseDnsPolicy:
    """Set ``session.reverse_name`` to the client's forward-confirmed name.

    :param resolver: an ``IResolver``; the system's (``twisted.names``) when None.
    :param timeout: seconds for the whole lookup (PTR and forward lookups).
    :param cache_ttl: seconds to remember a confirmed name.
    :param negative_ttl: seconds to remember that there is none (failures are not cached).
    :param max_names: PTR names tried at most.
    """

    def __init__(
        self,
        resolver: Any = None,
        timeout: float = 5.0,
        cache_ttl: float = 3600.0,
        negative_ttl: float = 300.0,
        max_names: int = 5,
        max_entries: int = 10000,
    ) -> None:
        self.resolver = resolver
        self.timeout = timeout
        self.cache_ttl = cache_ttl
        self.negative_ttl = negative_ttl
        self.max_names = max_names
        self.max_entries = max_entries
        self.cache: LookupCache[str | None] | None = None

    def install(self, edge: SmtpEdge) -> None:
        self.cache = LookupCache(edge.reactor, self.timeout, self._ttl, self.max_entries)
        edge.validators.add_check("BANNER", self.check)

    async def check(self, session: Session, reply: Reply, *extra: Any) -> None:
        ip = client_ip(session.address[0])
        if ip is not None:
            session.reverse_name = await self.lookup(ip)

    def lookup(self, ip: IPAddress) -> Any:
        """A Deferred firing with the forward-confirmed name of ``ip``, or None."""
        assert self.cache is not None, "install() the policy first"
        return self.cache.lookup(str(ip), lambda: self._resolve(ip), None)

    def _ttl(self, name: str | None) -> float:
        return self.cache_ttl if name else self.negative_ttl

    async def _resolve(self, ip: IPAddress) -> str | None:
        resolver = self.resolver
        if resolver is None:
            resolver = self.resolver = default_resolver()
        timeout = (self.timeout,)
        try:
            answers, _, _ = await resolver.lookupPointer(reverse_pointer(ip), timeout=timeout)
        except error.DNSNameError:
            return None
        for name in names_in(answers)[: self.max_names]:
            lookup = resolver.lookupAddress if ip.version == 4 else resolver.lookupIPV6Address
            try:
                forward, _, _ = await lookup(name, timeout=timeout)
            except error.DNSNameError:
                continue
            wanted = dns.A if ip.version == 4 else dns.AAAA
            if ip in addresses_in([r for r in forward if r.type == wanted]):
                return name
        return None

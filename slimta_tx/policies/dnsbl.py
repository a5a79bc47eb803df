"""DNSBL and DNSWL checks of the client address (RFC 5782), through ``twisted.names``.

The client is looked up in every allowlist (DNSWL) and blocklist (DNSBL) zone at once. Listed
in an allowlist: never refused by a blocklist, and ``session.extra["dnswl"]`` names the zone
(the early-talker delay skips such clients). Otherwise listed in a blocklist: ``554 5.7.1``
naming the zone (the first listed zone in the order given), and ``session.extra["dnsbl"]``.

A DNS failure or timeout counts as "not listed": a DNS problem never refuses mail. Answers
outside 127.0.0.0/8, and Spamhaus-style error codes in 127.255.255.0/24 (for example "queries
through a public resolver are refused"), are not listings either.

By default the check runs at ``BANNER`` (the client gets a 554 greeting and then 503 to all but
QUIT, RFC 5321 3.1); with ``command="RCPT"`` it refuses each recipient instead, except
``postmaster`` (RFC 5321 4.5.1), so that listed senders can still reach the postmaster.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import DeferredList
from twisted.logger import Logger
from twisted.names import dns, error

from slimta_tx.policies.dns import (
    IPAddress,
    LookupCache,
    addresses_in,
    client_ip,
    default_resolver,
    reverse_pointer,
)
from slimta_tx.reply import Reply

if TYPE_CHECKING:  # pragma: no cover
    from slimta_tx.envelope import Session
    from slimta_tx.factory import SmtpEdge

__all__ = ["DnsblPolicy"]

_LOOPBACK = ipaddress.ip_network("127.0.0.0/8")
_ERROR_CODES = ipaddress.ip_network("127.255.255.0/24")
_RESULT = "dnsbl.result"  # session.extra: the (allowlist, blocklist) verdict, looked up once


class DnsblPolicy:
    """Refuse clients listed in ``blocklists`` unless listed in ``allowlists``.

    :param blocklists: DNSBL zones, e.g. ``["zen.spamhaus.org"]``.
    :param allowlists: DNSWL zones, e.g. ``["list.dnswl.org"]``.
    :param resolver: an ``IResolver``; the system's (``twisted.names``) when None.
    :param timeout: seconds each lookup may take.
    :param command: where to refuse: ``"BANNER"`` (default), ``"MAIL"`` or ``"RCPT"``.
    :param cache_ttl: seconds to remember an answer (listed or not) per zone and address.
    """

    log = Logger()

    def __init__(
        self,
        blocklists: Sequence[str] = (),
        allowlists: Sequence[str] = (),
        resolver: Any = None,
        timeout: float = 5.0,
        command: str = "BANNER",
        cache_ttl: float = 300.0,
    ) -> None:
        if command.upper() not in ("BANNER", "EHLO", "MAIL", "RCPT"):
            raise ValueError(f"DNSBL checks run at BANNER, EHLO, MAIL or RCPT, not {command!r}")
        self.blocklists = [_zone(z) for z in blocklists]
        self.allowlists = [_zone(z) for z in allowlists]
        self.resolver = resolver
        self.timeout = timeout
        self.command = command.upper()
        self.cache_ttl = cache_ttl
        self.edge: SmtpEdge | None = None
        self.cache: LookupCache[bool] | None = None

    def install(self, edge: SmtpEdge) -> None:
        self.edge = edge
        self.cache = LookupCache(edge.reactor, self.timeout, lambda listed: self.cache_ttl)
        edge.validators.add_check(self.command, self.check)

    async def check(self, session: Session, reply: Reply, *extra: Any) -> None:
        if self.command == "RCPT" and extra and str(extra[0]).lower() == "postmaster":
            return
        allowed, blocked = await self.verdict(session)
        if allowed is None and blocked is not None:
            reply.set(
                "554",
                f"Service unavailable; client [{session.address[0]}] blocked using {blocked}",
                "5.7.1",
            )
            if self.edge is not None:
                self.edge.events.rejected(session, "dnsbl", reply, detail=blocked)

    async def verdict(self, session: Session) -> tuple[str | None, str | None]:
        """``(allowlist zone, blocklist zone)`` listing the client (None: not listed)."""
        cached = session.extra.get(_RESULT)
        if cached is not None:
            return cached  # type: ignore[no-any-return]
        result: tuple[str | None, str | None] = (None, None)
        ip = client_ip(session.address[0])
        edge = self.edge
        if ip is not None and edge is not None and not edge.policy.is_trusted(str(ip)):
            zones = self.allowlists + self.blocklists
            answers = await DeferredList(
                [self.listed(zone, ip) for zone in zones], consumeErrors=True
            )
            listed = [zone for zone, (ok, hit) in zip(zones, answers, strict=True) if ok and hit]
            allowed = next((z for z in listed if z in self.allowlists), None)
            blocked = next((z for z in listed if z in self.blocklists), None)
            result = (allowed, blocked)
            if allowed:
                session.extra["dnswl"] = allowed
            if blocked:
                session.extra["dnsbl"] = blocked
            if allowed or blocked:
                self.log.info(
                    "{client} listed: allowlist={allowed} blocklist={blocked}",
                    client=str(ip),
                    allowed=allowed,
                    blocked=blocked,
                )
        session.extra[_RESULT] = result
        return result

    def listed(self, zone: str, ip: IPAddress) -> Any:
        """A Deferred firing True if ``ip`` is listed in ``zone`` (False on DNS failure)."""
        assert self.cache is not None
        name = reverse_pointer(ip, zone)
        return self.cache.lookup(name, lambda: self._query(name), False)

    async def _query(self, name: str) -> bool:
        resolver = self.resolver
        if resolver is None:
            resolver = self.resolver = default_resolver()
        try:
            answers, _, _ = await resolver.lookupAddress(name, timeout=(self.timeout,))
        except error.DNSNameError:
            return False  # NXDOMAIN: not listed
        return any(
            address in _LOOPBACK and address not in _ERROR_CODES
            for address in addresses_in([a for a in answers if a.type == dns.A])
        )


def _zone(zone: str) -> str:
    zone = zone.strip().strip(".").lower()
    if not zone or " " in zone:
        raise ValueError(f"not a DNS zone: {zone!r}")
    return zone

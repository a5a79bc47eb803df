"""Limits per client address: concurrent connections and connection rate (``421 4.7.0``).

Checked before the greeting, so a flood costs no DNS lookups. IPv6 clients are counted per
``/64`` by default (one host usually holds a whole /64). Trusted networks are exempt, as
Postfix exempts ``mynetworks`` from its anvil limits. Only connections that got past the check
count towards the rate, so a client that keeps within the rate is never locked out by its
refused attempts.
"""

from __future__ import annotations

import ipaddress
from collections import deque
from typing import TYPE_CHECKING, Any

from twisted.logger import Logger

from slimta_tx.policies.dns import client_ip

if TYPE_CHECKING:  # pragma: no cover
    from slimta_tx.envelope import Session
    from slimta_tx.factory import SmtpEdge
    from slimta_tx.reply import Reply

__all__ = ["ConnectionLimits"]

_COUNTED = "limits.key"  # session.extra: the key this connection is counted under
_SWEEP_EVERY = 1000


class ConnectionLimits:
    """At most ``max_connections`` at once and ``max_rate = (n, seconds)`` per client.

    :param max_connections: concurrent connections per client address (None: no limit).
    :param max_rate: ``(connections, seconds)``: at most that many new connections in any
        window of that many seconds (None: no limit).
    :param ipv6_prefix: IPv6 clients are counted per network of this prefix length.
    :param exempt_trusted: trusted networks (``Policy.trusted_networks``) are not limited.
    """

    log = Logger()

    def __init__(
        self,
        max_connections: int | None = None,
        max_rate: tuple[int, float] | None = None,
        ipv6_prefix: int = 64,
        exempt_trusted: bool = True,
    ) -> None:
        if max_connections is not None and max_connections < 1:
            raise ValueError("max_connections must be 1 or more")
        if max_rate is not None and (max_rate[0] < 1 or max_rate[1] <= 0):
            raise ValueError("max_rate must be (1 or more connections, more than 0 seconds)")
        self.max_connections = max_connections
        self.max_rate = max_rate
        self.ipv6_prefix = ipv6_prefix
        self.exempt_trusted = exempt_trusted
        self.current: dict[str, int] = {}
        self.recent: dict[str, deque[float]] = {}
        self.edge: SmtpEdge | None = None
        self._checks = 0

    def install(self, edge: SmtpEdge) -> None:
        self.edge = edge
        edge.validators.add_check("BANNER", self.check)
        edge.disconnect_hooks.append(self.release)

    def key(self, host: str) -> str:
        ip = client_ip(host)
        if ip is None:
            return host
        if ip.version == 6:
            return str(ipaddress.ip_network(f"{ip}/{self.ipv6_prefix}", strict=False))
        return str(ip)

    def check(self, session: Session, reply: Reply, *extra: Any) -> None:
        edge = self.edge
        assert edge is not None, "install() the policy first"
        host = session.address[0]
        if self.exempt_trusted and edge.policy.is_trusted(host):
            return
        key = self.key(host)
        hostname = edge.policy.hostname
        if self.max_connections is not None and self.current.get(key, 0) >= self.max_connections:
            reply.set("421", f"{hostname} Too many connections from {host}", "4.7.0")
            edge.events.rejected(session, "limits", reply, detail=f"connections from {key}")
            return
        now = edge.reactor.seconds()
        if self.max_rate is not None:
            count, window = self.max_rate
            times = self.recent.setdefault(key, deque())
            while times and times[0] <= now - window:
                times.popleft()
            if len(times) >= count:
                reply.set(
                    "421", f"{hostname} Too many connections from {host}, slow down", "4.7.0"
                )
                edge.events.rejected(session, "limits", reply, detail=f"rate from {key}")
                return
            times.append(now)
            self._sweep(now, window)
        self.current[key] = self.current.get(key, 0) + 1
        session.extra[_COUNTED] = key

    def release(self, session: Session) -> None:
        """The connection has ended (a disconnect hook of the edge)."""
        key = session.extra.pop(_COUNTED, None)
        if key is None:
            return
        left = self.current.get(key, 0) - 1
        if left > 0:
            self.current[key] = left
        else:
            self.current.pop(key, None)

    def _sweep(self, now: float, window: float) -> None:
        """Now and then, forget clients with no connection inside the window."""
        self._checks += 1
        if self._checks % _SWEEP_EVERY:
            return
        for key in [
            k for k, times in self.recent.items() if not times or times[-1] <= now - window
        ]:
            del self.recent[key]

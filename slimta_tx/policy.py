"""Limits and timeouts, as one frozen value checked when it is built."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Any

from slimta_tx.data import BareNewlinePolicy, NulPolicy

__all__ = ["DEFAULT_TRUSTED_NETWORKS", "Network", "Policy", "parse_network"]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

DEFAULT_TRUSTED_NETWORKS: tuple[Network, ...] = (
    ipaddress.ip_network("127.0.0.0/8"),
    ipaddress.ip_network("::1/128"),
)


def parse_network(text: str) -> Network:
    """``"192.0.2.0/24"`` or a single address; raises ValueError with a readable message."""
    try:
        return ipaddress.ip_network(text.strip(), strict=False)
    except ValueError as e:
        raise ValueError(f"not a network in CIDR notation: {text!r}") from e


@dataclass(frozen=True)
class Policy:
    """What the edge allows. Every field has a production-minded default.

    :ivar max_message_size: bytes after unstuffing; 0 means no limit (``SIZE`` advertises 0).
    :ivar max_recipients: RCPT commands accepted per transaction; more get 452 4.5.3.
    :ivar max_command_length: command line limit in bytes, CRLF included (RFC 5321: 512).
    :ivar max_line_length: DATA text line limit, CRLF included (RFC 5321: 1000); 0: none.
    :ivar max_bad_commands: syntax and sequence errors before ``421 4.7.0`` and a close.
    :ivar command_timeout: seconds to wait for each complete command line.
    :ivar data_timeout: seconds of silence allowed while the message body arrives.
    :ivar bare_newline: ``"reject"`` (550 5.5.2 after the end of data) or ``"normalize"``.
    :ivar trusted_networks: clients here may relay to any domain.
    :ivar accepted_domains: recipient domains accepted from anyone (exact or ``.suffix``).
    :ivar chunking: offer CHUNKING (RFC 3030 BDAT).
    :ivar shutdown_grace: seconds a session may finish its transaction when the edge closes.
    :ivar trusted_proxies: peers whose PROXY protocol headers are believed, on listeners that
        expect one (:mod:`slimta_tx.proxy`); connections from anywhere else are closed.
    :ivar proxy_timeout: seconds a connection may take to send its PROXY header.
    :ivar forbid_improper_pipelining: refuse (554 5.5.0) and disconnect an untrusted,
        unauthenticated client that sends ahead where RFC 2920 says wait
        (:mod:`slimta_tx.pipelining`).
    :ivar dsn: offer DSN (RFC 3461): ``RET``, ``ENVID``, ``NOTIFY``, ``ORCPT`` are recorded.
    :ivar requiretls: offer REQUIRETLS (RFC 8689) on TLS sessions.
    :ivar binarymime: offer BINARYMIME (RFC 3030; with CHUNKING only).
    :ivar nul: NUL octets in a text body: ``"reject"`` (550 5.6.0 after the end of data),
        ``"strip"`` or ``"accept"``.
    :ivar data_deadline: seconds a whole message body (DATA, or BDAT's chunks) may take; 0: none.
    :ivar min_data_rate: bytes per second a body must average once ``data_rate_grace`` seconds
        have passed; 0: no minimum (see :mod:`slimta_tx.deadlines`).
    :ivar data_rate_grace: seconds of a body transfer before ``min_data_rate`` applies.
    :ivar session_deadline: seconds a connection may last; 0: no limit. A transaction under way
        may finish first (within ``data_deadline``).
    """

    hostname: str = "localhost"
    max_message_size: int = 25 * 1024 * 1024
    max_recipients: int = 100
    max_command_length: int = 512
    max_line_length: int = 1000
    max_bad_commands: int = 20
    command_timeout: float = 300.0
    data_timeout: float = 300.0
    bare_newline: BareNewlinePolicy = BareNewlinePolicy.REJECT
    trusted_networks: tuple[Network, ...] = DEFAULT_TRUSTED_NETWORKS
    accepted_domains: tuple[str, ...] = ()
    smtputf8: bool = True
    chunking: bool = True
    spool_directory: str | None = None
    spool_memory_limit: int = 256 * 1024
    shutdown_grace: float = 30.0
    trusted_proxies: tuple[Network, ...] = DEFAULT_TRUSTED_NETWORKS
    proxy_timeout: float = 10.0
    # ESMTP features of issue 17 (slimta_tx/pipelining.py, ...).
    forbid_improper_pipelining: bool = True
    dsn: bool = True
    requiretls: bool = True
    binarymime: bool = True
    nul: NulPolicy = NulPolicy.REJECT
    data_deadline: float = 600.0
    min_data_rate: int = 500
    data_rate_grace: float = 30.0
    session_deadline: float = 3600.0
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        for name in ("max_message_size", "max_line_length"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be 0 or more")
        for name in ("max_recipients", "max_bad_commands"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be 1 or more")
        if self.max_command_length < 512:
            raise ValueError("max_command_length must be at least 512 (RFC 5321 4.5.3.1.4)")
        if self.max_line_length and self.max_line_length < 1000:
            raise ValueError("max_line_length must be 0 or at least 1000 (RFC 5321 4.5.3.1.6)")
        for name in ("command_timeout", "data_timeout", "shutdown_grace", "proxy_timeout"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be more than 0 seconds")
        for name in ("data_deadline", "min_data_rate", "data_rate_grace", "session_deadline"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be 0 (no limit) or more")
        object.__setattr__(self, "bare_newline", BareNewlinePolicy(self.bare_newline))
        object.__setattr__(self, "nul", NulPolicy(self.nul))
        object.__setattr__(
            self,
            "trusted_networks",
            tuple(
                n if not isinstance(n, str) else parse_network(n) for n in self.trusted_networks
            ),
        )
        object.__setattr__(
            self,
            "trusted_proxies",
            tuple(n if not isinstance(n, str) else parse_network(n) for n in self.trusted_proxies),
        )
        object.__setattr__(
            self,
            "accepted_domains",
            tuple(d.strip().lower().rstrip(".") for d in self.accepted_domains),
        )

    def evolve(self, **changes: Any) -> Policy:
        """A copy with ``changes`` applied (and validated)."""
        return replace(self, **changes)

    def is_trusted(self, host: str) -> bool:
        # Remembered per policy (asked once a session): the shared cache below hashes the
        # tuple of networks, a Python-level __hash__ per network, on every lookup.
        known: dict[str, bool] | None = self.__dict__.get("_trusted_hosts")
        if known is None:
            known = {}
            object.__setattr__(self, "_trusted_hosts", known)  # frozen: not a field
        trusted = known.get(host)
        if trusted is None:
            if len(known) >= _TRUST_KEPT:
                known.clear()
            trusted = known[host] = _is_trusted(self.trusted_networks, host)
        return trusted

    def is_trusted_proxy(self, host: str) -> bool:
        """May ``host`` send PROXY protocol headers (name the client it relays)?"""
        return _is_trusted(self.trusted_proxies, host)

    def is_accepted_domain(self, domain: str) -> bool:
        """Exact match, or a ``.example.com`` entry matching any subdomain."""
        domain = domain.lower().rstrip(".")
        for accepted in self.accepted_domains:
            if accepted.startswith("."):
                if domain.endswith(accepted):
                    return True
            elif domain == accepted:
                return True
        return False


_TRUST_KEPT = 4096  # hosts remembered per policy (emptied when full)


@lru_cache(maxsize=4096)
def _is_trusted(trusted_networks: tuple[Network, ...], host: str) -> bool:
    """Cached: an edge asks this for every RCPT of every client."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip.version == net.version and ip in net for net in trusted_networks)

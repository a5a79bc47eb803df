"""PROXY protocol options of ``twistd slimta`` (see slimta_tx/cli/__init__.py for the contract).

A listener behind HAProxy is named ``haproxy:`` + an endpoint, in ``--listen`` or
``--tls-listen`` (Twisted's syntax); each of its connections must start with a PROXY header
(v1 or v2) from a trusted proxy. ``service.py`` and ``cli/tls.py`` build such listeners with
slimta_tx's own layer (:mod:`slimta_tx.proxy`). These options say who the trusted proxies are
and how long a header may take.
"""

from __future__ import annotations

from typing import Any

from twisted.python import usage

from slimta_tx.cli.coerce import seconds
from slimta_tx.policy import parse_network
from slimta_tx.proxy import ProxyConfigError, proxied_description


class OptionGroup:
    optParameters: list[list[Any]] = [
        [
            "proxy-timeout",
            None,
            None,
            "Seconds a connection to a haproxy: listener may take to send its PROXY header "
            "(default 10)",
            seconds("proxy-timeout"),
        ],
    ]

    def opt_proxy_from(self, cidr: str) -> None:
        """CIDR whose PROXY headers haproxy: listeners accept; others are closed (repeatable;
        default 127.0.0.0/8 and ::1)"""
        try:
            self["proxy-from"].append(parse_network(cidr))  # type: ignore[index]
        except ValueError as e:
            raise usage.UsageError(f"--proxy-from: {e}") from None


def defaults(config: Any) -> None:
    config["proxy-from"] = []


def validate(config: Any) -> None:
    proxied = []
    for option in ("listen", "tls-listen"):
        for description in config.get(option) or ():
            try:
                if proxied_description(description) is not None:
                    proxied.append(description)
            except ProxyConfigError as e:
                raise usage.UsageError(f"--{option} {e}") from None
    asked = [
        option for option in ("proxy-from", "proxy-timeout") if config[option] not in (None, [])
    ]
    if asked and not proxied:
        raise usage.UsageError(
            f"--{asked[0]} only matters with a haproxy: listener (--listen haproxy:tcp:PORT)"
        )
    if "policy" not in config:
        return
    changes: dict[str, Any] = {}
    if config["proxy-from"]:
        changes["trusted_proxies"] = tuple(config["proxy-from"])
    if config["proxy-timeout"] is not None:
        changes["proxy_timeout"] = config["proxy-timeout"]
    if changes:
        config["policy"] = config["policy"].evolve(**changes)


def configure(config: Any, edge: Any, service: Any, reactor: Any) -> None:
    pass  # the listeners are built by EdgeService and the TLS group; the policy holds the rest

"""Policy options of ``twistd slimta``: lists, DNSBL/DNSWL, reverse DNS, limits, early talkers,
and the shutdown grace (see slimta_tx/cli/__init__.py for the contract).

All of them are off by default (the relay rules in the core options always apply). SIGHUP reads
the sender and recipient lists again.
"""

from __future__ import annotations

from typing import Any

from twisted.python import usage

from slimta_tx.cli.coerce import seconds, whole_number
from slimta_tx.policies import (
    AddressList,
    ConnectionLimits,
    DnsblPolicy,
    EarlyTalkerPolicy,
    ListError,
    ListPolicy,
    ReverseDnsPolicy,
)


class OptionGroup:
    optFlags: list[list[Any]] = [
        ["rdns", None, "Look up the client's forward-confirmed reverse DNS name (for Received:)."],
    ]
    optParameters: list[list[Any]] = [
        [
            "dns-timeout",
            None,
            5.0,
            "Seconds each DNSBL/DNSWL/reverse DNS lookup may take",
            seconds("dns-timeout"),
        ],
        [
            "max-connections-per-ip",
            None,
            None,
            "Concurrent connections per client address (IPv6: per /64); more get 421 4.7.0",
            whole_number("max-connections-per-ip", 1),
        ],
        [
            "max-connection-rate",
            None,
            None,
            "N/SECONDS: new connections per client address in any SECONDS; more get 421 4.7.0.",
        ],
        [
            "greeting-delay",
            None,
            None,
            "Wait this many seconds before the greeting; clients that talk first get 554 5.5.1",
            seconds("greeting-delay"),
        ],
        [
            "shutdown-grace",
            None,
            None,
            "Seconds sessions may finish their transaction on shutdown before 421 (default 30)",
            seconds("shutdown-grace"),
        ],
    ]

    def opt_sender_list(self, path: str) -> None:
        """File of sender rules: PATTERN OK|REJECT|reply (repeatable; SIGHUP reloads)"""
        self["sender-list"].append(path)  # type: ignore[index]

    def opt_recipient_list(self, path: str) -> None:
        """File of recipient rules: PATTERN OK|REJECT|reply (repeatable; SIGHUP reloads)"""
        self["recipient-list"].append(path)  # type: ignore[index]

    def opt_dnsbl(self, zone: str) -> None:
        """Refuse clients listed in this DNSBL zone with 554 5.7.1 (repeatable)"""
        self["dnsbl"].append(_zone("dnsbl", zone))  # type: ignore[index]

    def opt_dnswl(self, zone: str) -> None:
        """Clients listed in this DNSWL zone skip the DNSBLs and the greeting delay (repeatable)"""
        self["dnswl"].append(_zone("dnswl", zone))  # type: ignore[index]


def _zone(option: str, zone: str) -> str:
    zone = zone.strip().strip(".").lower()
    if not zone or " " in zone or "." not in zone:
        raise usage.UsageError(f"--{option}: not a DNS zone: {zone!r}")
    return zone


def defaults(config: Any) -> None:
    config["sender-list"] = []
    config["recipient-list"] = []
    config["dnsbl"] = []
    config["dnswl"] = []


def parse_rate(text: str) -> tuple[int, float]:
    """``"30/60"`` -> ``(30, 60.0)``; raises ValueError with a one-line message."""
    count, sep, window = text.partition("/")
    try:
        rate = (int(count), float(window))
    except ValueError:
        rate = (0, 0.0)
    if not sep or rate[0] < 1 or rate[1] <= 0:
        raise ValueError(f"--max-connection-rate takes N/SECONDS, e.g. 30/60, not {text!r}")
    return rate


def validate(config: Any) -> None:
    for option, command in (("sender-list", "MAIL"), ("recipient-list", "RCPT")):
        config[f"{option}-policy"] = None
        if config[option]:
            try:
                addresses = AddressList(config[option])
            except ListError as e:
                raise usage.UsageError(f"--{option}: {e}") from None
            config[f"{option}-policy"] = ListPolicy(addresses, command)
    if config["max-connection-rate"] is not None:
        try:
            config["max-connection-rate"] = parse_rate(str(config["max-connection-rate"]))
        except ValueError as e:
            raise usage.UsageError(str(e)) from None
    if config["dnswl"] and not config["dnsbl"] and config["greeting-delay"] is None:
        raise usage.UsageError("--dnswl only matters with --dnsbl or --greeting-delay")
    if config["shutdown-grace"] is not None and "policy" in config:
        config["policy"] = config["policy"].evolve(shutdown_grace=config["shutdown-grace"])


def make_policies(config: Any) -> list[Any]:
    """The policies the options ask for, in the order their checks should run."""
    made: list[Any] = []
    if config["max-connections-per-ip"] is not None or config["max-connection-rate"]:
        made.append(
            ConnectionLimits(config["max-connections-per-ip"], config["max-connection-rate"])
        )
    if config["dnsbl"] or config["dnswl"]:
        made.append(DnsblPolicy(config["dnsbl"], config["dnswl"], timeout=config["dns-timeout"]))
    if config["rdns"]:
        made.append(ReverseDnsPolicy(timeout=config["dns-timeout"]))
    if config["greeting-delay"] is not None:
        made.append(EarlyTalkerPolicy(config["greeting-delay"]))
    for option in ("sender-list", "recipient-list"):
        if config.get(f"{option}-policy") is not None:
            made.append(config[f"{option}-policy"])
    return made


def configure(config: Any, edge: Any, service: Any, reactor: Any) -> None:
    lists = []
    for policy in make_policies(config):
        policy.install(edge)
        if isinstance(policy, ListPolicy):
            lists.append(policy.addresses)
    if lists:
        service.on_reload(lambda: [addresses.reload() for addresses in lists])

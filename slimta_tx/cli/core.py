"""Core options: listeners, names, limits, timeouts, relay rules."""

from __future__ import annotations

import os
import socket
from typing import Any

from twisted.python import usage

from slimta_tx.cli.coerce import seconds, whole_number
from slimta_tx.cli.startup import check_listener
from slimta_tx.data import BareNewlinePolicy
from slimta_tx.policy import DEFAULT_TRUSTED_NETWORKS, Network, Policy, parse_network

DEFAULT_LISTEN = "tcp:2525:interface=127.0.0.1"


class OptionGroup:
    optParameters: list[list[Any]] = [
        ["hostname", None, None, "Name in the banner, replies and Received: (default: FQDN)."],
        ["banner", None, None, "Banner text after 220 (default: '<hostname> ESMTP slimta_tx')."],
        [
            "max-size",
            None,
            25 * 1024 * 1024,
            "Largest message in bytes; 0 = no limit.",
            whole_number("max-size", 0),
        ],
        [
            "max-recipients",
            None,
            100,
            "Recipients per message.",
            whole_number("max-recipients", 1),
        ],
        [
            "max-bad-commands",
            None,
            20,
            "Protocol errors before 421 and close.",
            whole_number("max-bad-commands", 1),
        ],
        [
            "timeout",
            None,
            300.0,
            "Seconds to wait for each command (idle limit).",
            seconds("timeout"),
        ],
        [
            "data-timeout",
            None,
            300.0,
            "Seconds of silence allowed during DATA.",
            seconds("data-timeout"),
        ],
        [
            "bare-newline",
            None,
            "reject",
            "Bare CR/LF in DATA: 'reject' (550 5.5.2) or 'normalize' (Postfix's LF->CRLF).",
        ],
        [
            "spool-dir",
            None,
            None,
            "Directory for message bodies over 256 KiB while they "
            "arrive (default: the system temporary directory).",
        ],
    ]

    def opt_listen(self, description: str) -> None:
        """Listen on a Twisted endpoint, e.g. tcp:25 (repeatable; default: loopback 2525)"""
        self["listen"].append(description)  # type: ignore[index]

    def opt_trusted_network(self, cidr: str) -> None:
        """CIDR allowed to relay (repeatable; replaces 127.0.0.0/8 and ::1/128)"""
        try:
            self["trusted-network"].append(parse_network(cidr))  # type: ignore[index]
        except ValueError as e:
            raise usage.UsageError(f"--trusted-network: {e}") from None

    def opt_accept_domain(self, domain: str) -> None:
        """Accept mail for this domain (repeatable; '.example.com': any subdomain)"""
        domain = domain.strip().lower()
        if not domain or " " in domain:
            raise usage.UsageError(f"--accept-domain: not a domain: {domain!r}")
        self["accept-domain"].append(domain)  # type: ignore[index]


def defaults(config: Any) -> None:
    config["listen"] = []
    config["trusted-network"] = []
    config["accept-domain"] = []


def validate(config: Any) -> None:
    if not config["listen"]:
        config["listen"] = [DEFAULT_LISTEN]
    for description in config["listen"]:
        check_listener("listen", description)
    try:
        bare_newline = BareNewlinePolicy(config["bare-newline"])
    except ValueError:
        raise usage.UsageError("--bare-newline must be 'reject' or 'normalize'") from None
    if not config["hostname"]:
        config["hostname"] = socket.getfqdn()
    if config["spool-dir"] and not os.path.isdir(config["spool-dir"]):
        raise usage.UsageError(f"--spool-dir: no such directory: {config['spool-dir']}")
    networks: list[Network] = config["trusted-network"] or list(DEFAULT_TRUSTED_NETWORKS)
    try:
        config["policy"] = Policy(
            hostname=config["hostname"],
            max_message_size=config["max-size"],
            max_recipients=config["max-recipients"],
            max_bad_commands=config["max-bad-commands"],
            command_timeout=config["timeout"],
            data_timeout=config["data-timeout"],
            bare_newline=bare_newline,
            trusted_networks=tuple(networks),
            accepted_domains=tuple(config["accept-domain"]),
            spool_directory=config["spool-dir"],
        )
    except ValueError as e:
        raise usage.UsageError(str(e)) from None


def configure(config: Any, edge: Any, service: Any, reactor: Any) -> None:
    # With twistd -n, a port in use is one line and exit 1; a daemonizing twistd reports
    # start-up errors through its parent process itself.
    parent = getattr(config, "parent", None)
    service.exit_on_listen_error = parent is not None and bool(parent.get("nodaemon"))
    if config["banner"]:
        edge.set_banner_message("220", config["banner"])

"""``twistd slimta``: Options only parse and validate; :func:`makeService` builds."""

from __future__ import annotations

import os
import socket
from typing import Any

from twisted.application.service import IService
from twisted.python import usage

from slimta_tx.data import BareNewlinePolicy
from slimta_tx.policy import DEFAULT_TRUSTED_NETWORKS, Network, Policy, parse_network

__all__ = ["Options", "makeService"]

DEFAULT_LISTEN = "tcp:2525:interface=127.0.0.1"


def _positive_int(name: str, minimum: int = 0) -> Any:
    def coerce(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise ValueError(f"--{name} takes a whole number, not {value!r}") from None
        if number < minimum:
            raise ValueError(f"--{name} must be at least {minimum}")
        return number

    coerce.coerceDoc = f"(a whole number >= {minimum})"  # type: ignore[attr-defined]
    return coerce


def _seconds(name: str) -> Any:
    def coerce(value: str) -> float:
        try:
            number = float(value)
        except ValueError:
            raise ValueError(f"--{name} takes a number of seconds, not {value!r}") from None
        if number <= 0:
            raise ValueError(f"--{name} must be more than 0")
        return number

    return coerce


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "Run an ESMTP edge listener. Accepted mail goes to a Maildir (--maildir) unless "
        "another bus is chosen. Every option has a safe default: listen on 127.0.0.1:2525, "
        "relay only for 127.0.0.0/8 and ::1, reject bare CR/LF."
    )

    optParameters = [
        ["hostname", None, None, "Name in the banner, replies and Received: (default: FQDN)."],
        ["banner", None, None, "Banner text after 220 (default: '<hostname> ESMTP slimta_tx')."],
        ["maildir", None, "./var/maildir", "Store accepted mail in this Maildir."],
        [
            "max-size",
            None,
            25 * 1024 * 1024,
            "Largest message in bytes; 0 = no limit.",
            _positive_int("max-size", 0),
        ],
        [
            "max-recipients",
            None,
            100,
            "Recipients per message.",
            _positive_int("max-recipients", 1),
        ],
        [
            "max-bad-commands",
            None,
            20,
            "Protocol errors before 421 and close.",
            _positive_int("max-bad-commands", 1),
        ],
        [
            "timeout",
            None,
            300.0,
            "Seconds to wait for each command (idle limit).",
            _seconds("timeout"),
        ],
        [
            "data-timeout",
            None,
            300.0,
            "Seconds of silence allowed during DATA.",
            _seconds("data-timeout"),
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

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []
        self["trusted-network"] = []
        self["accept-domain"] = []

    _failed = False

    def parseOptions(self, options: Any = None) -> None:
        try:
            super().parseOptions(options)
        except usage.UsageError as e:
            # twistd prints our usage and then the error; a failed parse shows only the error.
            self._failed = True
            raise usage.UsageError(f"{e} (see 'twistd slimta --help')") from None

    def getUsage(self, width: int | None = None) -> str:
        return "" if self._failed else super().getUsage(width)

    def opt_listen(self, description: str) -> None:
        """Listen on a Twisted server endpoint, e.g. tcp:25 or tcp:2525:interface=::1
        (repeatable; default tcp:2525:interface=127.0.0.1)."""
        self["listen"].append(description)

    def opt_trusted_network(self, cidr: str) -> None:
        """Clients in this network may relay anywhere (repeatable; default 127.0.0.0/8 and
        ::1/128; giving any replaces the default)."""
        try:
            self["trusted-network"].append(parse_network(cidr))
        except ValueError as e:
            raise usage.UsageError(f"--trusted-network: {e}") from None

    def opt_accept_domain(self, domain: str) -> None:
        """Accept mail for this domain from anyone (repeatable; '.example.com' matches
        subdomains)."""
        domain = domain.strip().lower()
        if not domain or " " in domain:
            raise usage.UsageError(f"--accept-domain: not a domain: {domain!r}")
        self["accept-domain"].append(domain)

    def postOptions(self) -> None:
        if not self["listen"]:
            self["listen"] = [DEFAULT_LISTEN]
        try:
            BareNewlinePolicy(self["bare-newline"])
        except ValueError:
            raise usage.UsageError("--bare-newline must be 'reject' or 'normalize'") from None
        if not self["hostname"]:
            self["hostname"] = socket.getfqdn()
        networks: list[Network] = self["trusted-network"] or list(DEFAULT_TRUSTED_NETWORKS)
        try:
            self["policy"] = Policy(
                hostname=self["hostname"],
                max_message_size=self["max-size"],
                max_recipients=self["max-recipients"],
                max_bad_commands=self["max-bad-commands"],
                command_timeout=self["timeout"],
                data_timeout=self["data-timeout"],
                bare_newline=BareNewlinePolicy(self["bare-newline"]),
                trusted_networks=tuple(networks),
                accepted_domains=tuple(self["accept-domain"]),
                spool_directory=self["spool-dir"],
            )
        except ValueError as e:
            raise usage.UsageError(str(e)) from None
        if self["spool-dir"] and not os.path.isdir(self["spool-dir"]):
            raise usage.UsageError(f"--spool-dir: no such directory: {self['spool-dir']}")


def makeService(config: Options, reactor: Any = None) -> IService:
    from slimta_tx.bus.maildir import MaildirBus
    from slimta_tx.factory import SmtpEdge
    from slimta_tx.service import EdgeService

    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    bus = MaildirBus(config["maildir"], reactor=reactor)
    edge = SmtpEdge(bus, config["policy"], reactor=reactor)
    if config["banner"]:
        edge.set_banner_message("220", config["banner"])
    return EdgeService(edge, config["listen"], reactor=reactor)

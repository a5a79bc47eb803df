"""LMTP listeners of ``twistd slimta`` (RFC 2033; see slimta_tx/lmtp.py).

``--lmtp-listen ENDPOINT`` (repeatable) serves LMTP on any Twisted endpoint (``tcp:24``,
``unix:/run/slimta/lmtp``) with the same policy, validators, TLS, AUTH and bus as the SMTP
listeners of ``--listen``, which keep running beside them.
"""

from __future__ import annotations

from typing import Any

from twisted.python import usage


class OptionGroup:
    def opt_lmtp_listen(self, description: str) -> None:
        """Serve LMTP (RFC 2033) on this Twisted endpoint, e.g. tcp:24 (repeatable)"""
        if not description.strip():
            raise usage.UsageError("--lmtp-listen needs an endpoint, e.g. tcp:24")
        self["lmtp-listen"].append(description)  # type: ignore[index]


def defaults(config: Any) -> None:
    config["lmtp-listen"] = []


def validate(config: Any) -> None:
    from slimta_tx.cli.startup import check_listener

    for description in config["lmtp-listen"]:
        check_listener("lmtp-listen", description)


def configure(config: Any, edge: Any, service: Any, reactor: Any) -> None:
    from slimta_tx.lmtp import LmtpFactory
    from slimta_tx.proxy import listener_service

    for description in config["lmtp-listen"]:
        # As --listen: a large backlog, and haproxy:... behind slimta_tx's PROXY layer.
        factory = LmtpFactory(edge)
        listener_service(description, edge, reactor, factory).setServiceParent(service)

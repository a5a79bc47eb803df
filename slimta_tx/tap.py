"""``twistd slimta``: :class:`Options` only parse and validate; :func:`makeService` builds.

The options come from the groups in :mod:`slimta_tx.cli`, one module per feature.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import IService
from twisted.python import usage

from slimta_tx.cli import (
    auth,
    buses,
    core,
    esmtp,
    limits,
    lmtp,
    logs,
    metrics,
    milter,
    policies,
    proxy,
    tls,
    workers,
)

__all__ = ["Options", "makeService"]

GROUPS = (
    core,
    tls,
    auth,
    policies,
    limits,
    milter,
    buses,
    esmtp,
    lmtp,
    logs,
    proxy,
    metrics,
    workers,
)


class Options(
    core.OptionGroup,
    tls.OptionGroup,
    auth.OptionGroup,
    policies.OptionGroup,
    limits.OptionGroup,
    milter.OptionGroup,
    buses.OptionGroup,
    esmtp.OptionGroup,
    lmtp.OptionGroup,
    logs.OptionGroup,
    proxy.OptionGroup,
    metrics.OptionGroup,
    workers.OptionGroup,
    usage.Options,
):
    synopsis = "[options]"
    longdesc = (
        "Run an ESMTP edge listener. Accepted mail goes to a Maildir (--maildir) unless "
        "another bus is chosen. Every option has a safe default: listen on 127.0.0.1:2525, "
        "relay only for 127.0.0.0/8 and ::1, reject bare CR/LF."
    )
    _failed = False

    def __init__(self) -> None:
        super().__init__()
        for group in GROUPS:
            group.defaults(self)

    def parseOptions(self, options: Any = None) -> None:
        try:
            super().parseOptions(options)
        except usage.UsageError as e:
            message = str(e).removeprefix("Parameter type enforcement failed: ")
            message = f"{message} (see 'twistd slimta --help')"
            if self.parent is not None:
                # Under twistd, which would print its own usage line first: exactly one line
                # on stderr, exit status 1.
                raise SystemExit(f"twistd slimta: {message}") from None
            self._failed = True
            raise usage.UsageError(message) from None

    def getUsage(self, width: int | None = None) -> str:
        return "" if self._failed else super().getUsage(width)

    def postOptions(self) -> None:
        for group in GROUPS:
            group.validate(self)


def makeService(config: Options, reactor: Any = None) -> IService:
    from slimta_tx.factory import SmtpEdge
    from slimta_tx.service import EdgeService

    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    if workers.wanted(config):
        from slimta_tx.workers import make_service

        return make_service(config, reactor)
    bus = buses.make_bus(config, reactor)
    edge = SmtpEdge(bus, config["policy"], reactor=reactor)
    service = EdgeService(edge, config["listen"], reactor=reactor)
    for group in GROUPS:
        group.configure(config, edge, service, reactor)
    return service

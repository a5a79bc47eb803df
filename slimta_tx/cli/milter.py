"""Milter options: ``--milter SPEC`` (repeatable; applied in the order given).

SPEC is Postfix's syntax for one milter (see :mod:`slimta_tx.milter.config` and
docs/filtering.md)::

    --milter inet:127.0.0.1:11332
    --milter 'unix:/run/opendkim/opendkim.sock,default_action=accept,command_timeout=10s'
    --milter '{ inet:[::1]:8893, connect_timeout=5s, max_connections=50 }'
"""

from __future__ import annotations

from typing import Any

from twisted.python import usage

from slimta_tx.milter.config import parse_milter


class OptionGroup:
    def opt_milter(self, spec: str) -> None:
        """Filter with this milter: inet:HOST:PORT or unix:PATH, then ,NAME=VALUE settings
        (connect_timeout, command_timeout, content_timeout, default_action=
        tempfail|accept|reject, max_connections, name); repeatable, applied in order"""
        try:
            self["milter"].append(parse_milter(spec))  # type: ignore[index]
        except ValueError as e:
            raise usage.UsageError(f"--milter: {e}") from None


def defaults(config: Any) -> None:
    config["milter"] = []


def validate(config: Any) -> None:
    names = [milter.name for milter in config["milter"]]
    for name in names:
        if names.count(name) > 1:
            raise usage.UsageError(f"--milter: {name} is given twice (add name=... to tell apart)")


def configure(config: Any, edge: Any, service: Any, reactor: Any) -> None:
    edge.milters.milters.extend(config["milter"])

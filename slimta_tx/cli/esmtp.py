"""ESMTP protocol options of ``twistd slimta`` (issue 17): pipelining discipline.

They change the :class:`~slimta_tx.policy.Policy` the core group built (see
slimta_tx/cli/__init__.py for the contract).
"""

from __future__ import annotations

from typing import Any

from twisted.python import usage


class OptionGroup:
    optFlags: list[list[Any]] = [
        [
            "allow-improper-pipelining",
            None,
            "Do not refuse (554 5.5.0) untrusted clients that send ahead of a reply RFC 2920 "
            "says to wait for.",
        ],
    ]


def defaults(config: Any) -> None:
    pass


def validate(config: Any) -> None:
    try:
        config["policy"] = config["policy"].evolve(
            forbid_improper_pipelining=not config["allow-improper-pipelining"],
        )
    except ValueError as e:
        raise usage.UsageError(str(e)) from None


def configure(config: Any, edge: Any, service: Any, reactor: Any) -> None:
    pass

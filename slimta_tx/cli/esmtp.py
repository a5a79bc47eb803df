"""ESMTP protocol options of ``twistd slimta`` (issue 17): pipelining discipline, NUL octets,
and switches for DSN, REQUIRETLS and BINARYMIME (all offered by default).

They change the :class:`~slimta_tx.policy.Policy` the core group built (see
slimta_tx/cli/__init__.py for the contract).
"""

from __future__ import annotations

from typing import Any

from twisted.python import usage

from slimta_tx.data import NulPolicy


class OptionGroup:
    optFlags: list[list[Any]] = [
        [
            "allow-improper-pipelining",
            None,
            "Do not refuse (554 5.5.0) untrusted clients that send ahead of a reply RFC 2920 "
            "says to wait for.",
        ],
        ["no-dsn", None, "Do not offer DSN (RFC 3461)."],
        ["no-requiretls", None, "Do not offer REQUIRETLS (RFC 8689) on TLS sessions."],
        ["no-binarymime", None, "Do not offer BINARYMIME (RFC 3030)."],
    ]
    optParameters: list[list[Any]] = [
        [
            "nul",
            None,
            "reject",
            "NUL octets in a text body: 'reject' (550 5.6.0), 'strip' or 'accept'.",
        ],
    ]


def defaults(config: Any) -> None:
    pass


def validate(config: Any) -> None:
    try:
        nul = NulPolicy(config["nul"])
    except ValueError:
        raise usage.UsageError("--nul must be 'reject', 'strip' or 'accept'") from None
    config["policy"] = config["policy"].evolve(
        forbid_improper_pipelining=not config["allow-improper-pipelining"],
        dsn=not config["no-dsn"],
        requiretls=not config["no-requiretls"],
        binarymime=not config["no-binarymime"],
        nul=nul,
    )


def configure(config: Any, edge: Any, service: Any, reactor: Any) -> None:
    pass

"""Bus options: where accepted mail goes (the embedded Maildir by default)."""

from __future__ import annotations

from typing import Any

from slimta_tx.interfaces import IBus


class OptionGroup:
    optParameters: list[list[Any]] = [
        ["maildir", None, "./var/maildir", "Store accepted mail in this Maildir."],
    ]


def defaults(config: Any) -> None:
    pass


def validate(config: Any) -> None:
    pass


def make_bus(config: Any, reactor: Any) -> IBus:
    from slimta_tx.bus.maildir import MaildirBus

    return MaildirBus(config["maildir"], reactor=reactor)


def configure(config: Any, edge: Any, service: Any, reactor: Any) -> None:
    pass

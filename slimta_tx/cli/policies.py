"""policies options of ``twistd slimta`` (see slimta_tx/cli/__init__.py for the contract)."""

from __future__ import annotations

from typing import Any


class OptionGroup:
    optParameters: list[list[Any]] = []


def defaults(config: Any) -> None:
    pass


def validate(config: Any) -> None:
    pass


def configure(config: Any, edge: Any, service: Any, reactor: Any) -> None:
    pass

"""Value coercers for option groups: each raises ValueError with a one-line message."""

from __future__ import annotations

from collections.abc import Callable


def whole_number(name: str, minimum: int = 0) -> Callable[[str], int]:
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


def seconds(name: str) -> Callable[[str], float]:
    def coerce(value: str) -> float:
        try:
            number = float(value)
        except ValueError:
            raise ValueError(f"--{name} takes a number of seconds, not {value!r}") from None
        if number <= 0:
            raise ValueError(f"--{name} must be more than 0")
        return number

    coerce.coerceDoc = "(seconds)"  # type: ignore[attr-defined]
    return coerce

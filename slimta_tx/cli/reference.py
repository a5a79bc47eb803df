"""What ``twistd slimta`` accepts, read from the option groups themselves.

The options reference and the man page are generated from this (``docs/_ext/slimta_docs.py``),
so they list exactly the options ``slimta_tx.tap.Options`` parses: a group added to
``tap.GROUPS`` appears in them with no edit to the docs.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Iterable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

__all__ = ["OptionDoc", "OptionGroupDoc", "option_groups"]


@dataclass(frozen=True)
class OptionDoc:
    """One command-line option: ``--name`` or ``--name=VALUE``."""

    name: str
    #: ``None`` for a flag, else a placeholder such as ``N``, ``SECONDS`` or ``PATH``.
    value: str | None
    help: str
    #: The default as ``--help`` would show it, or None when there is none worth showing.
    default: str | None = None
    short: str | None = None

    @property
    def signature(self) -> str:
        return f"--{self.name}" if self.value is None else f"--{self.name}={self.value}"


@dataclass(frozen=True)
class OptionGroupDoc:
    """The options of one module of :mod:`slimta_tx.cli`."""

    module: str
    #: A short heading, e.g. "Core options" (the module docstring up to its first colon).
    title: str
    #: The rest of the docstring's first sentence ("listeners, names, limits, ..."), or "".
    intro: str
    options: tuple[OptionDoc, ...]


def _title_and_intro(module: ModuleType) -> tuple[str, str]:
    doc = inspect.getdoc(module) or module.__name__
    first = " ".join(doc.split("\n\n")[0].split()).replace("``", "")
    first = re.sub(r"\s*\(see [^)]*\.py\b[^)]*\)", "", first)  # pointers for developers
    head, colon, rest = first.partition(":")
    if not colon:
        head, rest = first.partition("(")[0], ""
    head = head.strip().rstrip(".").removesuffix(" of twistd slimta").strip()
    rest = rest.strip()
    return head, _sentence(rest[:1].upper() + rest[1:]) if rest else ""


def _placeholder(coerce: Any) -> str:
    doc = getattr(coerce, "coerceDoc", "") or ""
    if "second" in doc:
        return "SECONDS"
    if "number" in doc:
        return "N"
    return "VALUE"


def _default(value: Any) -> str | None:
    if value is None or value == "":
        return None
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _sentence(text: str) -> str:
    text = " ".join((text or "").split())
    if text and text[-1] not in ".!?":
        text += "."
    return text


def _group_options(group_class: type) -> list[OptionDoc]:
    own = vars(group_class)
    found: dict[str, OptionDoc] = {}
    for entry in own.get("optParameters", []):
        name, short, default, help_text = [*entry, None, None, None, ""][:4]
        coerce = entry[4] if len(entry) > 4 else None
        found[name] = OptionDoc(
            name, _placeholder(coerce), _sentence(help_text), _default(default), short
        )
    for entry in own.get("optFlags", []):
        name, short, help_text = [*entry, None, None, ""][:3]
        found[name] = OptionDoc(name, None, _sentence(help_text), None, short)
    methods: dict[object, str] = {}
    for attribute, method in own.items():
        if not attribute.startswith("opt_") or not callable(method):
            continue
        name = attribute[4:].replace("_", "-")
        if method in methods:  # opt_b = opt_a: an alias
            alias_of = found[methods[method]]
            found[alias_of.name] = OptionDoc(
                alias_of.name,
                alias_of.value,
                f"{alias_of.help} Also --{name}.",
                alias_of.default,
                alias_of.short,
            )
            continue
        methods[method] = name
        parameters = list(inspect.signature(method).parameters.values())[1:]
        value = parameters[0].name.upper().replace("DESCRIPTION", "DESC") if parameters else None
        found[name] = OptionDoc(name, value, _sentence(inspect.getdoc(method) or ""))
    return sorted(found.values(), key=lambda option: option.name)


def option_groups(groups: Iterable[ModuleType] | None = None) -> list[OptionGroupDoc]:
    """The options of each group of ``twistd slimta`` (``slimta_tx.tap.GROUPS`` by default)."""
    if groups is None:
        from slimta_tx.tap import GROUPS

        groups = GROUPS
    result = []
    for module in groups:
        title, intro = _title_and_intro(module)
        options = _group_options(module.OptionGroup)
        result.append(OptionGroupDoc(module.__name__, title, intro, tuple(options)))
    return result

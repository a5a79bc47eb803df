#!/usr/bin/env python3
"""Print a pip constraints file that pins every dependency to its declared lower bound.

Reads ``[build-system] requires``, ``[project] dependencies`` and every
``[project.optional-dependencies]`` list of pyproject.toml and prints ``name==X`` for each
``name>=X`` (``make test-lowest`` installs with it, so CI tests the oldest versions we claim to
support). A requirement without a lower bound is an error: a bound that is never tested is a
guess. Pins are exact on purpose: when two
declared floors cannot be installed together, pip refuses, instead of quietly testing a newer
version than the one declared.

Usage: ``python .ci/lowest_constraints.py [pyproject.toml] > constraints.txt``; with
``--extras``, print the names of all extras instead (``test,bench,...``: what to install).
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    sys.exit(".ci/lowest_constraints.py needs Python 3.11 or later (tomllib)")

# name, [extras], version specifiers, ; marker (PEP 508, without URLs: we use none)
REQUIREMENT = re.compile(
    r"^\s*(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*"
    r"(?P<specifiers>[^;]*?)\s*(?:;\s*(?P<marker>.+?))?\s*$"
)
LOWER_BOUND = re.compile(r"^(?:>=|==|~=)\s*(?P<version>[0-9][^\s,]*)$")


class NoLowerBound(ValueError):
    """A requirement that declares no ``>=``, ``~=`` or ``==`` version."""


def canonical(name: str) -> str:
    """The normalized project name (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def lowest(requirement: str) -> tuple[str, str, str | None]:
    """``(name, lowest version, marker)`` of one requirement string."""
    match = REQUIREMENT.match(requirement)
    if match is None:
        raise ValueError(f"cannot parse requirement {requirement!r}")
    floors = []
    for specifier in match["specifiers"].split(","):
        bound = LOWER_BOUND.match(specifier.strip())
        if bound is not None:
            floors.append(bound["version"])
    if len(floors) != 1:
        raise NoLowerBound(
            f"{requirement!r}: give exactly one lower bound (>=, ~= or ==) so that "
            "'make test-lowest' can test it"
        )
    return canonical(match["name"]), floors[0], match["marker"]


def constraints(pyproject: dict[str, object]) -> list[str]:
    """The constraint lines for a parsed pyproject.toml."""
    build = pyproject.get("build-system", {})
    project = pyproject.get("project", {})
    assert isinstance(build, dict) and isinstance(project, dict)
    requirements: list[str] = list(_strings(build.get("requires", [])))
    requirements.extend(_strings(project.get("dependencies", [])))
    extras = project.get("optional-dependencies", {})
    assert isinstance(extras, dict)
    for group in extras.values():
        requirements.extend(_strings(group))
    pins: dict[tuple[str, str | None], str] = {}
    for requirement in requirements:
        name, version, marker = lowest(requirement)
        previous = pins.setdefault((name, marker), version)
        if previous != version:
            raise ValueError(f"{name} has two lower bounds: {previous} and {version}")
    lines = []
    for (name, marker), version in sorted(pins.items(), key=lambda item: item[0][0]):
        lines.append(f"{name}=={version}" + (f"; {marker}" if marker else ""))
    return lines


def _strings(value: object) -> Iterable[str]:
    assert isinstance(value, list)
    for item in value:
        assert isinstance(item, str)
        yield item


def main(argv: list[str]) -> int:
    args = argv[1:]
    extras_only = "--extras" in args
    args = [arg for arg in args if arg != "--extras"]
    path = args[0] if args else "pyproject.toml"
    with open(path, "rb") as f:
        pyproject = tomllib.load(f)
    if extras_only:  # what to install: every extra, so that every floor is used
        print(",".join(sorted(pyproject["project"].get("optional-dependencies", {}))))
        return 0
    try:
        lines = constraints(pyproject)
    except ValueError as e:
        print(f"{path}: {e}", file=sys.stderr)
        return 1
    print(f"# The declared lower bounds of {path} (made by .ci/lowest_constraints.py).")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

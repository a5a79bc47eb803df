"""The one list of public modules and names (docs/architecture.md, "Public API and internal
modules") is true: every name it lists exists, and the code users copy from the docs, the
README and examples/ imports nothing else from slimta_tx."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SECTION = "## Public API and internal modules"
ROW = re.compile(r"^\|\s*`(?P<module>slimta_tx[\w.]*)`\s*\|(?P<names>.*)\|\s*$")
FENCE = re.compile(r"^```(?:python|py)\s*$(?P<code>.*?)^```\s*$", re.MULTILINE | re.DOTALL)


def public_names() -> dict[str, set[str]]:
    """module -> public names, read from the table in docs/architecture.md."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    assert SECTION in text, f"docs/architecture.md has no {SECTION!r} section"
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    table: dict[str, set[str]] = {}
    for line in section.splitlines():
        row = ROW.match(line)
        if row is None:
            continue
        names = set(re.findall(r"`([^`]+)`", row["names"]))
        if "__all__" in names:
            names.discard("__all__")
            names.update(importlib.import_module(row["module"]).__all__)
        names.discard("tests/test_public_api.py")
        table[row["module"]] = names
    return table


def imports_in(code: str) -> list[tuple[str, str]]:
    """``(module, name)`` for every ``from slimta_tx... import name`` in ``code``."""
    found: list[tuple[str, str]] = []
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("slimta_tx"):
            assert node.module is not None
            found.extend((node.module, alias.name) for alias in node.names)
    return found


def user_code() -> dict[str, str]:
    """The Python users are shown: fenced python blocks of the Markdown pages, examples/."""
    sources: dict[str, str] = {}
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]:
        for number, block in enumerate(FENCE.finditer(page.read_text()), 1):
            sources[f"{page.relative_to(ROOT)} (python block {number})"] = block["code"]
    for example in sorted((ROOT / "examples").glob("*.py")):
        sources[str(example.relative_to(ROOT))] = example.read_text()
    return sources


def test_every_listed_name_exists() -> None:
    """A name in the table that no longer exists is a broken promise."""
    table = public_names()
    assert "slimta_tx" in table and "slimta_tx.bus" in table
    for module, names in table.items():
        imported = importlib.import_module(module)
        missing = sorted(name for name in names if not hasattr(imported, name))
        assert not missing, f"{module} lacks the public names {missing}"


def test_docs_and_examples_import_only_public_names() -> None:
    """What the docs show is what users will import: it must be in the table (or the table
    must grow, deliberately)."""
    table = public_names()
    sources = user_code()
    assert len(sources) > 10  # the pages and examples were found
    private: list[str] = []
    for where, code in sources.items():
        try:
            found = imports_in(code)
        except SyntaxError:  # a fragment, not a program: nothing to check
            continue
        private.extend(
            f"{where}: from {module} import {name}"
            for module, name in found
            if name not in table.get(module, set())
        )
    assert private == []


def test_the_check_sees_an_internal_import() -> None:
    """The scan above would notice an example importing an internal name."""
    code = "from slimta_tx.protocol import ESMTPServerProtocol\nfrom slimta_tx import Policy\n"
    table = public_names()
    found = imports_in(code)
    assert found == [("slimta_tx.protocol", "ESMTPServerProtocol"), ("slimta_tx", "Policy")]
    assert [pair for pair in found if pair[1] not in table.get(pair[0], set())] == [
        ("slimta_tx.protocol", "ESMTPServerProtocol")
    ]


AUTODOC = re.compile(
    r"^\.\. (?P<kind>automodule|autoclass|autofunction|slimta-interface):: (?P<target>\S+)"
    r"(?P<options>(?:\n   :.*)*)",
    re.MULTILINE,
)


def referenced_names() -> list[tuple[str, str | None]]:
    """``(module, name)`` for each name the Python reference documents (None: a module)."""
    text = (ROOT / "docs" / "reference" / "python.md").read_text()
    found: list[tuple[str, str | None]] = []
    for match in AUTODOC.finditer(text):
        target = match["target"]
        if match["kind"] == "automodule":
            listed = re.search(r":members: (\S.*)", match["options"])
            if listed is None:
                found.append((target, None))
            else:
                found.extend((target, name.strip()) for name in listed[1].split(","))
        else:
            module, _, name = target.rpartition(".")
            found.append((module, name))
    return found


def test_the_python_reference_documents_only_public_names() -> None:
    """The reference (docs/reference/python.md) and the table agree: what the reference
    shows users is public, so the table is the one list of what is."""
    table = public_names()
    referenced = referenced_names()
    assert len(referenced) > 10
    not_public = [
        f"{module}.{name}" if name else module
        for module, name in referenced
        if module not in table or (name is not None and name not in table[module])
    ]
    assert not_public == []

"""The link check, inside the project only (there is no internet where the tests run): every
relative link in the README and the docs points at a file or directory of the repository, and
every ``#anchor`` at a heading of its page. External URLs are not checked.

Sphinx checks the links between pages again when it builds the site (``make docs``); this test
covers the README, which is not part of the site, and runs without Sphinx.

Beyond links, the paths of repository files named in prose (``slimta_tx/events.py``,
``tests/test_fastwrite.py``, ``pyproject.toml``) and the dotted names of the package
(``slimta_tx.bus.amqp_link.open_link``) must exist too, in the README, the docs and the
docstrings and comments of ``slimta_tx/`` and the ``twistd`` plugin: a file renamed or a module
split leaves no reference behind.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path
from urllib.parse import unquote

from markdown_it import MarkdownIt

from tests.support.doc_markers import ROOT, pages

_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def slug(title: str) -> str:
    """A heading's anchor as GitHub (and MyST's heading anchors) make it."""
    text = re.sub(r"[^\w\- ]", "", title.strip().lower())
    return text.replace(" ", "-")


def headings_and_links(page: Path) -> tuple[set[str], list[tuple[int, str]]]:
    tokens = MarkdownIt("commonmark").parse(page.read_text(encoding="utf-8"))
    anchors: set[str] = set()
    links: list[tuple[int, str]] = []
    for index, token in enumerate(tokens):
        if token.type == "heading_open":
            anchors.add(slug(tokens[index + 1].content.replace("`", "")))
        if token.type != "inline" or not token.children:
            continue
        line = token.map[0] + 1 if token.map else 0
        for child in token.children:
            if child.type == "link_open":
                links.append((line, str(child.attrGet("href") or "")))
            elif child.type == "image":
                links.append((line, str(child.attrGet("src") or "")))
    return anchors, links


def broken_links(all_pages: list[Path]) -> list[str]:
    problems: list[str] = []
    anchors_of: dict[Path, set[str]] = {}
    for page in all_pages:
        anchors, links = headings_and_links(page)
        anchors_of[page] = anchors
        for line, href in links:
            if not href or _SCHEME.match(href):
                continue  # external: not checked here
            where = f"{page.relative_to(ROOT) if ROOT in page.parents else page}:{line}"
            path_part, _, anchor = href.partition("#")
            target = (page.parent / unquote(path_part)).resolve() if path_part else page
            if not target.exists():
                problems.append(f"{where}: {href} -> no such file {target}")
                continue
            if anchor and target.suffix == ".md":
                if target not in anchors_of:
                    anchors_of[target] = headings_and_links(target)[0]
                if anchor not in anchors_of[target]:
                    problems.append(f"{where}: {href} -> no heading #{anchor} in {target.name}")
    return problems


def test_links_inside_the_project_resolve() -> None:
    problems = broken_links(pages())
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_the_check_finds_broken_links(tmp_path: Path) -> None:
    """A missing file and a missing heading are both reported, with the page and line."""
    (tmp_path / "other.md").write_text("# Other\n\n## A section\n")
    page = tmp_path / "page.md"
    page.write_text(
        "# Page\n\n[ok](other.md#a-section) [ok](#page) [web](https://example.com/x)\n\n"
        "[gone](missing.md)\n\n[bad anchor](other.md#nope)\n"
    )
    problems = broken_links([page])
    assert len(problems) == 2
    assert problems[0].startswith(f"{page}:5: missing.md -> no such file")
    assert problems[1].startswith(f"{page}:7: other.md#nope -> no heading #nope")


def test_slugs_match_the_anchors_used_in_the_docs() -> None:
    assert slug("CHUNKING (BDAT)") == "chunking-bdat"
    assert slug("Running twistd slimta") == "running-twistd-slimta"
    assert slug("What a 250 means") == "what-a-250-means"


# -- paths and dotted names in prose --------------------------------------------------------------

_TOP = r"(?:slimta_tx|tests|docs|examples|bench|twisted|\.ci|newsfragments)"
_PATH = re.compile(
    rf"(?<![\w./:-])({_TOP}/[\w.\-/]*[\w/]|pyproject\.toml|Makefile|README\.md|CHANGELOG\.md"
    r"|hatch_build\.py)(?![\w(])"
)
_DOTTED = re.compile(r"(?<![\w./-])(slimta_tx(?:\.\w+)+)")
#: Paths named on purpose although they do not exist (each says why).
_ABSENT_ON_PURPOSE = {
    "twisted/plugins/__init__.py",  # running.md: the wheel must never ship it
}


def prose_files() -> list[Path]:
    """The README, the docs, and the Python files of the package and the plugin."""
    return [
        *pages(),
        *sorted((ROOT / "slimta_tx").rglob("*.py")),
        *sorted((ROOT / "twisted" / "plugins").glob("*.py")),
    ]


def _resolves(name: str) -> bool:
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        try:
            found: object = importlib.import_module(".".join(parts[:end]))
        except ImportError:
            continue
        for attribute in parts[end:]:
            if not hasattr(found, attribute):
                return False
            found = getattr(found, attribute)
        return True
    return False


def dangling_references(files: list[Path], root: Path = ROOT) -> list[str]:
    problems: list[str] = []
    for file in files:
        where = file.relative_to(root) if root in file.parents else file
        for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
            for match in _PATH.finditer(line):
                path = match.group(1).rstrip(".")
                if "_build" in path or path in _ABSENT_ON_PURPOSE:
                    continue  # the docs' build output is made by `make docs`
                if not (root / path).exists():
                    problems.append(f"{where}:{number}: {path} -> no such file")
            for match in _DOTTED.finditer(line):
                if not _resolves(match.group(1)):
                    problems.append(f"{where}:{number}: {match.group(1)} -> no such name")
    return problems


def test_paths_and_names_in_prose_exist() -> None:
    problems = dangling_references(prose_files())
    assert not problems, "dangling references:\n" + "\n".join(problems)


def test_the_check_finds_dangling_paths_and_names(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "here.md").write_text("")
    page = tmp_path / "page.py"
    page.write_text(
        '"""See docs/here.md, docs/gone.md and slimta_tx.events.EdgeEvents.\n\n'
        'Also slimta_tx.no_such_module and slimta_tx.events.NoSuchName."""\n'
    )
    assert dangling_references([page], root=tmp_path) == [
        "page.py:1: docs/gone.md -> no such file",
        "page.py:3: slimta_tx.no_such_module -> no such name",
        "page.py:3: slimta_tx.events.NoSuchName -> no such name",
    ]

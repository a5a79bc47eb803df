"""The link check, inside the project only (there is no internet where the tests run): every
relative link in the README and the docs points at a file or directory of the repository, and
every ``#anchor`` at a heading of its page. External URLs are not checked.

Sphinx checks the links between pages again when it builds the site (``make docs``); this test
covers the README, which is not part of the site, and runs without Sphinx.
"""

from __future__ import annotations

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

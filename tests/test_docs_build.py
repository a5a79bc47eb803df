"""The docs build is strict (``make docs``): the mistakes a page can make fail it, and the
options reference is made from the options ``twistd slimta`` really parses."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from slimta_tx.cli.reference import option_groups
from slimta_tx.tap import GROUPS, Options
from tests.support.doc_markers import ROOT


def test_the_reference_lists_every_option_twistd_slimta_parses() -> None:
    """Every long option of tap.Options is in exactly one group of the reference, with
    help text, and nothing else is."""
    listed = [option.name for group in option_groups() for option in group.options]
    parsed = {name.rstrip("=") for name in Options().longOpt} - {"help", "version"}
    assert sorted(listed) == sorted(parsed)
    assert all(option.help for group in option_groups() for option in group.options)
    assert [group.module for group in option_groups()] == [g.__name__ for g in GROUPS]


def test_a_new_option_group_documents_itself() -> None:
    """A group module added to tap.GROUPS needs no docs edit: its title comes from its
    docstring, its options (parameters, flags, opt_ methods, aliases) from its class."""
    module = ModuleType("slimta_tx.cli.example", "Example options: one of each kind.\n\nMore.")

    class OptionGroup:
        optParameters: list[list[Any]] = [["size", "s", 10.0, "How big"]]
        optFlags: list[list[Any]] = [["loud", None, "Shout."]]

        def opt_add_path(self, path: str) -> None:
            """Add a path (repeatable)"""

        opt_also = opt_add_path

    module.OptionGroup = OptionGroup  # type: ignore[attr-defined]
    [group] = option_groups([module])
    assert (group.title, group.intro) == ("Example options", "One of each kind.")
    assert [(o.signature, o.help, o.default, o.short) for o in group.options] == [
        ("--add-path=PATH", "Add a path (repeatable). Also --also.", None, None),
        ("--loud", "Shout.", None, None),
        ("--size=VALUE", "How big.", "10", "s"),
    ]


SPHINX = shutil.which("sphinx-build", path=os.path.dirname(sys.executable))


@pytest.mark.slow
def test_the_build_fails_on_each_kind_of_mistake(tmp_path: Path) -> None:
    """A copy of docs/ with one of each mistake: the build (as make docs runs it) fails and
    names each one."""
    if SPHINX is None:
        if os.environ.get("CI") == "true":
            pytest.fail("sphinx-build is not installed: pip install -e '.[docs]'")
        pytest.skip("sphinx-build is not installed: pip install -e '.[docs]'")
    docs = tmp_path / "docs"
    shutil.copytree(ROOT / "docs", docs, ignore=shutil.ignore_patterns("_build"))
    with (docs / "running.md").open("a") as page:
        page.write(
            "\n[a missing page](no-such-page.md) and [a missing heading](tls.md#no-such-heading)"
            " and {py:class}`slimta_tx.NoSuchClass`\n\n"
            "```no-such-language\nx\n```\n"
        )
    (docs / "orphans").mkdir()
    (docs / "orphans" / "lost.md").write_text("# Lost\n\nIn no table of contents.\n")
    done = subprocess.run(
        [SPHINX, "-W", "--keep-going", "-E", "-q", "-b", "html", str(docs), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode != 0
    for expected in (
        "no-such-page",
        "no-such-heading",
        "slimta_tx.NoSuchClass",
        "no-such-language",
        "lost.md: WARNING: document isn't included in any toctree",
    ):
        assert expected in done.stderr, done.stderr

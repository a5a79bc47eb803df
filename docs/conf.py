"""Sphinx configuration: the Markdown pages in docs/ (MyST), the API reference from the
docstrings, the options reference and the man page generated from ``twistd slimta``'s options.

``make docs`` builds it with warnings as errors (``-W``): a broken link or cross-reference, a
page missing from every toctree or an unknown code-block language fails the build.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "_ext"))

import slimta_tx  # noqa: E402  (after the path setup)

project = "slimta_tx"
author = "the slimta_tx developers"
copyright = "the slimta_tx developers"
version = release = slimta_tx.__version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "slimta_docs",
]

root_doc = "index"
source_suffix = {".md": "markdown"}
exclude_patterns = ["_build", "_ext", "man/*.1"]
# No internet where the docs are built: no intersphinx, and the link check (tests/test_docs.py)
# checks only links inside the project.

myst_heading_anchors = 3
# Options are written --like-this: no en dashes or curly quotes in prose about them.
smartquotes = False
myst_enable_extensions = ["deflist"]

# Every cross-reference to a name of ours must resolve; names of Twisted, zope and the standard
# library are not documented here (no intersphinx without internet), so they are not checked.
nitpicky = True
nitpick_ignore_regex = [(r"py:.*", r"(?!slimta_tx\b).*")]

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_format = "short"

html_theme = "alabaster"
html_title = f"slimta_tx {release}"
html_static_path: list[str] = []

# The man page of `twistd slimta`, from the same page as the HTML options reference.
man_pages = [
    (
        "reference/twistd-slimta",
        "twistd-slimta",
        "an ESMTP edge listener on Twisted",
        [author],
        1,
    )
]
man_show_urls = False

"""Sphinx glue for slimta_tx's docs (see docs/writing-docs.md).

- ``slimta-options``: the options of ``twistd slimta``, read from the option groups
  (:func:`slimta_tx.cli.reference.option_groups`), as ``option`` entries that other pages can
  link to and that the man page shows too.
- Example markers (``<!-- example: ... -->``, read by the test suite): a ``skip`` marker shows
  its reason in the page; the others are not shown.
- Links from a page to a file of the repository outside ``docs/`` (``../bench/README.md``,
  ``../examples/amqp_consumer.py``) become downloads of that file, so GitHub and the built site
  both have a working link, and a link to a missing file fails the build.
- Lexer names for the configuration of other software: ``haproxy``, ``postfix-main``,
  ``postfix-master`` (``systemd`` and ``ini`` are Pygments' own).
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
from pathlib import Path
from typing import Any

from docutils import nodes
from docutils.statemachine import StringList
from pygments.lexers import IniLexer, TextLexer
from sphinx import addnodes
from sphinx.application import Sphinx
from sphinx.transforms import SphinxTransform
from sphinx.transforms.post_transforms import SphinxPostTransform
from sphinx.util.docutils import SphinxDirective
from sphinx.util.nodes import make_refnode

from slimta_tx.cli.reference import option_groups

_MARKER = re.compile(r"^\s*<!--\s*example:\s*(.*?)\s*-->\s*$", re.DOTALL)
_SKIP = re.compile(r"^skip:\s*(.*)$", re.DOTALL)
_PUNCTUATION = re.compile(r"([!-/:-@\[-`{-~])")


def _escape(text: str) -> str:
    """Markdown text that shows ``text`` as it is (CommonMark escapes any ASCII punctuation)."""
    return _PUNCTUATION.sub(r"\\\1", text)


class option_group_heading(nodes.rubric):
    """A group's heading: a rubric in HTML, a subsection heading (``.SS``) in the man page."""


def _visit_heading(translator: Any, node: nodes.Element) -> None:
    translator.visit_rubric(node)


def _depart_heading(translator: Any, node: nodes.Element) -> None:
    translator.depart_rubric(node)


def _visit_heading_man(translator: Any, node: nodes.Element) -> None:
    translator.ensure_eol()
    translator.body.append(f".SS {translator.deunicode(node.astext())}\n")
    raise nodes.SkipNode


class SlimtaOptions(SphinxDirective):
    """``twistd slimta``'s options, one ``option`` entry each, grouped as ``tap.GROUPS``.

    For use in MyST pages: the entries are written as MyST Markdown and parsed in place.
    """

    has_content = False

    def run(self) -> list[nodes.Node]:
        container = nodes.container(classes=["slimta-options"])
        self._parse(["```{program} twistd slimta", "```"], container)
        for group in option_groups():
            container += option_group_heading(text=group.title)
            if group.intro:
                container += nodes.paragraph(text=group.intro)
            lines: list[str] = []
            for option in group.options:
                signature = option.signature
                if option.short:
                    signature = f"-{option.short}, {signature}"
                text = _escape(option.help)
                if option.default is not None:
                    text += f" Default: `{option.default}`."
                lines += ["```{option} " + signature, text, "```", ""]
            self._parse(lines, container)
        return list(container.children)

    def _parse(self, lines: list[str], into: nodes.Element) -> None:
        self.state.nested_parse(StringList(lines, source="slimta-options"), 0, into)


class ZopeInterface(SphinxDirective):
    """``.. slimta-interface:: slimta_tx.IBus`` (in reST, e.g. inside ``{eval-rst}``): a zope
    interface with its docstring and methods, which autodoc cannot document."""

    required_arguments = 1

    def run(self) -> list[nodes.Node]:
        path = self.arguments[0]
        module_name, _, name = path.rpartition(".")
        interface = getattr(importlib.import_module(module_name), name)
        lines = [f".. py:class:: {name}", f"   :module: {module_name}", ""]
        lines += _indent(inspect.getdoc(interface) or "", 3)
        for member in sorted(interface.names()):
            method = interface[member]
            lines += ["", f"   .. py:method:: {member}{method.getSignatureString()}", ""]
            lines += _indent(inspect.cleandoc(method.getDoc() or ""), 6)
        container = nodes.container()
        self.state.nested_parse(StringList(lines, source=path), self.content_offset, container)
        return list(container.children)


def _indent(text: str, spaces: int) -> list[str]:
    return [(" " * spaces + line) if line else "" for line in text.splitlines()]


class ExampleMarkers(SphinxTransform):
    """Show the reason of a ``<!-- example: skip: ... -->`` marker; drop the other markers."""

    default_priority = 100

    def apply(self, **kwargs: Any) -> None:
        for raw in list(self.document.findall(nodes.raw)):
            match = _MARKER.match(raw.astext())
            if match is None:
                continue
            skip = _SKIP.match(match.group(1))
            if skip is None:
                raw.parent.remove(raw)
                continue
            reason = " ".join(skip.group(1).split())
            note = nodes.paragraph(classes=["example-not-run"])
            note += nodes.emphasis(text=f"Not run by the test suite: {reason}")
            raw.replace_self(note)


class RepositoryLinks(SphinxTransform):
    """A link to a Markdown file outside the docs becomes a download of that file."""

    default_priority = 5  # before the references are resolved

    def apply(self, **kwargs: Any) -> None:
        srcdir = Path(self.env.srcdir)
        for xref in list(self.document.findall(addnodes.pending_xref)):
            target = xref.get("reftarget", "")
            if xref.get("refdomain") != "doc" or not target.startswith("/"):
                continue
            path = Path(target + ".md")
            if srcdir in path.parents or not path.is_file():
                continue  # a page of the docs, or missing: MyST reports it
            here = Path(self.env.doc2path(self.env.docname)).parent
            download = addnodes.download_reference(
                refdomain=None,
                reftarget=os.path.relpath(path, here),
                refdoc=self.env.docname,
                reftype="myst",
                refexplicit=True,
            )
            download.extend(xref.children)
            download.source, download.line = xref.source, xref.line
            xref.replace_self(download)


class ManPageLinks(SphinxPostTransform):
    """In the man page a link to another page of the docs is its text, in italics (there is
    nowhere to go; docutils would print ``text <>``)."""

    default_priority = 900
    builders = ("man",)

    def run(self, **kwargs: Any) -> None:
        for reference in list(self.document.findall(nodes.reference)):
            uri = reference.get("refuri", "")
            if "://" in uri or uri.startswith("mailto:"):
                continue
            reference.replace_self(nodes.emphasis(text=reference.astext()))


def _importable(target: str) -> bool:
    """Whether ``slimta_tx.x.Name`` (or ``slimta_tx.x``) names something that exists."""
    parts = target.split(".")
    for split in range(len(parts), 0, -1):
        try:
            obj: Any = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        try:
            for attribute in parts[split:]:
                obj = getattr(obj, attribute)
        except AttributeError:
            return False
        return True
    return False


def resolve_own_names(
    app: Sphinx, env: Any, node: addnodes.pending_xref, contnode: nodes.Element
) -> nodes.Element | None:
    """References to slimta_tx's names: a name documented under its public path
    (``slimta_tx.reply.Reply`` documented as ``slimta_tx.Reply``) links there; an internal name
    that exists but is not documented (a type in a signature) is shown unlinked. A name that
    does not exist at all stays a broken reference, which fails the build."""
    target = node.get("reftarget", "")
    if node.get("refdomain") != "py" or not target.startswith("slimta_tx."):
        return None
    python = env.get_domain("py")
    name = target.rsplit(".", 1)[-1]
    candidates = [full for full in python.objects if full.rsplit(".", 1)[-1] == name]
    public = [full for full in candidates if full.count(".") <= target.count(".")]
    if len(public) == 1 or len(candidates) == 1:
        found = (public or candidates)[0]
        entry = python.objects[found]
        return make_refnode(app.builder, node["refdoc"], entry.docname, entry.node_id, contnode)
    if _importable(target):
        return contnode
    return None


def setup(app: Sphinx) -> dict[str, Any]:
    generic = (_visit_heading, _depart_heading)
    app.add_node(
        option_group_heading,
        html=generic,
        text=generic,
        latex=generic,
        texinfo=generic,
        man=(_visit_heading_man, None),
    )
    app.add_directive("slimta-options", SlimtaOptions)
    app.add_directive("slimta-interface", ZopeInterface)
    app.connect("missing-reference", resolve_own_names)
    app.add_transform(ExampleMarkers)
    app.add_transform(RepositoryLinks)
    app.add_post_transform(ManPageLinks)
    app.add_lexer("haproxy", TextLexer)
    app.add_lexer("postfix-main", IniLexer)
    app.add_lexer("postfix-master", TextLexer)
    return {"parallel_read_safe": True, "parallel_write_safe": True}

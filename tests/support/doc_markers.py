"""The examples in the docs, found: each code block of a page with its marker (the rules are
in docs/writing-docs.md; tests/support/doc_runner.py runs them).

A page's code blocks are read with markdown-it (the parser MyST uses). The line just before a
block may hold a marker that says what the test suite does with it::

    <!-- example: run -->
    <!-- example: server
         "tcp:25" -> "tcp:{port}:interface=127.0.0.1"
         "/var/spool/slimta" -> "{tmp}/spool" -->
    <!-- example: skip: binds port 25, which needs root -->

Python and shell blocks, and blocks in any language other than ``text`` and ``json``, must
have one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from markdown_it import MarkdownIt

ROOT = Path(__file__).resolve().parent.parent.parent

MODES = ("run", "server", "client", "file", "pytest", "trial", "check", "skip")
PYTHON = frozenset({"python", "py", "python3"})
SHELL = frozenset({"sh", "bash", "shell", "zsh"})
CONSOLE = frozenset({"console", "shell-session"})
#: Blocks in these languages are what something prints or reads, not examples to run.
DATA = frozenset({"text", "json", "output", "none"})
CHECKS = ("postfix-main", "postfix-master", "haproxy", "systemd")

HOW_TO_MARK = """\
Put a marker on the line before each block (docs/writing-docs.md has them all):
  <!-- example: run -->             run it: a Python script, shell commands, a console session
  <!-- example: server ... -->      start it on a free port, send it a message, stop it
  <!-- example: check haproxy -->   check a configuration's syntax with its own tool
  <!-- example: skip: REASON -->    not run; the built page shows REASON to the reader
A block that only shows output or a file's layout: give it the language `text`."""

_MARKER = re.compile(r"^\s*<!--\s*example:(.*?)-->\s*$", re.DOTALL)
_SUBSTITUTION = re.compile(r'^"((?:[^"\\]|\\.)*)"\s*->\s*"((?:[^"\\]|\\.)*)"$')


class MarkerError(ValueError):
    """A marker that cannot be understood; the message starts with ``page:line:``."""


@dataclass(frozen=True)
class Marker:
    mode: str
    argument: str = ""  # file: the path; check: the kind (and file name); skip: the reason
    given: tuple[str, ...] = ()
    substitutions: tuple[tuple[str, str], ...] = ()
    expect: str = "250"


@dataclass
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    language: str
    code: str
    marker: Marker | None = None
    output: str | None = None  # the "Output:" block that follows it, if any

    @property
    def where(self) -> str:
        return f"{_relative(self.page)}:{self.line}"

    @property
    def is_example(self) -> bool:
        """Whether the rules require a marker on this block (a MyST directive, ``{toctree}``,
        is not code)."""
        return self.language not in DATA and not self.language.startswith("{")


def _relative(page: Path) -> str:
    try:
        return str(page.relative_to(ROOT))
    except ValueError:
        return str(page)


def pages(root: Path = ROOT) -> list[Path]:
    """README.md and every Markdown page under docs/ (not the build output)."""
    found = [root / "README.md"]
    found += sorted(path for path in (root / "docs").rglob("*.md") if "_build" not in path.parts)
    return [path for path in found if path.is_file()]


def parse_marker(text: str, where: str) -> Marker:
    body = text.strip()
    first, _, rest = body.partition("\n")
    first = first.strip()
    if first.startswith("skip:") or first == "skip":
        reason = " ".join(body[len("skip") :].lstrip(":").split())
        if not reason:
            raise MarkerError(f"{where}: 'skip' needs a reason: <!-- example: skip: REASON -->")
        return Marker("skip", reason)
    words = first.split(None, 1)
    if not words or words[0] not in MODES:
        raise MarkerError(
            f"{where}: unknown example mode {first!r}; expected one of {', '.join(MODES)}"
        )
    mode, argument = words[0], (words[1].strip() if len(words) > 1 else "")
    if mode == "file" and (not argument or argument.startswith("/") or ".." in argument):
        raise MarkerError(f"{where}: 'file' needs a relative path: <!-- example: file NAME -->")
    if mode == "check" and (not argument or argument.split()[0] not in CHECKS):
        raise MarkerError(f"{where}: 'check' needs one of {', '.join(CHECKS)}")
    if mode in ("run", "server", "client", "pytest", "trial") and argument:
        raise MarkerError(f"{where}: {mode!r} takes no argument on its line, got {argument!r}")
    given: list[str] = []
    substitutions: list[tuple[str, str]] = []
    expect = "250"
    for raw in rest.splitlines():
        line = raw.strip()
        if not line:
            continue
        if line.startswith("given "):
            given += [name.strip() for name in line[len("given ") :].split(",") if name.strip()]
            continue
        if line.startswith("expect "):
            expect = line[len("expect ") :].strip()
            if not re.fullmatch(r"[2-5]\d\d", expect):
                raise MarkerError(f"{where}: 'expect' takes a reply code, got {expect!r}")
            continue
        match = _SUBSTITUTION.match(line)
        if match is None:
            raise MarkerError(
                f"{where}: cannot read {line!r} in the marker; expected "
                '"OLD" -> "NEW", given NAME, ... or expect CODE'
            )
        old, new = (part.replace('\\"', '"') for part in match.groups())
        substitutions.append((old, new))
    if mode == "server" and not any("{port}" in new for _, new in substitutions):
        raise MarkerError(
            f'{where}: a server example needs a substitution giving it {{port}}, e.g. "tcp:25" '
            '-> "tcp:{port}:interface=127.0.0.1"'
        )
    unknown = [name for name in given if name not in STANDINS]
    if unknown:
        raise MarkerError(
            f"{where}: no stand-in for {', '.join(unknown)}; the stand-ins are "
            f"{', '.join(sorted(STANDINS))} (tests/support/doc_markers.py)"
        )
    return Marker(mode, argument, tuple(given), tuple(substitutions), expect)


def blocks(page: Path) -> list[Block]:
    """The fenced code blocks of ``page`` with their markers; MarkerError if one is wrong."""
    text = page.read_text(encoding="utf-8")
    tokens = MarkdownIt("commonmark").parse(text)
    found: list[Block] = []
    pending: tuple[Marker, int] | None = None
    for index, token in enumerate(tokens):
        if token.type == "html_block" and _MARKER.match(token.content):
            if pending is not None:
                raise MarkerError(f"{_relative(page)}:{pending[1]}: marker without a block")
            line = token.map[0] + 1 if token.map else 0
            match = _MARKER.match(token.content)
            assert match is not None
            pending = (parse_marker(match.group(1), f"{_relative(page)}:{line}"), line)
            continue
        if token.type == "fence":
            language = (token.info.split() or [""])[0]
            block = Block(page, (token.map[0] + 1) if token.map else 0, language, token.content)
            if pending is not None:
                block.marker = pending[0]
                pending = None
            block.output = _output_after(tokens, index)
            found.append(block)
            continue
        if pending is not None and token.nesting >= 0 and token.type != "html_block":
            raise MarkerError(
                f"{_relative(page)}:{pending[1]}: a marker must be on the line just before "
                "its code block"
            )
    if pending is not None:
        raise MarkerError(f"{_relative(page)}:{pending[1]}: marker without a block")
    return found


def _output_after(tokens: list, index: int) -> str | None:
    """The text block after ``Output:`` that follows the block at ``index``, if any."""
    following = tokens[index + 1 : index + 5]
    if (
        len(following) == 4
        and following[0].type == "paragraph_open"
        and following[1].content.strip() == "Output:"
        and following[3].type == "fence"
        and (following[3].info.split() or [""])[0] in DATA
    ):
        return str(following[3].content)
    return None


def unmarked(all_pages: list[Path]) -> tuple[list[Block], list[str]]:
    """Example blocks with no marker, and the marker errors, over ``all_pages``."""
    missing: list[Block] = []
    errors: list[str] = []
    for page in all_pages:
        try:
            page_blocks = blocks(page)
        except MarkerError as e:
            errors.append(str(e))
            continue
        outputs = {block.output for block in page_blocks if block.output is not None}
        for block in page_blocks:
            if block.marker is None and block.is_example and block.code not in outputs:
                missing.append(block)
    return missing, errors


# -- stand-ins for names a fragment uses but does not define ------------------------------

STANDINS: dict[str, tuple[tuple[str, ...], str]] = {
    "reactor": ((), "from twisted.internet import reactor"),
    "bus": ((), "from slimta_tx.testing import RecordingBus\nbus = RecordingBus()"),
    "relay_bus": ((), "from slimta_tx.testing import RecordingBus\nrelay_bus = RecordingBus()"),
    "amqp_bus": ((), "from slimta_tx.testing import RecordingBus\namqp_bus = RecordingBus()"),
    "archive_bus": (
        (),
        "from slimta_tx.testing import RecordingBus\narchive_bus = RecordingBus()",
    ),
    "policy": (
        (),
        "from slimta_tx import Policy\n"
        "policy = Policy(hostname='mx.example.com', accepted_domains=('example.com',))",
    ),
    "edge": (
        ("bus", "policy", "reactor"),
        "from slimta_tx import SmtpEdge\nedge = SmtpEdge(bus, policy, reactor=reactor)",
    ),
    "auth": ((), "from slimta_tx import Auth\nauth = Auth(secret_func=lambda user: None)"),
    "SECRETS": ((), "SECRETS = {'alice': 'correct horse'}"),
    "suspended_users": ((), "suspended_users = {'mallory'}"),
    "db": (
        (),
        "class _Database:\n"
        "    async def verify(self, username, password):\n"
        "        return True\n"
        "db = _Database()",
    ),
    "directory": (
        (),
        "class _Directory:\n"
        "    async def exists(self, address):\n"
        "        return True\n"
        "directory = _Directory()",
    ),
    "scanner": (
        (),
        "class _Verdict:\n"
        "    is_spam = False\n"
        "class _Scanner:\n"
        "    async def check(self, chunks):\n"
        "        for _ in chunks:\n"
        "            pass\n"
        "        return _Verdict()\n"
        "scanner = _Scanner()",
    ),
}


def prelude(names: tuple[str, ...]) -> str:
    """Python that defines ``names`` (and what they need) before an example runs."""
    done: list[str] = []

    def add(name: str) -> None:
        if name in done:
            return
        needs, _ = STANDINS[name]
        for need in needs:
            add(need)
        done.append(name)

    for name in names:
        add(name)
    if not done:
        return ""
    parts = ["# Stand-ins from tests/support/doc_markers.py (the page defines them elsewhere)"]
    parts += [STANDINS[name][1] for name in done]
    return "\n".join(parts) + "\n\n"

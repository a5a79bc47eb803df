"""Every example in the README and docs/ runs as printed, or says in the page why it cannot.

The rules and the markers are in docs/writing-docs.md; the machinery in
tests/support/doc_markers.py (finding them) and tests/support/doc_runner.py (running them).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from tests.support.doc_markers import (
    HOW_TO_MARK,
    ROOT,
    Block,
    MarkerError,
    blocks,
    pages,
    parse_marker,
    unmarked,
)
from tests.support.doc_runner import ExampleFailed, PageRun, Skipped, run_page

PAGES = pages()


def test_every_example_is_run_or_says_why() -> None:
    """No Python, shell or configuration block goes unchecked by accident: each has a marker
    that runs it, checks it, or gives the reason it cannot run here."""
    missing, errors = unmarked(PAGES)
    lines = list(errors)
    if missing:
        lines.append(
            f"{len(missing)} example block(s) neither run by the tests nor marked with a reason:"
        )
        lines += [f"  {block.where}: ```{block.language or '(no language)'}" for block in missing]
        lines.append(HOW_TO_MARK)
    if lines:
        pytest.fail("\n".join(lines), pytrace=False)


def _pages_with_examples() -> list[Path]:
    result = []
    for page in PAGES:
        try:
            if any(b.marker is not None and b.marker.mode != "skip" for b in blocks(page)):
                result.append(page)
        except MarkerError:
            pass  # reported by test_every_example_is_run_or_says_why
    return result


@pytest.mark.slow
@pytest.mark.parametrize("page", _pages_with_examples(), ids=lambda p: str(p.relative_to(ROOT)))
def test_the_examples_of_each_page_work_as_printed(page: Path, tmp_path: Path) -> None:
    """The page's marked blocks run in order in one directory: scripts exit 0 and print their
    Output block, servers start on a free port and take a message, configurations pass
    their tool's check."""
    results = run_page(page, tmp_path)
    failures = [str(e) for _, e in results if isinstance(e, ExampleFailed)]
    skipped = [f"{b.where}: {e}" for b, e in results if isinstance(e, Skipped)]
    assert not failures, "\n\n".join(failures)
    if skipped:
        pytest.skip("; ".join(skipped))


# -- the marker rules themselves --------------------------------------------------------------


def page_with(tmp_path: Path, text: str) -> Path:
    page = tmp_path / "page.md"
    page.write_text(text)
    return page


def test_an_unmarked_python_block_is_reported_with_its_line(tmp_path: Path) -> None:
    """The report names the page and line of each unmarked example, and says how to mark it."""
    page = page_with(
        tmp_path,
        "# Page\n\n```python\nprint(1)\n```\n\n```text\nout\n```\n\n```haproxy\nfrontend x\n```\n",
    )
    missing, errors = unmarked([page])
    assert errors == []
    assert [(b.line, b.language) for b in missing] == [(3, "python"), (11, "haproxy")]


def test_a_block_without_a_language_must_say_what_it_is(tmp_path: Path) -> None:
    """A bare fence could be a command or output: it counts as an example until it says
    ```text."""
    page = page_with(tmp_path, "```\ntwistd -n slimta\n```\n")
    missing, _ = unmarked([page])
    assert [b.language for b in missing] == [""]


def test_output_blocks_and_markers_are_understood(tmp_path: Path) -> None:
    """A marker applies to the block right after it; an Output block after a run block is
    what the block must print."""
    page = page_with(
        tmp_path,
        '<!-- example: run\n     "2525" -> "{port}" -->\n```python\nprint(2525)\n```\n\n'
        "Output:\n\n```text\n2525\n```\n\n"
        "<!-- example: skip: needs root -->\n```sh\ntwistd slimta\n```\n",
    )
    first, _, second = blocks(page)
    assert first.marker is not None and first.marker.mode == "run"
    assert first.marker.substitutions == (("2525", "{port}"),)
    assert first.output == "2525\n"
    assert second.marker is not None and second.marker.argument == "needs root"
    assert unmarked([page]) == ([], [])


@pytest.mark.parametrize(
    ("marker", "message"),
    [
        ("rn", "unknown example mode 'rn'"),
        ("skip:", "'skip' needs a reason"),
        ("file /etc/passwd", "'file' needs a relative path"),
        ("check nginx", "'check' needs one of"),
        ("server", "needs a substitution giving it {port}"),
        ("run\n given nobody", "no stand-in for nobody"),
        ("run\n 2525 -> 1", "cannot read '2525 -> 1'"),
    ],
)
def test_a_bad_marker_says_what_is_wrong(marker: str, message: str) -> None:
    with pytest.raises(MarkerError, match=re.escape(message)) as raised:
        parse_marker(marker, "docs/x.md:7")
    assert str(raised.value).startswith("docs/x.md:7: ")


def test_a_marker_must_touch_its_block(tmp_path: Path) -> None:
    page = page_with(tmp_path, "<!-- example: run -->\n\nSome text.\n\n```python\npass\n```\n")
    with pytest.raises(MarkerError, match=r"page\.md:1: a marker must be on the line just before"):
        blocks(page)


def test_a_failing_example_fails_with_its_place_and_output(tmp_path: Path) -> None:
    """The runner itself can fail: a script that exits non-zero, output that differs."""
    page = page_with(
        tmp_path,
        "<!-- example: run -->\n```python\nraise SystemExit('broken example')\n```\n\n"
        "<!-- example: run -->\n```python\nprint('two')\n```\n\nOutput:\n\n```text\none\n```\n",
    )
    work = tmp_path / "work"
    work.mkdir()
    results = run_page(page, work)
    errors = [str(e) for _, e in results]
    assert "page.md:2: exit status 1" in errors[0] and "broken example" in errors[0]
    assert "page.md:7: printed something else" in errors[1]


def test_a_console_transcript_is_compared_line_by_line(tmp_path: Path) -> None:
    """Console blocks: each ``$`` command's output, with ``...`` matching any text."""
    page = page_with(
        tmp_path,
        "<!-- example: run -->\n```console\n$ echo hello world; false\nhello ...\n"
        "$ echo $?\n1\n```\n\n"
        "<!-- example: run -->\n```console\n$ echo no\nyes\n```\n",
    )
    work = tmp_path / "work"
    work.mkdir()
    (good, bad) = run_page(page, work)
    assert good[1] is None
    assert "`echo no` printed something else" in str(bad[1])


def test_stand_ins_define_what_a_fragment_uses(tmp_path: Path) -> None:
    """``given edge`` runs the fragment after an edge (with its bus, policy and reactor) is
    defined."""
    block = Block(
        tmp_path / "page.md",
        1,
        "python",
        "edge.set_validator('RCPT', lambda *a: None)\nprint(type(edge).__name__)\n",
        parse_marker("run\ngiven edge", "x:1"),
        "SmtpEdge\n",
    )
    PageRun(tmp_path / "page.md", tmp_path).run(block)


def test_examples_run_as_in_an_activated_venv() -> None:
    """Shell examples find twistd and python on PATH, as after `source .venv/bin/activate`."""
    from tests.support.doc_runner import example_environment

    path = example_environment()["PATH"].split(os.pathsep)
    assert (Path(path[0]) / "twistd").exists()


@pytest.mark.slow
def test_a_server_example_is_started_probed_and_stopped(tmp_path: Path) -> None:
    """server: started on a free port, sent one message (the reply must be the expected
    one), stopped with SIGTERM; a server that dies at start, or answers otherwise, fails."""
    page = page_with(
        tmp_path,
        '<!-- example: server\n     "--maildir" -> "--listen tcp:{port}:interface=127.0.0.1'
        ' --maildir" -->\n```sh\ntwistd -n --pidfile= slimta --maildir ./md\n```\n\n'
        "<!-- example: client -->\n```sh\nls md/new | wc -l\n```\n\nOutput:\n\n```text\n1\n```\n\n"
        '<!-- example: server\n     "--maildir" -> "--listen tcp:{port}:interface=127.0.0.1'
        ' --maildir"\n     expect 554 -->\n'
        "```sh\ntwistd -n --pidfile= slimta --maildir ./md2\n```\n\n"
        '<!-- example: server\n     "--maildir" -> "--listen tcp:{port} --max-size lots'
        ' --maildir" -->\n```sh\ntwistd -n --pidfile= slimta --maildir ./md3\n```\n',
    )
    work = tmp_path / "work"
    work.mkdir()
    started, listed, wrong_reply, dead = run_page(page, work)
    assert started[1] is None and listed[1] is None
    assert "the test message got 250, expected 554" in str(wrong_reply[1])
    assert "exited (1) before listening" in str(dead[1])
    assert "--max-size takes a whole number" in str(dead[1])


def test_a_configuration_is_checked_by_its_tool(tmp_path: Path) -> None:
    """check postfix-master: postconf reads it; a malformed line fails with its message."""
    page = page_with(
        tmp_path,
        "<!-- example: check postfix-master -->\n```postfix-master\n"
        "127.0.0.1:10025 inet n - n - - smtpd\n  -o mynetworks=127.0.0.0/8\n```\n\n"
        "<!-- example: check postfix-master -->\n```postfix-master\nnot a service line\n```\n",
    )
    work = tmp_path / "work"
    work.mkdir()
    good, bad = run_page(page, work)
    if isinstance(good[1], Skipped):
        pytest.skip(str(good[1]))
    assert good[1] is None
    assert "postconf -M says" in str(bad[1]) and "bad field count" in str(bad[1])


HAPROXY_OK = """\
defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s

frontend smtp
    bind 127.0.0.1:2525
    default_backend edges

backend edges
    server edge1 127.0.0.1:10025 send-proxy-v2
"""
UNIT_OK = """\
[Unit]
Description=slimta_tx

[Service]
ExecStart=/usr/bin/env twistd -n --pidfile= slimta
Restart=on-failure

[Install]
WantedBy=multi-user.target
"""


@pytest.mark.parametrize(
    ("kind", "good", "bad", "complaint"),
    [
        (
            "haproxy",
            HAPROXY_OK,
            "frontend smtp\n    bindd 127.0.0.1:25\n",
            "unknown keyword 'bindd'",
        ),
        (
            "systemd slimta.service",
            UNIT_OK,
            UNIT_OK.replace("ExecStart=", "ExecStartt="),
            "Unknown key 'ExecStartt'",
        ),
    ],
)
def test_haproxy_and_systemd_configurations_are_checked(
    tmp_path: Path, kind: str, good: str, bad: str, complaint: str
) -> None:
    language = kind.split()[0]
    page = page_with(
        tmp_path,
        f"<!-- example: check {kind} -->\n```{language}\n{good}```\n\n"
        f"<!-- example: check {kind} -->\n```{language}\n{bad}```\n",
    )
    work = tmp_path / "work"
    work.mkdir()
    (_, passed), (_, failed) = run_page(page, work)
    if isinstance(passed, Skipped):
        pytest.skip(str(passed))
    assert passed is None
    assert complaint in str(failed)

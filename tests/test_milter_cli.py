"""``twistd slimta --milter``: parsing, order, and what the edge gets."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from twisted.internet.task import Clock
from twisted.python import usage

from slimta_tx.milter import Milter
from slimta_tx.service import EdgeService
from slimta_tx.tap import Options, makeService


def build(tmp_path: Path, *argv: str) -> EdgeService:
    config = Options()
    config.parseOptions(["--maildir", str(tmp_path / "md"), *argv])
    service = makeService(config, reactor=Clock())
    assert isinstance(service, EdgeService)
    return service


def test_no_milter_by_default(tmp_path: Path) -> None:
    assert not build(tmp_path).edge.milters


def test_milters_in_the_order_given(tmp_path: Path) -> None:
    """Each --milter becomes one Milter, in order, with its settings."""
    edge = build(
        tmp_path,
        "--milter",
        "inet:127.0.0.1:11332,name=rspamd,content_timeout=2m",
        "--milter",
        "{ unix:/run/opendkim/opendkim.sock, default_action=accept }",
    ).edge
    assert edge.milters.milters == [
        Milter("inet:127.0.0.1:11332", content_timeout=120.0, name="rspamd"),
        Milter("unix:/run/opendkim/opendkim.sock", default_action="accept"),
    ]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--milter", "tcp:1.2.3.4:5"], "--milter: a milter is inet:HOST:PORT or unix:PATH"),
        (["--milter", "inet:h:1,default_action=maybe"], "--milter: default_action must be"),
        (
            ["--milter", "inet:h:1", "--milter", "inet:h:1"],
            "--milter: inet:h:1 is given twice (add name=... to tell apart)",
        ),
    ],
)
def test_bad_milters_are_one_line_usage_errors(argv: list[str], message: str) -> None:
    with pytest.raises(usage.UsageError, match=re.escape(message)):
        Options().parseOptions(["--maildir", "/nonexistent/unused", *argv])

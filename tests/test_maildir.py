"""MaildirBus: what a delivery leaves on disk, its fsyncs, its failures and its cleanup.

Deliveries run through a real edge (StringTransport and Clock) with a synchronous runner in
place of the thread pool, so each test sees the finished state on disk at once.
"""

from __future__ import annotations

import errno
import json
import os
import time
from itertools import groupby
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import Clock

from slimta_tx.bus.maildir import MaildirBus
from slimta_tx.factory import SmtpEdge
from slimta_tx.policy import Policy
from slimta_tx.testing import connect, parse_replies
from tests.support.faults import DELIVERY_STEPS, StepSpy, fail_at

MESSAGE = (
    b"From: Ann <a@example.com>\r\n"
    b"To: Bob <b@example.com>\r\n"
    b"Subject: caf\xc3\xa9\r\n"
    b"\r\n"
    b"Hello Bob,\r\n"
    b".a line that started with a dot\r\n"
    b"\xe2\x82\xac 8-bit text\r\n"
)


def run_now(f: Any) -> Deferred[Any]:
    return maybeDeferred(f)


class EdgeSession:
    """One SMTP session against an edge delivering into a MaildirBus."""

    def __init__(self, maildir: Path) -> None:
        self.bus = MaildirBus(str(maildir), run_in_thread=run_now)
        policy = Policy(hostname="mx.test", accepted_domains=("example.com",))
        self.edge = SmtpEdge(self.bus, policy, reactor=Clock())
        self.proto, self.transport = connect(self.edge, ("192.0.2.7", 40001))
        self.exchange(b"EHLO client.test\r\n")

    def exchange(self, data: bytes) -> list[tuple[str, str]]:
        self.transport.clear()  # type: ignore[attr-defined]
        self.proto.dataReceived(data)  # type: ignore[attr-defined]
        return parse_replies(self.transport.value())  # type: ignore[attr-defined]

    def send_message(self, message: bytes = MESSAGE) -> tuple[str, str]:
        stuffed = b"".join(
            b"." + line if line.startswith(b".") else line
            for line in message.splitlines(keepends=True)
        )
        replies = self.exchange(
            b"MAIL FROM:<a@example.com> BODY=8BITMIME\r\n"
            b"RCPT TO:<b@example.com>\r\n"
            b"RCPT TO:<c@example.com>\r\n"
            b"DATA\r\n" + stuffed + b".\r\n"
        )
        assert [code for code, _ in replies[:4]] == ["250", "250", "250", "354"], replies
        [final] = replies[4:]
        return final


def listing(maildir: Path) -> dict[str, list[str]]:
    return {sub: sorted(os.listdir(maildir / sub)) for sub in ("tmp", "new", "cur", "envelope")}


def test_delivery_writes_trace_headers_then_the_exact_message(tmp_path: Path) -> None:
    """A file in new/ holds Return-Path:, Received: (queue id, client IP literal, 'with
    ESMTP') and then exactly the bytes the client sent (dot-unstuffed, 8-bit intact)."""
    maildir = tmp_path / "md"
    code, text = EdgeSession(maildir).send_message()
    assert code == "250"
    assert text.startswith("2.6.0 Message queued as ")
    queue_id = text.rsplit(" ", 1)[1]

    [name] = os.listdir(maildir / "new")
    content = (maildir / "new" / name).read_bytes()
    lines = content.split(b"\r\n")
    assert lines[0] == b"Return-Path: <a@example.com>"
    assert lines[1].startswith(b"Received: from client.test (unknown [192.0.2.7])")
    received_end = 2
    while lines[received_end].startswith(b"\t"):
        received_end += 1
    received = b"\r\n".join(lines[1:received_end])
    assert b"by mx.test" in received
    assert b"\twith ESMTP\r\n" in received
    assert f"\tid {queue_id}".encode() in received
    header_bytes = len(b"\r\n".join(lines[:received_end])) + 2
    assert content[header_bytes:] == MESSAGE
    assert listing(maildir)["tmp"] == []


def test_envelope_record_sits_beside_the_message(tmp_path: Path) -> None:
    """envelope/<same name>.json carries sender, recipients with params, client facts, the
    received time and the queue id that the client was given."""
    maildir = tmp_path / "md"
    before = time.time()
    _, text = EdgeSession(maildir).send_message()
    queue_id = text.rsplit(" ", 1)[1]
    [name] = os.listdir(maildir / "new")
    assert os.listdir(maildir / "envelope") == [f"{name}.json"]

    record = json.loads((maildir / "envelope" / f"{name}.json").read_text("utf-8"))
    assert record["queue_id"] == queue_id
    assert record["sender"] == "a@example.com"
    assert record["mail_params"] == {"BODY": "8BITMIME"}
    assert record["recipients"] == [
        {"address": "b@example.com", "params": {}},
        {"address": "c@example.com", "params": {}},
    ]
    assert record["client"] == {
        "ip": "192.0.2.7",
        "port": 40001,
        "name": None,
        "helo": "client.test",
    }
    assert record["protocol"] == "ESMTP"
    assert record["maildir_name"] == name
    assert record["size"] == len(MESSAGE)
    assert before <= record["received_at"] <= time.time()


def test_every_file_and_directory_is_fsynced_in_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The 250 comes only after the message file, the envelope file and both directories
    they were renamed into have been fsynced, the envelope before the message appears."""
    maildir = tmp_path / "md"
    session = EdgeSession(maildir)
    spy = StepSpy(str(maildir))
    spy.install(monkeypatch.setattr)
    code, _ = session.send_message()
    assert code == "250"
    # Writes come in chunks: count each run of writes once.
    assert [label for label, _ in groupby(spy.steps)] == list(DELIVERY_STEPS)


def test_fsync_false_skips_fsync_but_still_delivers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """fsync=False (benchmarks only) delivers the same file with no fsync at all."""
    maildir = tmp_path / "md"
    session = EdgeSession(maildir)
    session.bus.fsync = False
    spy = StepSpy(str(maildir))
    spy.install(monkeypatch.setattr)
    assert session.send_message()[0] == "250"
    assert not [step for step in spy.steps if step.startswith("fsync")]
    assert len(listing(maildir)["new"]) == 1


@pytest.mark.parametrize("step", DELIVERY_STEPS)
@pytest.mark.parametrize(
    "error", [errno.ENOSPC, errno.EACCES, errno.EIO], ids=["ENOSPC", "EACCES", "EIO"]
)
def test_disk_error_at_any_step_is_4xx_and_leaves_nothing_visible(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, step: str, error: int
) -> None:
    """Disk full, permission denied or an I/O error at any step: the client gets
    452 4.3.1 for a full disk (RFC 5321 4.3.2, RFC 3463 X.3.1) and 451 4.3.0 otherwise,
    new/ and envelope/ hold nothing, and the next message on the same connection is
    delivered normally."""
    maildir = tmp_path / "md"
    session = EdgeSession(maildir)
    spy = StepSpy(str(maildir), fail_at(step, error))
    spy.install(monkeypatch.setattr)

    code, text = session.send_message()
    expected = ("452", "4.3.1") if error == errno.ENOSPC else ("451", "4.3.0")
    assert (code, text.split(" ", 1)[0]) == expected
    assert step in spy.steps
    assert listing(maildir) == {"tmp": [], "new": [], "cur": [], "envelope": []}

    code, _ = session.send_message()
    assert code == "250"
    after = listing(maildir)
    assert len(after["new"]) == 1
    assert after["envelope"] == [f"{after['new'][0]}.json"]


def test_clean_removes_leftovers_of_interrupted_deliveries(tmp_path: Path) -> None:
    """clean() removes old files in tmp/ and envelope records (complete or half-written)
    whose message is nowhere; delivered mail, its envelope and fresh files stay."""
    maildir = tmp_path / "md"
    EdgeSession(maildir).send_message()
    bus = MaildirBus(str(maildir), run_in_thread=run_now)
    [delivered] = os.listdir(maildir / "new")
    long_ago = time.time() - 3 * 24 * 3600

    def leftover(path: Path, old: bool = True) -> Path:
        path.write_bytes(b"partial")
        if old:
            os.utime(path, (long_ago, long_ago))
        return path

    leftover(maildir / "tmp" / "1.M1P1Q1Rgone.host")
    leftover(maildir / "envelope" / "1.M2P1Q2Rgone.host.json")
    leftover(maildir / "envelope" / ".1.M3P1Q3Rgone.host.json.tmp")
    fresh = leftover(maildir / "tmp" / "2.M4P1Q4Rbusy.host", old=False)
    read = maildir / "cur" / "3.M5P1Q5Rread.host:2,S"
    read.write_bytes(b"read mail")
    kept_envelope = leftover(maildir / "envelope" / "3.M5P1Q5Rread.host.json")

    assert bus.clean() == 3
    assert listing(maildir) == {
        "tmp": [fresh.name],
        "new": [delivered],
        "cur": [read.name],
        "envelope": sorted([f"{delivered}.json", kept_envelope.name]),
    }
    assert bus.clean() == 0

"""MaildirBus: what a delivery leaves on disk, its syncs, its failures, group commit, cleanup.

Deliveries run through a real edge (StringTransport and Clock). The bus's writer is replaced
by a runner: synchronous (each message its own batch, the finished state on disk at once) or
stepped by hand (:class:`SteppedRunner`), which makes batching deterministic: messages whose
final dot arrives while a batch is "in flight" must form the next batch.
"""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import Clock

from slimta_tx.bus.maildir import MaildirBus, envelope_of, fsops, read_envelopes
from slimta_tx.factory import SmtpEdge
from slimta_tx.policy import Policy
from slimta_tx.testing import connect, parse_replies
from tests.support.faults import DELIVERY_STEPS, StepSpy, fail_at
from tests.support.logs import captured_events
from tests.support.mailbox import stored_messages

MESSAGE = (
    b"From: Ann <a@example.com>\r\n"
    b"To: Bob <b@example.com>\r\n"
    b"Subject: caf\xc3\xa9\r\n"
    b"\r\n"
    b"Hello Bob,\r\n"
    b".a line that started with a dot\r\n"
    b"\xe2\x82\xac 8-bit text\r\n"
)
TRANSACTION = (
    b"MAIL FROM:<a@example.com> BODY=8BITMIME\r\n"
    b"RCPT TO:<b@example.com>\r\n"
    b"RCPT TO:<c@example.com>\r\n"
    b"DATA\r\n"
)
# Sent after the 354 (content before it is improper pipelining: RFC 2920 3.1).
BODY = (
    b"".join(
        b"." + line if line.startswith(b".") else line
        for line in MESSAGE.splitlines(keepends=True)
    )
    + b".\r\n"
)


@pytest.fixture(params=["nameless", "tmp-then-rename"])
def naming(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both ways a message gets its name: a nameless file (O_TMPFILE) linked into new/, and
    where the system lacks that, tmp/<name> renamed into new/."""
    if request.param == "tmp-then-rename":
        monkeypatch.setattr(fsops, "tmpfile_supported", lambda tmp_dir: False)
    return str(request.param)


def run_now(f: Any) -> Deferred[Any]:
    return maybeDeferred(f)


class SteppedRunner:
    """The bus's two threads (writer, syncer), run a step at a time when the test says so."""

    def __init__(self) -> None:
        self.pending: list[tuple[Any, Deferred[Any]]] = []

    def __call__(self, f: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.pending.append((f, d))
        return d

    @staticmethod
    def label(f: Any) -> str:
        """``write N`` (a batch of N messages), ``sync N`` (the names of N batches), or
        ``commit 1`` (a message alone, written and synced by the writer)."""
        kind = {"write_envelopes": "write", "sync_names": "sync", "commit": "commit"}[
            f.func.__name__
        ]
        return f"{kind} {len(f.args[0])}"

    def labels(self) -> list[str]:
        return [self.label(f) for f, _ in self.pending]

    def run(self, label: str) -> None:
        """Run the first pending job that is ``label``."""
        index = self.labels().index(label)
        f, d = self.pending.pop(index)
        maybeDeferred(f).chainDeferred(d)

    def run_all(self) -> None:
        while self.pending:
            f, d = self.pending.pop(0)
            maybeDeferred(f).chainDeferred(d)


class Client:
    """One SMTP session against ``edge`` (StringTransport)."""

    def __init__(self, edge: SmtpEdge, port: int = 40001) -> None:
        self.proto, self.transport = connect(edge, ("192.0.2.7", port))
        self.exchange(b"EHLO client.test\r\n")

    def exchange(self, data: bytes) -> list[tuple[str, str]]:
        self.transport.clear()  # type: ignore[attr-defined]
        self.proto.dataReceived(data)  # type: ignore[attr-defined]
        return self.replies()

    def replies(self) -> list[tuple[str, str]]:
        return parse_replies(self.transport.value())  # type: ignore[attr-defined]

    def send_message(self) -> list[tuple[str, str]]:
        """MAIL, 2 RCPT, DATA and the body; returns the replies that came back so far."""
        replies = self.exchange(TRANSACTION)
        self.proto.dataReceived(BODY)  # type: ignore[attr-defined]
        replies = self.replies()  # kept since TRANSACTION: replies() reads them all
        assert [code for code, _ in replies[:4]] == ["250", "250", "250", "354"], replies
        return replies[4:]


def edge_for(bus: MaildirBus) -> SmtpEdge:
    policy = Policy(hostname="mx.test", accepted_domains=("example.com",))
    return SmtpEdge(bus, policy, reactor=Clock())


def deliver_one(maildir: Path, **bus_options: Any) -> tuple[MaildirBus, tuple[str, str]]:
    bus_options.setdefault("sync_mode", "per-file")
    bus = MaildirBus(str(maildir), run_in_thread=run_now, **bus_options)
    [final] = Client(edge_for(bus)).send_message()
    return bus, final


def listing(maildir: Path) -> dict[str, list[str]]:
    return {sub: sorted(os.listdir(maildir / sub)) for sub in ("tmp", "new", "cur")}


def test_delivery_writes_trace_headers_then_the_exact_message(tmp_path: Path) -> None:
    """A file in new/ holds Return-Path:, Received: (queue id, client IP literal, 'with
    ESMTP') and then exactly the bytes the client sent (dot-unstuffed, 8-bit intact)."""
    maildir = tmp_path / "md"
    _, (code, text) = deliver_one(maildir)
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


def test_envelope_record_is_in_the_journal_under_the_message_name(tmp_path: Path) -> None:
    """The envelope (sender, recipients with params, client facts, received time, the queue id
    the client was given) is one JSON line of envelope/*.jsonl, filed under the message's name
    in new/, and still found once a reader moved the message to cur/ with flags."""
    maildir = tmp_path / "md"
    before = time.time()
    _, (_, text) = deliver_one(maildir)
    queue_id = text.rsplit(" ", 1)[1]
    [name] = os.listdir(maildir / "new")
    [segment] = os.listdir(maildir / "envelope")
    assert segment.endswith(".jsonl")
    assert (
        (maildir / "envelope" / segment)
        .read_bytes()
        .startswith(b'{"maildir_name": "' + name.encode() + b'"')
    )

    record = envelope_of(maildir, name)
    assert record is not None
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

    os.rename(maildir / "new" / name, maildir / "cur" / f"{name}:2,S")
    assert envelope_of(maildir, f"{name}:2,S") == record
    assert read_envelopes(maildir) == {name: record}


def test_one_message_takes_each_step_once_in_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, naming: str
) -> None:
    """The 250 comes only after the message file is written, the envelope journal (a new
    segment, its name synced) written, one data sync covered both files, the message was
    named in new/ and new/ was synced."""
    maildir = tmp_path / "md"
    spy = StepSpy()
    spy.install(monkeypatch.setattr)
    _, (code, _) = deliver_one(maildir)
    assert code == "250"
    assert spy.steps == list(DELIVERY_STEPS)
    [(_, (_, fds))] = [call for call in spy.calls if call[0] == "sync data"]
    assert len(fds) == 2  # the message and the journal segment


def test_journal_mode_starts_each_writeback_at_once_and_only_waits_for_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """sync_mode journal (ext4 with a journal): the writeback of the message file and of the
    envelope journal starts as soon as each is written; the data sync then waits for both
    (sync_file_range), never fdatasync."""
    maildir = tmp_path / "md"
    spy = StepSpy()
    spy.install(monkeypatch.setattr)
    fdatasyncs: list[int] = []
    monkeypatch.setattr(os, "fdatasync", fdatasyncs.append)
    _, (code, _) = deliver_one(maildir, sync_mode="journal")
    assert code == "250"
    steps = list(DELIVERY_STEPS)
    steps.insert(steps.index("write message") + 1, "start writeback")
    steps.insert(steps.index("write envelope") + 1, "start writeback")
    assert spy.steps == steps
    assert fdatasyncs == []


def test_a_large_message_starts_its_writeback_before_the_batch_is_synced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In per-file mode a message of 64 KiB or more starts being written to the disk as soon
    as it is in its file, so that its writeback overlaps the rest of the batch."""
    maildir = tmp_path / "md"
    bus = MaildirBus(str(maildir), run_in_thread=run_now, sync_mode="per-file")
    client = Client(edge_for(bus))
    spy = StepSpy()
    spy.install(monkeypatch.setattr)
    big = b"Subject: big\r\n\r\n" + (b"y" * 78 + b"\r\n") * 1000
    client.exchange(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n")
    client.proto.dataReceived(big + b".\r\n")  # after the 354 (RFC 2920 3.1)
    replies = client.replies()
    assert [code for code, _ in replies] == ["250", "250", "354", "250"]
    assert spy.steps.index("start writeback") == spy.steps.index("write message") + 1
    [stored] = stored_messages(maildir)
    assert stored.body == big


def test_fsync_false_skips_every_sync_but_still_delivers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """fsync=False (benchmarks only) delivers the same file and envelope with no sync and no
    early writeback at all."""
    maildir = tmp_path / "md"
    spy = StepSpy()
    spy.install(monkeypatch.setattr)
    _, (code, _) = deliver_one(maildir, fsync=False)
    assert code == "250"
    assert not [step for step in spy.steps if step.startswith(("sync", "start"))]
    [stored] = stored_messages(maildir)
    assert stored.envelope is not None


@pytest.mark.parametrize("step", DELIVERY_STEPS)
@pytest.mark.parametrize(
    "error", [errno.ENOSPC, errno.EACCES, errno.EIO], ids=["ENOSPC", "EACCES", "EIO"]
)
def test_disk_error_at_any_step_is_4xx_and_leaves_nothing_visible(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, step: str, error: int, naming: str
) -> None:
    """Disk full, permission denied or an I/O error at any step: the client gets
    452 4.3.1 for a full disk (RFC 5321 4.3.2, RFC 3463 X.3.1) and 451 4.3.0 otherwise,
    new/ and tmp/ hold nothing, and the next message on the same connection is delivered
    normally, with its envelope."""
    maildir = tmp_path / "md"
    bus = MaildirBus(str(maildir), run_in_thread=run_now, sync_mode="per-file")
    client = Client(edge_for(bus))
    spy = StepSpy(fail_at(step, error))
    spy.install(monkeypatch.setattr)

    [(code, text)] = client.send_message()
    expected = ("452", "4.3.1") if error == errno.ENOSPC else ("451", "4.3.0")
    assert (code, text.split(" ", 1)[0]) == expected
    assert step in spy.steps
    assert listing(maildir) == {"tmp": [], "new": [], "cur": []}

    [(code, _)] = client.send_message()
    assert code == "250"
    [stored] = stored_messages(maildir)
    assert stored.body == MESSAGE
    assert stored.envelope is not None
    assert listing(maildir)["tmp"] == []


def test_messages_arriving_during_a_commit_are_committed_together_in_the_next(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, naming: str
) -> None:
    """A message alone is written and synced in one go by the writer. The final dots of
    three more clients that arrive meanwhile wait (no reply yet) and then share one batch:
    one data sync for their three files and the journal, one fsync of new/ (by the syncer,
    while the writer already writes the next batch); every reply comes only after its
    batch's fsync of new/."""
    maildir = tmp_path / "md"
    runner = SteppedRunner()
    bus = MaildirBus(str(maildir), run_in_thread=runner, sync_mode="per-file")
    edge = edge_for(bus)
    clients = [Client(edge, 40001 + i) for i in range(8)]
    spy = StepSpy()
    spy.install(monkeypatch.setattr)

    assert clients[0].send_message() == []
    assert runner.labels() == ["commit 1"]  # a message alone: written and synced at once
    for client in clients[1:4]:
        assert client.send_message() == []  # queued behind it: no reply yet
    assert runner.labels() == ["commit 1"]
    runner.run("commit 1")
    assert [code for code, _ in clients[0].replies()[4:]] == ["250"]
    assert runner.labels() == ["write 3"]

    runner.run("write 3")
    assert runner.labels() == ["sync 1"]
    for client in clients[4:]:
        client.send_message()
    assert runner.labels() == ["sync 1", "write 1"]  # both stages at once
    runner.run("write 1")  # written; waits for the syncer
    assert runner.labels() == ["sync 1", "write 3"]  # and the writer goes on
    runner.run("write 3")
    assert all(client.replies()[4:] == [] for client in clients[1:])
    runner.run("sync 1")
    for client in clients[1:4]:
        assert [code for code, _ in client.replies()[4:]] == ["250"]
    assert all(client.replies()[4:] == [] for client in clients[4:])
    runner.run("sync 2")  # one fsync of new/ for both batches written meanwhile
    for client in clients[4:]:
        assert [code for code, _ in client.replies()[4:]] == ["250"]

    data_syncs = [args for label, args in spy.calls if label == "sync data"]
    assert [len(fds) for _, fds in data_syncs] == [2, 4, 2, 4]  # files + the journal
    assert spy.steps.count("sync new/") == 3
    assert (bus.store.stats.batches, bus.store.stats.messages) == (4, 8)
    stored = stored_messages(maildir)
    assert len(stored) == 8
    assert all(s.body == MESSAGE and s.envelope is not None for s in stored)


def test_one_sync_of_new_covers_every_batch_written_meanwhile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While the syncer is busy, the writer writes two more batches; the next fsync of new/
    makes both durable at once, and only then are their clients answered."""
    maildir = tmp_path / "md"
    runner = SteppedRunner()
    bus = MaildirBus(str(maildir), run_in_thread=runner, sync_mode="per-file")
    edge = edge_for(bus)
    clients = [Client(edge, 40001 + i) for i in range(5)]
    spy = StepSpy()
    spy.install(monkeypatch.setattr)

    for client in clients[:3]:
        client.send_message()
    runner.run("commit 1")  # the first alone
    runner.run("write 2")  # the two queued meanwhile: their sync is pending
    assert runner.labels() == ["sync 1"]
    clients[3].send_message()
    runner.run("write 1")  # written, waits for the syncer
    clients[4].send_message()
    runner.run("write 1")  # so does the next
    assert runner.labels() == ["sync 1"]
    runner.run("sync 1")
    assert runner.labels() == ["sync 2"]  # the two written meanwhile, together
    assert [client.replies()[4:] for client in clients[3:]] == [[], []]
    runner.run("sync 2")
    assert all([c for c, _ in client.replies()[4:]] == ["250"] for client in clients)
    assert spy.steps.count("sync data") == 4
    assert spy.steps.count("sync new/") == 3
    assert bus.store.stats.dir_syncs == 3


@pytest.mark.parametrize(
    ("step", "occurrence"),
    [("write message", 2), ("sync data", 1), ("publish message", 2), ("sync new/", 1)],
)
def test_a_failure_in_a_batch_is_451_for_every_message_in_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, step: str, occurrence: int, naming: str
) -> None:
    """A disk error anywhere in a batch of three (even after the first of them was named
    into new/, or in the fsync of new/ after all of them were) answers 451 4.3.0 to all
    three and leaves none of them in new/ or tmp/; the next batch is delivered."""
    maildir = tmp_path / "md"
    runner = SteppedRunner()
    bus = MaildirBus(str(maildir), run_in_thread=runner, sync_mode="per-file")
    edge = edge_for(bus)
    first, *batch = [Client(edge, 40001 + i) for i in range(4)]
    first.send_message()
    for client in batch:
        client.send_message()
    runner.run("commit 1")  # the first message alone: delivered
    assert [code for code, _ in first.replies()[4:]] == ["250"]
    spy = StepSpy(fail_at(step, errno.EIO, occurrence))
    spy.install(monkeypatch.setattr)

    runner.run_all()
    for client in batch:
        [(code, text)] = client.replies()[4:]
        assert (code, text.split(" ", 1)[0]) == ("451", "4.3.0")
    assert listing(maildir)["tmp"] == []
    assert len(listing(maildir)["new"]) == 1

    assert batch[0].send_message() == []
    runner.run_all()
    assert [code for code, _ in batch[0].replies()[4:]] == ["250"]
    assert len(stored_messages(maildir)) == 2


def test_clean_removes_leftovers_of_interrupted_deliveries(tmp_path: Path) -> None:
    """clean() removes old files in tmp/, a tmp/ name left beside the same file in new/,
    journal segments nobody writes to whose messages are all gone, and envelope files of
    older releases whose message is gone; delivered mail, the journal that has its envelope,
    fresh files and envelopes of mail in cur/ stay."""
    maildir = tmp_path / "md"
    bus, _ = deliver_one(maildir)
    [delivered] = os.listdir(maildir / "new")
    [live_segment] = os.listdir(maildir / "envelope")
    long_ago = time.time() - 3 * 24 * 3600

    def leftover(path: Path, content: bytes = b"partial", old: bool = True) -> Path:
        path.write_bytes(content)
        if old:
            os.utime(path, (long_ago, long_ago))
        return path

    leftover(maildir / "tmp" / "1.M1P1Q1Rgone.host")
    os.link(maildir / "new" / delivered, maildir / "tmp" / delivered)  # a cut-short rename
    leftover(maildir / "envelope" / "1.M2P1Q2Rgone.host.json")
    leftover(maildir / "envelope" / ".1.M3P1Q3Rgone.host.json.tmp")
    leftover(maildir / "envelope" / "1.M9P1Q1.host.jsonl", b'{"maildir_name": "gone"}\n')
    fresh = leftover(maildir / "tmp" / "2.M4P1Q4Rbusy.host", old=False)
    read = maildir / "cur" / "3.M5P1Q5Rread.host:2,S"
    read.write_bytes(b"read mail")
    kept_envelope = leftover(maildir / "envelope" / "3.M5P1Q5Rread.host.json")
    kept_segment = leftover(
        maildir / "envelope" / "1.M8P1Q1.host.jsonl",
        b'{"maildir_name": "3.M5P1Q5Rread.host"}\n{"maildir_name": "gone"}\n',
    )
    os.utime(maildir / "envelope" / live_segment, (long_ago, long_ago))

    with captured_events() as events:
        assert bus.start() is not None
    bus.stop()
    removed = {
        "tmp/1.M1P1Q1Rgone.host",
        f"tmp/{delivered}",
        "envelope/1.M2P1Q2Rgone.host.json",
        "envelope/.1.M3P1Q3Rgone.host.json.tmp",
        "envelope/1.M9P1Q1.host.jsonl",
    }
    [logged] = [e for e in events if e.get("removed")]
    assert set(logged["removed"]) == removed
    assert logged["count"] == 5
    assert listing(maildir) == {"tmp": [fresh.name], "new": [delivered], "cur": [read.name]}
    assert sorted(os.listdir(maildir / "envelope")) == sorted(
        [live_segment, kept_envelope.name, kept_segment.name]
    )
    assert bus.clean() == 0


def test_the_segment_in_use_is_never_cleaned_and_old_ones_go_with_their_mail(
    tmp_path: Path,
) -> None:
    """The journal segment the bus appends to stays however old it looks; once its bus
    moved on to a new segment and the mail it describes was deleted, it goes."""
    maildir = tmp_path / "md"
    bus, _ = deliver_one(maildir)
    [segment] = os.listdir(maildir / "envelope")
    long_ago = time.time() - 3 * 24 * 3600
    [name] = os.listdir(maildir / "new")
    os.unlink(maildir / "new" / name)
    os.utime(maildir / "envelope" / segment, (long_ago, long_ago))
    assert bus.clean() == 0  # still the bus's own segment

    assert bus.store.journal is not None
    bus.store.journal.max_age = 0  # the next batch starts a new segment
    Client(edge_for(bus)).send_message()
    assert len(os.listdir(maildir / "envelope")) == 2
    assert bus.clean() == 1
    assert segment not in os.listdir(maildir / "envelope")
    assert len(stored_messages(maildir)) == 1


def test_a_started_bus_cleans_at_start_and_then_periodically(tmp_path: Path) -> None:
    """start() cleans at once and then every clean_interval seconds of the reactor's clock,
    logging what went; stop() ends the schedule."""
    maildir = tmp_path / "md"
    clock = Clock()
    bus = MaildirBus(str(maildir), reactor=clock, run_in_thread=run_now, clean_interval=60)
    long_ago = time.time() - 3 * 24 * 3600

    def leftover(name: str) -> None:
        path = maildir / "tmp" / name
        path.write_bytes(b"x")
        os.utime(path, (long_ago, long_ago))

    leftover("1.M1P1Q1Rone.host")
    with captured_events() as events:
        bus.start()
        leftover("1.M1P1Q2Rtwo.host")
        clock.advance(59)
        assert os.listdir(maildir / "tmp") == ["1.M1P1Q2Rtwo.host"]
        clock.advance(1)
        assert os.listdir(maildir / "tmp") == []
        bus.stop()
        leftover("1.M1P1Q3Rthree.host")
        clock.advance(120)
    assert [e["removed"] for e in events if e.get("removed")] == [
        ["tmp/1.M1P1Q1Rone.host"],
        ["tmp/1.M1P1Q2Rtwo.host"],
    ]
    assert os.listdir(maildir / "tmp") == ["1.M1P1Q3Rthree.host"]


def test_sync_mode_is_checked_and_reported(tmp_path: Path) -> None:
    """sync_mode is auto (per-file or journal, detected), per-file or journal; anything else
    is refused."""
    bus = MaildirBus(str(tmp_path / "a"), run_in_thread=run_now)
    assert bus.sync_mode in ("per-file", "journal")
    assert MaildirBus(str(tmp_path / "b"), sync_mode="per-file").sync_mode == "per-file"
    with pytest.raises(ValueError, match="sync_mode"):
        MaildirBus(str(tmp_path / "c"), sync_mode="never")


def test_clean_skips_a_tmp_file_delivered_while_it_reads_the_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file that leaves tmp/ between the directory listing and its stat (a delivery's rename,
    another cleaner) is skipped: the clean-up goes on and removes the other leftovers."""
    from slimta_tx.bus.maildir import clean as clean_module

    maildir = tmp_path / "md"
    bus, _ = deliver_one(maildir)
    long_ago = time.time() - 3 * 24 * 3600
    for name in ("1.M1P1Q1Rgone.host", "2.M2P1Q2Rmoving.host"):
        (maildir / "tmp" / name).write_bytes(b"partial")
        os.utime(maildir / "tmp" / name, (long_ago, long_ago))
    real_scandir = os.scandir

    def scandir_racing_a_delivery(path: Any) -> list[os.DirEntry[str]]:
        entries = list(real_scandir(path))
        if str(path).endswith("tmp"):
            os.unlink(maildir / "tmp" / "2.M2P1Q2Rmoving.host")  # gone before its stat
        return entries

    monkeypatch.setattr(clean_module.os, "scandir", scandir_racing_a_delivery)
    assert bus.clean() == 1
    assert os.listdir(maildir / "tmp") == []

"""The Maildir bus's parts on their own: the parallel sync, the file-system detection, the
envelope journal's readers and segments, the writer thread."""

from __future__ import annotations

import errno
import json
import os
import platform
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from slimta_tx.bus.maildir import MaildirBus, _linux, durability, fsops
from slimta_tx.bus.maildir.journal import EnvelopeJournal, envelope_of, read_envelopes
from slimta_tx.envelope import Envelope
from slimta_tx.reply import Reply
from slimta_tx.spool import Spool

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux calls")


def files(tmp_path: Path, count: int) -> list[int]:
    fds = []
    for i in range(count):
        fd = os.open(tmp_path / f"f{i}", os.O_WRONLY | os.O_CREAT, 0o600)
        os.write(fd, b"x" * 100)
        fds.append(fd)
    return fds


@linux_only
def test_parallel_sync_syncs_every_file_and_reports_a_bad_one(tmp_path: Path) -> None:
    """fdatasync of many files through one io_submit: all succeed; a closed descriptor among
    them is an OSError (EBADF), not silently skipped; more files than its capacity work."""
    parallel = _linux.ParallelSync.create(capacity=4)
    if parallel is None:
        assert platform.machine() not in ("x86_64", "aarch64") or os.environ.get("CI") != "true"
        pytest.skip("Linux AIO is not available here (io_setup refused)")
    fds = files(tmp_path, 9)
    try:
        parallel.fdatasync(fds)  # 3 rounds of at most 4
        os.close(fds[5])
        with pytest.raises(OSError) as raised:
            parallel.fdatasync(fds)
        assert raised.value.errno == errno.EBADF
    finally:
        for fd in fds[:5] + fds[6:]:
            os.close(fd)
        parallel.close()


@linux_only
def test_sync_file_range_waits_and_reports_errors(tmp_path: Path) -> None:
    """sync_file_range writes a file's data out; on a descriptor that is not a file it
    raises the kernel's error (ESPIPE for a pipe)."""
    [fd] = files(tmp_path, 1)
    try:
        _linux.sync_file_range(fd, _linux.SYNC_FILE_RANGE_WAIT)
    finally:
        os.close(fd)
    read, write = os.pipe()
    try:
        with pytest.raises(OSError) as raised:
            _linux.sync_file_range(read, _linux.SYNC_FILE_RANGE_WRITE)
        assert raised.value.errno == errno.ESPIPE
    finally:
        os.close(read)
        os.close(write)


@pytest.mark.parametrize("mode", ["per-file", "journal"])
def test_data_sync_modes_use_the_calls_they_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    """per-file: fdatasync of every file (all at once when AIO is there); journal: a wait for
    each file's writeback, and no fdatasync at all."""
    calls: list[tuple[str, int]] = []
    real_fdatasync = os.fdatasync
    monkeypatch.setattr(os, "fdatasync", lambda fd: calls.append(("fdatasync", fd)))
    monkeypatch.setattr(
        _linux, "sync_file_range", lambda fd, flags: calls.append((f"sfr {flags}", fd))
    )
    monkeypatch.setattr(
        _linux.ParallelSync, "fdatasync", lambda self, fds: calls.extend(("aio", f) for f in fds)
    )
    fds = files(tmp_path, 3)
    try:
        sync = fsops.DataSync(mode)
        sync.sync(fds)
        sync.close()
    finally:
        for fd in fds:
            real_fdatasync(fd)
            os.close(fd)
    if mode == "journal":
        assert calls == [(f"sfr {_linux.SYNC_FILE_RANGE_WAIT}", fd) for fd in fds]
    else:
        assert {name for name, _ in calls} <= {"aio", "fdatasync"}
        assert [fd for _, fd in calls] == fds


MOUNTINFO = """\
22 27 0:21 / /proc rw,relatime - proc proc rw
27 1 254:0 / / rw,relatime - ext4 /dev/vda rw,discard
45 27 7:0 / /var/mail rw,relatime shared:1 - ext4 /dev/loop0 rw
46 27 0:40 / /tmp rw - tmpfs tmpfs rw
"""


def test_mountinfo_and_ext4_options_are_read_as_the_kernel_writes_them() -> None:
    """The file system type comes from the mountinfo line of the device (optional fields
    before the '-' are skipped); ext4 lists data= only when it has a journal."""
    assert durability.mount_fstype(MOUNTINFO, "254:0") == "ext4"
    assert durability.mount_fstype(MOUNTINFO, "7:0") == "ext4"
    assert durability.mount_fstype(MOUNTINFO, "0:40") == "tmpfs"
    assert durability.mount_fstype(MOUNTINFO, "8:1") is None
    assert durability.data_mode("rw bsddf barrier data=ordered commit=5") == "ordered"
    assert durability.data_mode("rw bsddf nojournal_checksum barrier commit=5") is None


def fake_proc(tmp_path: Path, fstype: str, options: str) -> tuple[Path, Path, Path]:
    """A /proc and /sys that say the directory ``maildir`` is on ``fstype`` (device 'vdx')."""
    maildir = tmp_path / "maildir"
    maildir.mkdir()
    st = os.stat(maildir)
    device = f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
    proc, sys_ = tmp_path / "proc", tmp_path / "sys"
    (proc / "self").mkdir(parents=True)
    (proc / "self" / "mountinfo").write_text(f"1 0 {device} / / rw - {fstype} /dev/vdx rw\n")
    (proc / "fs" / "ext4" / "vdx").mkdir(parents=True)
    (proc / "fs" / "ext4" / "vdx" / "options").write_text(options)
    (sys_ / "dev" / "block").mkdir(parents=True)
    (sys_ / "block" / "vdx").mkdir(parents=True)
    os.symlink(sys_ / "block" / "vdx", sys_ / "dev" / "block" / device)
    return maildir, proc, sys_


@pytest.mark.parametrize(
    ("fstype", "options", "expected"),
    [
        ("ext4", "rw barrier data=ordered\n", "ordered"),
        ("ext4", "rw data=writeback\n", "writeback"),
        ("ext4", "rw data=journal\n", "journal"),
        ("ext4", "rw nojournal_checksum\n", None),
        ("xfs", "", None),
    ],
)
def test_ext4_journal_mode_follows_the_device_to_its_options(
    tmp_path: Path, fstype: str, options: str, expected: str | None
) -> None:
    """The device of the directory -> its mount's type -> /sys/dev/block name ->
    /proc/fs/ext4/<name>/options -> data= mode."""
    maildir, proc, sys_ = fake_proc(tmp_path, fstype, options)
    assert durability.ext4_journal_mode(str(maildir), str(proc), str(sys_)) == expected


def test_detect_picks_journal_only_for_ext4_with_ordered_or_writeback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """auto is journal for data=ordered and data=writeback, per-file for anything else and
    whenever the answer cannot be read."""
    cases = [
        ("ordered", "journal"),
        ("writeback", "journal"),
        ("journal", "per-file"),
        (None, "per-file"),
    ]
    for mode, expected in cases:
        monkeypatch.setattr(durability, "ext4_journal_mode", lambda path, m=mode: m)
        assert durability.detect(str(tmp_path)) == expected

    def unreadable(path: str) -> str:
        raise OSError(errno.ENOENT, "no /proc")

    monkeypatch.setattr(durability, "ext4_journal_mode", unreadable)
    assert durability.detect(str(tmp_path)) == "per-file"
    assert durability.detect(str(tmp_path)) in ("per-file", "journal")


def envelope_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "envelope"
    directory.mkdir()
    return directory


def test_readers_skip_a_line_cut_short_and_find_old_envelope_files(tmp_path: Path) -> None:
    """A segment's last line without its newline (a crash during the write) is not a record;
    nor is a damaged line in the middle; per-message .json files of older releases are read
    too; a cur/ name with flags finds its record."""
    directory = envelope_dir(tmp_path)
    (directory / "1.M1P1Q1.host.jsonl").write_bytes(
        b'{"maildir_name": "a", "queue_id": "A"}\n'
        b'{"maildir_name": "b", "queu\n'
        b'{"maildir_name": "c", "queue_id": "C"}\n'
        b'{"maildir_name": "d", "queue_id": "D"'
    )
    (directory / "old.json").write_text(json.dumps({"queue_id": "OLD"}))
    (directory / ".half.json.tmp").write_text("{")
    found = read_envelopes(tmp_path)
    assert found == {
        "a": {"maildir_name": "a", "queue_id": "A"},
        "c": {"maildir_name": "c", "queue_id": "C"},
        "old": {"queue_id": "OLD"},
    }
    assert envelope_of(tmp_path, "c:2,S") == found["c"]
    assert envelope_of(tmp_path, "old:2,") == {"queue_id": "OLD"}
    assert envelope_of(tmp_path, "d") is None


def test_a_journal_segment_rotates_on_age_and_size(tmp_path: Path) -> None:
    """A writer appends to one segment until it is max_age old or max_bytes big, then starts
    a new one (abandoning one after a failure does the same)."""
    directory = envelope_dir(tmp_path)
    now = [1000.0]
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    journal = EnvelopeJournal(dir_fd, "host", clock=lambda: now[0], max_age=60, max_bytes=100)
    try:
        journal.prepare()
        journal.append(b"x" * 10 + b"\n")
        first = journal.name
        journal.prepare()
        assert journal.name == first
        now[0] += 61
        journal.prepare()
        second = journal.name
        assert second != first
        journal.append(b"y" * 100 + b"\n")
        journal.prepare()
        third = journal.name
        assert third != second
        journal.abandon()
        journal.prepare()
        assert journal.name not in (first, second, third)
        assert len(os.listdir(directory)) == 4
    finally:
        journal.close()
        os.close(dir_fd)


class FakeReactor:
    """Collects what the writer thread hands back; the test runs it in its own thread."""

    def __init__(self) -> None:
        self.calls: list[Any] = []
        self.done = 0
        self.changed = threading.Condition()

    def callFromThread(self, f: Any, *args: Any) -> None:
        with self.changed:
            self.calls.append((f, args))
            self.changed.notify_all()

    def run_when(self, count: int) -> None:
        with self.changed:
            assert self.changed.wait_for(lambda: len(self.calls) >= count, timeout=10)
            calls = self.calls[self.done :]
            self.done = len(self.calls)
        for f, args in calls:
            f(*args)


def message(n: int) -> Envelope:
    envelope = Envelope(sender="a@example.com", recipients=["b@example.com"], rcpt_params=[{}])
    envelope.message = Spool()
    envelope.message.write(b"Subject: %d\r\n\r\nbody\r\n" % n)
    return envelope


def held_bus(tmp_path: Path) -> tuple[MaildirBus, FakeReactor, threading.Event]:
    """A bus on its own threads whose writer is held (running a job that waits) until the
    test sets the returned event."""
    reactor = FakeReactor()
    bus = MaildirBus(str(tmp_path / "md"), reactor=reactor, sync_mode="per-file")
    release = threading.Event()
    assert bus._pipeline is not None
    bus._pipeline.run(lambda: release.wait(10))
    return bus, reactor, release


def test_the_writer_takes_everything_queued_as_one_batch(tmp_path: Path) -> None:
    """Twenty messages queued while the writer is busy are written as one batch and synced
    by one fsync of new/ (the writer syncs it itself: nothing else is waiting); every one
    gets its 250 through callFromThread, once for the whole group."""
    bus, reactor, release = held_bus(tmp_path)
    replies: list[Reply] = []
    for n in range(20):
        bus.send(message(n)).addCallback(replies.append)
    release.set()
    reactor.run_when(2)  # the job's result, then the batch's
    assert [r.code for r in replies] == ["250"] * 20
    stats = bus.store.stats
    assert (stats.batches, stats.messages, stats.data_syncs, stats.dir_syncs) == (1, 20, 1, 1)
    bus.stop()
    reactor.run_when(3)
    assert len(os.listdir(tmp_path / "md" / "new")) == 20


def test_a_failed_sync_of_new_answers_451_to_its_whole_group(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On the bus's own threads too: when the fsync of new/ fails, every message it covered
    gets 451 4.3.0 and is taken back out of new/."""
    bus, reactor, release = held_bus(tmp_path)

    def fail(new_dir: int) -> None:
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(fsops, "sync_new", fail)
    replies: list[Reply] = []
    for n in range(3):
        bus.send(message(n)).addCallback(replies.append)
    release.set()
    reactor.run_when(2)
    assert [(r.code, r.enhanced_status_code) for r in replies] == [("451", "4.3.0")] * 3
    assert os.listdir(tmp_path / "md" / "new") == []
    bus.stop()
    reactor.run_when(3)


def test_cleaning_runs_between_batches_in_the_writer(tmp_path: Path) -> None:
    """A clean (start-up, hourly) queued behind a message runs after that message's batch
    was written and before the next message's: it never sees a batch half-written."""
    bus, reactor, release = held_bus(tmp_path)
    written_when_cleaning: list[int] = []
    replies: list[Reply] = []
    bus.send(message(1)).addCallback(replies.append)
    assert bus._pipeline is not None
    bus._pipeline.run(lambda: written_when_cleaning.append(bus.store.stats.messages))
    bus.send(message(2)).addCallback(replies.append)
    release.set()
    reactor.run_when(4)  # two job results, two batches
    assert written_when_cleaning == [1]
    assert [r.code for r in replies] == ["250", "250"]
    bus.stop()
    reactor.run_when(5)


class NoThreadPoolReactor(FakeReactor):
    def getThreadPool(self) -> Any:
        raise AssertionError("the Maildir bus must not use the reactor's thread pool")


def test_the_bus_commits_in_its_own_thread_not_the_reactor_pool(tmp_path: Path) -> None:
    """The default writer and syncer are threads of the bus (the reactor's pool, which the
    AMQP bus and name resolution use, is never asked for): a message sent without a runner is
    stored from them and its 250 comes back through callFromThread."""
    reactor = NoThreadPoolReactor()
    bus = MaildirBus(str(tmp_path / "md"), reactor=reactor)
    envelope = Envelope(sender="a@example.com", recipients=["b@example.com"], rcpt_params=[{}])
    envelope.message = Spool()
    envelope.message.write(b"Subject: own thread\r\n\r\nbody\r\n")
    replies: list[Reply] = []
    bus.send(envelope).addCallback(replies.append)
    reactor.run_when(1)  # written and synced (a message alone: all in the writer thread)
    assert [r.code for r in replies] == ["250"]
    stopped: list[object] = []
    bus.stop().addCallback(stopped.append)
    reactor.run_when(2)  # the writer ended (the syncer never had to start)
    assert stopped == [None]
    assert len(os.listdir(tmp_path / "md" / "new")) == 1

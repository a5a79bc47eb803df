"""A spool or Maildir that cannot write (issue 11): a 4xx after the end of data, one log line,
and a session that goes on. Each case twice: with an injected ``OSError`` and on a really full
filesystem (a small tmpfs, see tests/support/tmpfs.py)."""

from __future__ import annotations

import errno
import os
import smtplib
import tempfile
from pathlib import Path
from typing import Any

import pytest
from smtp_driver import Driver
from twisted.internet.task import Clock
from twisted.logger import LogLevel, formatEvent

from slimta_tx import Policy, SmtpEdge
from slimta_tx.bus.maildir import MaildirBus
from slimta_tx.spool import Spool, storage_failure_reply
from slimta_tx.testing import connect, parse_replies
from tests.support.logs import captured_events
from tests.support.process import TWISTD, running_twistd
from tests.support.tmpfs import fill, free_bytes, small_tmpfs

FULL = ("452", "4.3.1 Insufficient system storage; try again later")
LOCAL_ERROR = ("451", "4.3.0 Local error in processing; try again later")
ENVELOPE = b"MAIL FROM:<a@sender.test>\r\nRCPT TO:<u@example.com>\r\nDATA\r\n"
LINE = b"x" * 78 + b"\r\n"


def body(size: int) -> bytes:
    return LINE * (size // len(LINE) + 1) + b".\r\n"


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


class BrokenFile:
    """A spool file whose writes fail with ``error`` after ``room`` bytes."""

    def __init__(self, error: int, room: int = 0) -> None:
        self.error = error
        self.room = room
        self.closed = False

    def write(self, data: Any) -> int:
        if self.room <= 0:
            raise OSError(self.error, os.strerror(self.error))
        taken = min(self.room, len(data))
        self.room -= taken
        return taken

    def close(self) -> None:
        self.closed = True


def storage_errors(events: list[dict[str, Any]]) -> list[str]:
    return [
        formatEvent(e)
        for e in events
        if e.get("log_level") in (LogLevel.error, LogLevel.critical)
        or e.get("isError")
        or "log_failure" in e
    ]


# -- the replies ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "reply"),
    [
        (errno.ENOSPC, FULL),
        (errno.EDQUOT, FULL),
        (errno.EIO, LOCAL_ERROR),
        (errno.EMFILE, LOCAL_ERROR),
        (errno.EACCES, LOCAL_ERROR),
    ],
)
def test_storage_failure_reply(error: int, reply: tuple[str, str]) -> None:
    """No room is 452 4.3.1 (RFC 5321 4.3.2: insufficient system storage; RFC 3463 X.3.1);
    any other error is 451 4.3.0. Both are temporary: the client keeps the message."""
    got = storage_failure_reply(OSError(error, os.strerror(error)))
    assert (got.code, f"{got.enhanced_status_code} {got.message}") == reply


# -- the spool, injected errors ------------------------------------------------------------


def test_spool_write_error_is_kept_and_later_writes_ignored(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The first error is kept, the file is closed at once, the rest is ignored (not raised),
    and the body cannot be read as if it were whole."""
    broken = BrokenFile(errno.ENOSPC, room=15)
    monkeypatch.setattr("slimta_tx.spool.tempfile.TemporaryFile", lambda **kw: broken)
    spool = Spool(memory_limit=10)
    spool.write(b"0123456789")
    spool.write(b"abcdefghij")
    assert spool.error is not None and spool.error.errno == errno.ENOSPC
    assert broken.closed
    spool.write(b"more")
    assert spool.size == 24
    with pytest.raises(OSError, match="not stored"):
        spool.read()
    spool.close()


@pytest.mark.parametrize(
    ("where", "error", "reply"),
    [
        ("write", errno.ENOSPC, FULL),
        ("write", errno.EIO, LOCAL_ERROR),
        ("create", errno.EMFILE, LOCAL_ERROR),
        ("create", errno.ENOSPC, FULL),
    ],
)
def test_spool_error_during_data_is_a_4xx_after_the_end(
    monkeypatch: pytest.MonkeyPatch, where: str, error: int, reply: tuple[str, str]
) -> None:
    """The body is read to its end, then the 4xx; nothing goes to the bus; one error line in
    the log (no traceback); the next message on the same connection is accepted."""

    def temporary_file(**kwargs: Any) -> Any:
        if where == "create":
            raise OSError(error, os.strerror(error))
        return BrokenFile(error, room=1000)

    d = Driver(policy=Policy(hostname="mx.test", accepted_domains=("example.com",)))
    d.edge.spool_factory.memory_limit = 1000
    d.start_data()
    with monkeypatch.context() as patch, captured_events() as events:
        patch.setattr("slimta_tx.spool.tempfile.TemporaryFile", temporary_file)
        assert d.send(body(5000)[:-3]) == []
        assert d.send(b".\r\n") == [reply]
    assert d.bus.messages == []
    assert not d.closed
    [line] = storage_errors(events)
    assert "message not stored: spool write failed" in line
    assert os.strerror(error) in line
    assert f"answered {reply[0]} {reply[1].split()[0]}" in line
    assert d.codes(ENVELOPE) + d.codes(body(5000)) == ["250", "250", "354", "250"]
    assert len(d.bus.messages) == 1


def test_spool_error_during_bdat_refuses_that_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    """BDAT: the chunk whose octets could not be stored gets the 4xx (the client stops
    sending, RFC 3030); later chunks of that transaction get 503; a new one works."""
    monkeypatch.setattr(
        "slimta_tx.spool.tempfile.TemporaryFile", lambda **kw: BrokenFile(errno.ENOSPC)
    )
    d = Driver()
    d.edge.spool_factory.memory_limit = 100
    d.greet()
    assert d.codes(b"MAIL FROM:<a@sender.test>\r\nRCPT TO:<u@example.com>\r\n") == ["250", "250"]
    assert d.codes(b"BDAT 80\r\n" + LINE) == ["250"]
    assert d.send(b"BDAT 80\r\n" + LINE) == [FULL]
    assert d.codes(b"BDAT 80 LAST\r\n" + LINE)[0] == "503"
    monkeypatch.undo()
    replies = d.codes(b"MAIL FROM:<a@sender.test>\r\nRCPT TO:<u@example.com>\r\nBDAT 80 LAST\r\n")
    assert replies == ["250", "250"]
    assert d.codes(LINE) == ["250"]
    assert len(d.bus.messages) == 1


# -- really full filesystems ---------------------------------------------------------------


def test_spool_on_a_full_tmpfs_answers_452_and_frees_its_blocks() -> None:
    """A body larger than the spool's filesystem: 452 4.3.1 after the end of data; the
    temporary file is gone (its blocks free again, no descriptor left open); a message that
    fits is then accepted on the same connection."""
    with small_tmpfs(256) as spool_dir:
        empty = free_bytes(spool_dir)
        fds = open_fds()
        policy = Policy(
            hostname="mx.test",
            accepted_domains=("example.com",),
            spool_directory=str(spool_dir),
            spool_memory_limit=16 * 1024,
        )
        d = Driver(policy=policy)
        d.start_data()
        with captured_events() as events:
            for _ in range(60):  # 60 x 8 KiB: more than the 256 KiB filesystem holds
                assert d.send(LINE * 105) == []
            assert d.send(b".\r\n") == [FULL]
        assert "No space left on device" in storage_errors(events)[0]
        assert free_bytes(spool_dir) == empty
        assert open_fds() == fds
        assert d.codes(ENVELOPE) + d.codes(body(100 * 1024)) == ["250", "250", "354", "250"]
        assert len(d.bus.messages) == 1
        assert d.bus.messages[0].data.count(LINE) >= 100 * 1024 // len(LINE)


def test_maildir_on_a_full_tmpfs_answers_452_and_keeps_nothing_partial() -> None:
    """Maildir on a full filesystem: 452 4.3.1, nothing in new/ or envelope/, one log line;
    after room is made the same session delivers."""
    with small_tmpfs(512) as root:
        maildir = root / "md"
        bus = MaildirBus(str(maildir), run_in_thread=_run_now)
        edge = SmtpEdge(
            bus, Policy(hostname="mx.test", accepted_domains=("example.com",)), reactor=Clock()
        )
        proto, transport = connect(edge)

        def exchange(data: bytes) -> list[tuple[str, str]]:
            transport.clear()
            proto.dataReceived(data)  # type: ignore[attr-defined]
            return parse_replies(transport.value())

        exchange(b"EHLO client.test\r\n")
        filler = fill(root, leave=20 * 1024)
        with captured_events() as events:
            exchange(ENVELOPE)
            replies = exchange(body(64 * 1024))  # after the 354
        assert replies[-1] == FULL
        assert os.listdir(maildir / "new") == []
        assert os.listdir(maildir / "envelope") == []
        assert os.listdir(maildir / "tmp") == []
        [line] = storage_errors(events)
        assert "No space left on device" in line and "answered 452 4.3.1" in line
        filler.unlink()
        exchange(ENVELOPE)
        assert exchange(body(64 * 1024))[-1][0] == "250"
        assert len(os.listdir(maildir / "new")) == 1


def test_twistd_spool_dir_on_a_full_disk(tmp_path: Path) -> None:
    """The issue's case end to end: ``twistd slimta --spool-dir`` on a full filesystem. The
    client (smtplib) gets 452 4.3.1 after its data instead of a dropped connection; the same
    connection then delivers a small message; the log has the one line, no traceback."""
    with small_tmpfs(256) as spool_dir, tempfile.TemporaryDirectory() as maildir:
        argv = [
            TWISTD,
            "-n",
            "slimta",
            "--listen",
            "tcp:0:interface=127.0.0.1",
            "--maildir",
            maildir,
            "--spool-dir",
            str(spool_dir),
            "--accept-domain",
            "example.com",
        ]
        with running_twistd(argv, cwd=str(tmp_path)) as server:
            with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as client:
                big = b"Subject: big\r\n\r\n" + LINE * (1024 * 1024 // len(LINE))
                with pytest.raises(smtplib.SMTPDataError) as refused:
                    client.sendmail("a@sender.test", ["u@example.com"], big)
                assert refused.value.smtp_code == 452
                assert b"4.3.1" in refused.value.smtp_error
                client.sendmail(
                    "a@sender.test", ["u@example.com"], b"Subject: small\r\n\r\nhi\r\n"
                )
            output = server.output
        assert len(os.listdir(Path(maildir) / "new")) == 1
        assert output.count("message not stored: spool write failed") == 1
        assert "Traceback" not in output and "Unhandled" not in output


def _run_now(f: Any) -> Any:
    from twisted.internet.defer import maybeDeferred

    return maybeDeferred(f)

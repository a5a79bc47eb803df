"""Crash safety of a ``twistd slimta`` process delivering into a Maildir.

A 250 is a promise: after it, a SIGKILL loses nothing. Before it, a SIGKILL leaves nothing
half-written in ``new/``, also in the middle of a batch of several messages (group commit).
A SIGTERM lets the transaction in progress finish.
"""

from __future__ import annotations

import os
import re
import signal
import sys
import time
from pathlib import Path

import pytest

from slimta_tx.bus.maildir import MaildirBus, read_envelopes
from tests.support.faults import DELIVERY_STEPS
from tests.support.mailbox import stored_messages
from tests.support.process import Twistd, running_twistd, twistd_argv
from tests.support.wire import WireClient, refuses

pytestmark = pytest.mark.slow

KILLPOINT = str(Path(__file__).parent / "support" / "killpoint.py")
BODY = b"From: a@example.com\r\nSubject: crash\r\n\r\n" + b"x" * 70 + b"\r\n"


def listing(maildir: Path) -> dict[str, list[str]]:
    return {sub: sorted(os.listdir(maildir / sub)) for sub in ("tmp", "new")}


def wait_until(condition: object, what: str, timeout: float = 10) -> None:
    """Poll ``condition()`` until true (bounded); fail saying ``what`` never happened."""
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def killed(server: Twistd) -> None:
    server.kill(signal.SIGKILL)
    assert server.wait() == -signal.SIGKILL


def assert_complete_or_absent(maildir: Path, body: bytes) -> int:
    """Whatever is in new/ is the whole message with its envelope; returns how many."""
    stored = stored_messages(maildir)
    for message in stored:
        assert message.body == body
        assert message.envelope is not None
    return len(stored)


def test_sigkill_during_data_leaves_nothing_in_new(tmp_path: Path) -> None:
    """Killed while the body is arriving (already spooled to disk): no message appears."""
    maildir, spool = tmp_path / "md", tmp_path / "spool"
    spool.mkdir()
    with running_twistd(twistd_argv(maildir, "--spool-dir", str(spool))) as server:
        with WireClient(server.port) as client:
            client.start_transaction()
            client.send(BODY + (b"y" * 998 + b"\r\n") * 600)  # past the 256 KiB memory spool
            wait_until(
                lambda: any(t.startswith(str(spool)) for t in server.open_fds()),
                "the server to spool the body to a file",
            )
            killed(server)
    assert listing(maildir) == {"tmp": [], "new": []}
    assert read_envelopes(maildir) == {}


def test_sigkill_after_250_keeps_the_message(tmp_path: Path) -> None:
    """Killed right after the 250 arrives: the message is complete in new/ with its
    envelope and the queue id the client was told."""
    maildir = tmp_path / "md"
    with running_twistd(twistd_argv(maildir)) as server:
        with WireClient(server.port) as client:
            client.start_transaction()
            code, text = client.command(BODY + b".")
            killed(server)
    assert code == "250"
    [stored] = stored_messages(maildir)
    assert stored.body == BODY
    assert stored.envelope is not None
    assert text.endswith(stored.envelope["queue_id"])


@pytest.mark.parametrize("size", [100, 300 * 1024, 3 * 1024 * 1024])
def test_sigkill_right_after_the_final_dot_is_all_or_nothing(tmp_path: Path, size: int) -> None:
    """Killed at once after the final dot (the delivery may be anywhere): new/ holds
    either nothing or the whole message with its envelope."""
    maildir = tmp_path / "md"
    body = BODY + (b"z" * 78 + b"\r\n") * (size // 80)
    with running_twistd(twistd_argv(maildir)) as server:
        with WireClient(server.port) as client:
            client.start_transaction()
            client.send(body + b".\r\n")
            killed(server)
    assert assert_complete_or_absent(maildir, body) in (0, 1)


def clean_as_after_restart(maildir: Path) -> None:
    """What the restarted bus's start-up clean does to leftovers once they are old."""
    long_ago = time.time() - 3 * 24 * 3600
    for sub in ("tmp", "envelope"):
        for name in os.listdir(maildir / sub):
            os.utime(maildir / sub / name, (long_ago, long_ago))
    MaildirBus(str(maildir)).clean()


@pytest.mark.parametrize("step", DELIVERY_STEPS)
def test_sigkill_at_each_delivery_step(tmp_path: Path, step: str) -> None:
    """Killed just before each file-system step of a delivery: the client never got a 250;
    before the message is named in new/ nothing is there, after it the message is complete with its
    envelope; clean() then removes exactly the leftovers."""
    maildir = tmp_path / "md"
    MaildirBus(str(maildir))  # creates the layout
    argv = twistd_argv(maildir, prefix=[sys.executable, KILLPOINT, step])
    with running_twistd(argv) as server:
        with WireClient(server.port) as client:
            client.start_transaction()
            client.send(BODY + b".\r\n")
            with pytest.raises(ConnectionError):
                client.reply()
            assert server.wait() == -signal.SIGKILL
    visible = DELIVERY_STEPS.index(step) > DELIVERY_STEPS.index("publish message")
    assert assert_complete_or_absent(maildir, BODY) == (1 if visible else 0)

    clean_as_after_restart(maildir)
    after = listing(maildir)
    assert after["tmp"] == []
    envelopes = read_envelopes(maildir)
    assert all(name in envelopes for name in after["new"])
    if not visible:
        assert os.listdir(maildir / "envelope") == []


@pytest.mark.parametrize(
    ("step", "visible_of_batch"),
    [("open message#3", 0), ("sync data#2", 0), ("publish message#3", 1), ("sync new/#2", 3)],
)
def test_sigkill_in_the_middle_of_a_batch(
    tmp_path: Path, step: str, visible_of_batch: int
) -> None:
    """Three clients send their final dot while the first message's commit is held: they
    form one batch, and the process is killed at a step inside it. Whatever a client was
    told 250 is stored; of the killed batch, exactly the messages named in new/ before the
    kill are in new/, each complete with its envelope; nothing partial anywhere."""
    maildir = tmp_path / "md"
    MaildirBus(str(maildir))
    held = tmp_path / "held"
    gate = ["--gate", "4", str(held)]
    argv = twistd_argv(maildir, prefix=[sys.executable, KILLPOINT, step, *gate])
    bodies = [BODY.replace(b"crash", f"crash {i}".encode()) for i in range(4)]
    answers: list[tuple[str, str] | None] = []
    with running_twistd(argv) as server:
        clients = [WireClient(server.port) for _ in bodies]
        try:
            for client in clients:
                client.start_transaction()
            clients[0].send(bodies[0] + b".\r\n")
            wait_until(held.exists, "the first batch to be held")
            for client, body in zip(clients[1:], bodies[1:], strict=True):
                client.send(body + b".\r\n")
            for client in clients:
                try:
                    answers.append(client.reply())
                except ConnectionError:
                    answers.append(None)
        finally:
            for client in clients:
                client.close()
        assert server.wait() == -signal.SIGKILL
    stored = stored_messages(maildir)
    assert all(s.envelope is not None for s in stored)
    assert all(s.body in bodies for s in stored)
    acknowledged = {text.rsplit(" ", 1)[1] for text in [a[1] for a in answers if a]}
    assert all(a is None or a[0] == "250" for a in answers)
    assert acknowledged <= {s.envelope["queue_id"] for s in stored if s.envelope}
    assert len(stored) == 1 + visible_of_batch

    clean_as_after_restart(maildir)
    assert listing(maildir)["tmp"] == []
    assert len(stored_messages(maildir)) == 1 + visible_of_batch


def test_sigterm_during_data_lets_the_transaction_finish(tmp_path: Path) -> None:
    """SIGTERM while a client is sending DATA: the server stops accepting connections but
    the client finishes its message and gets its 250 (the mail is stored), then 421; the
    process then shuts down cleanly."""
    maildir = tmp_path / "md"
    with running_twistd(twistd_argv(maildir)) as server:
        with WireClient(server.port) as client:
            client.start_transaction()
            client.send(BODY[:20])
            server.kill(signal.SIGTERM)
            wait_until(lambda: refuses(server.port), "the listening port to close")
            code, text = client.command(BODY[20:] + b".")
            after = client.reply()
            assert client.closed_by_server()
        # twistd re-raises the signal that stopped it once shutdown is complete.
        assert server.wait() == -signal.SIGTERM
        assert "Server Shut Down." in server.output
    assert (code, text.split(" ", 1)[0]) == ("250", "2.6.0")
    assert after[0] == "421"
    [stored] = stored_messages(maildir)
    assert stored.body == BODY


def test_start_up_removes_what_a_crash_left_and_says_so(tmp_path: Path) -> None:
    """twistd slimta cleans its Maildir when it starts: a message file left in tmp/ by a
    killed delivery (old enough) and an envelope journal describing no stored message go,
    and the log names them; delivered mail stays."""
    maildir = tmp_path / "md"
    with running_twistd(twistd_argv(maildir)) as server:
        with WireClient(server.port) as client:
            client.start_transaction()
            assert client.command(BODY + b".")[0] == "250"
    [kept] = stored_messages(maildir)
    long_ago = time.time() - 3 * 24 * 3600
    leftovers = [
        maildir / "tmp" / "1.M1P1Q1Rkilled.host",
        maildir / "envelope" / "1.M1P9Q1.host.jsonl",
    ]
    leftovers[0].write_bytes(b"Return-Path: <a@example.com>\r\npartial")
    leftovers[1].write_bytes(b'{"maildir_name": "1.M1P1Q1Rkilled.host"}\n')
    for path in leftovers:
        os.utime(path, (long_ago, long_ago))
    with running_twistd(twistd_argv(maildir)) as server:
        line = server.wait_for_line(re.compile(r"removed 2 leftover files"))
    assert "tmp/1.M1P1Q1Rkilled.host" in line
    assert "envelope/1.M1P9Q1.host.jsonl" in line
    assert not any(path.exists() for path in leftovers)
    assert [s.name for s in stored_messages(maildir)] == [kept.name]

"""``twistd slimta``'s log as users get it: on stdout (``-n``), in a ``-l`` file, and from a
daemonized twistd; text by default, JSON on request; debug events only when asked for; nothing
lost at shutdown. Real twistd processes on 127.0.0.1, real SMTP sessions (smtplib)."""

from __future__ import annotations

import json
import os
import re
import signal
import smtplib
import subprocess
import time
from pathlib import Path

from tests.support.process import TWISTD, free_port, running_twistd, twistd_argv

_PORT = re.compile(r"SmtpEdge starting on (\d+)")
DEADLINE = 20.0


def send_one(port: int, helo: str = "client.test") -> None:
    with smtplib.SMTP("127.0.0.1", port, local_hostname=helo, timeout=10) as client:
        client.sendmail("a@sender.test", ["u@example.com"], b"Subject: hi\r\n\r\nhello\r\n")


def wait_for(predicate: object, what: str, timeout: float = DEADLINE) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)  # the bounded poll's interval


def port_in(path: Path) -> int:
    """The port twistd logged in ``path`` (text or JSON), waiting for it."""
    found: list[int] = []

    def logged() -> bool:
        if path.exists():
            match = _PORT.search(path.read_text())
            if match:
                found.append(int(match.group(1)))
        return bool(found)

    wait_for(logged, f"the port in {path}")
    return found[0]


def test_default_log_on_stdout_has_the_transaction_and_no_debug(tmp_path: Path) -> None:
    """``twistd -n slimta``: text lines on stdout, one per transaction, no per-connection
    debug lines; what is logged just before SIGTERM is written before twistd exits."""
    argv = twistd_argv(tmp_path / "maildir", "--accept-domain", "example.com")
    with running_twistd(argv) as twistd:
        send_one(twistd.port)
        twistd.kill(signal.SIGTERM)
        assert twistd.wait() in (0, -signal.SIGTERM)  # twistd re-raises the signal
        output = twistd.output
    (line,) = [line for line in output.splitlines() if " helo=client.test " in line]
    assert re.match(
        r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} \[slimta_tx\.factory\.SmtpEdge#info\] "
        r"127\.0\.0\.1 helo=client\.test from=<a@sender\.test> rcpts=1 size=\d+ id=[0-9A-F]{16} "
        r"result=250 2\.6\.0 \d+\.\d{3}s$",
        line,
    ), line
    assert " connected" not in output and "#debug]" not in output
    assert output.splitlines()[-2].endswith("Server Shut Down.")


def test_json_log_file_at_debug(tmp_path: Path) -> None:
    """``-l FILE --log-format json --log-level debug``: every line of the file is a JSON
    object; the connection and transaction events are there with their fields."""
    log = tmp_path / "slimta.log"
    argv = twistd_argv(
        tmp_path / "maildir",
        "--accept-domain",
        "example.com",
        "--log-format",
        "json",
        "--log-level",
        "debug",
        prefix=[TWISTD, "-l", str(log)],
    )
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, cwd=tmp_path)
    try:
        port = port_in(log)
        wait_for(lambda: _greets(port), "the banner")
        send_one(port, helo="json.client.test")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(DEADLINE) in (0, -signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    records = [json.loads(line) for line in log.read_text().splitlines()]
    kinds = [r.get("event") for r in records if r.get("event")]
    assert "connection.open" in kinds and "connection.close" in kinds
    (transaction,) = [r for r in records if r.get("event") == "smtp.transaction"]
    assert transaction["helo"] == "json.client.test"
    assert transaction["sender"] == "a@sender.test"
    assert transaction["code"] == "250" and transaction["result"] == "250 2.6.0"
    assert transaction["client"] == "127.0.0.1"
    assert re.fullmatch(r"[0-9A-F]{16}", transaction["queue_id"])
    for key in ("connect_to_mail_seconds", "data_seconds", "bus_seconds", "seconds"):
        assert transaction[key] >= 0
    assert records[-1]["message"] == "Server Shut Down."
    assert all(set(r) >= {"time", "level", "namespace", "message"} for r in records)


def test_daemonized_twistd_logs_through_the_sink(tmp_path: Path) -> None:
    """A daemonizing ``twistd -l FILE slimta`` (no -n) writes the same lines to FILE, and
    everything by the time it has stopped."""
    log, pidfile = tmp_path / "daemon.log", tmp_path / "twistd.pid"
    port = free_port()
    result = subprocess.run(
        [
            TWISTD,
            f"--pidfile={pidfile}",
            "-l",
            str(log),
            "slimta",
            "--listen",
            f"tcp:{port}:interface=127.0.0.1",
            "--maildir",
            str(tmp_path / "maildir"),
            "--accept-domain",
            "example.com",
        ],
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=DEADLINE,
    )
    assert result.returncode == 0, result.stderr
    wait_for(pidfile.exists, "the pid file")
    pid = int(pidfile.read_text())
    try:
        wait_for(lambda: _greets(port), "the daemon's banner")
        send_one(port, helo="daemon.client.test")
    finally:
        os.kill(pid, signal.SIGTERM)
        wait_for(lambda: not _alive(pid), "the daemon to stop")
    text = log.read_text()
    assert " helo=daemon.client.test " in text
    assert text.rstrip().endswith("Server Shut Down.")


def test_bad_log_options_are_one_line(tmp_path: Path) -> None:
    for option, value, message in (
        ("--log-level", "loud", "--log-level must be one of debug, info, warn, error, critical"),
        ("--log-format", "xml", "--log-format must be one of text, json"),
    ):
        result = subprocess.run(
            [TWISTD, "-n", "--pidfile=", "slimta", option, value],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=DEADLINE,
        )
        assert result.returncode == 1
        assert result.stderr.strip().splitlines() == [
            f"twistd slimta: {message} (see 'twistd slimta --help')"
        ]


def _greets(port: int) -> bool:
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=5) as client:
            return client.noop()[0] == 250
    except OSError:
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True

"""``twistd slimta --workers 2`` as real processes on loopback: both workers serve the one
port, a killed worker comes back, a crash loop ends the service with a clear error, SIGTERM
drains without losing an acknowledged message, SIGHUP reaches every worker (with a
--tls-listen port), ids stay unique, and socket activation and --uid work with workers."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from support.process import TWISTD, Twistd, running_twistd, twistd_argv
from test_tls_helpers import make_certs
from test_tls_twistd import serial_of

from slimta_tx.bus.maildir import read_envelopes

pytestmark = pytest.mark.slow

MESSAGE = b"Subject: t\r\n\r\nbody\r\n"
_READY = re.compile(r"worker (\d+) ready \(pid (\d+)\)")


def ready_pids(twistd: Twistd, count: int = 2) -> dict[int, int]:
    """{slot: pid} of the first ``count`` workers that said they are ready."""
    pids: dict[int, int] = {}
    for slot in range(1, count + 1):
        match = _READY.search(twistd.wait_for_line(re.compile(rf"worker {slot} ready \(pid")))
        assert match is not None
        pids[slot] = int(match.group(2))
    return pids


def send(port: int, count: int = 1) -> list[str]:
    """Send ``count`` messages, one connection each; the queue ids from the 250 replies."""
    ids = []
    for _ in range(count):
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
            smtp.ehlo("client.test")
            smtp.mail("a@sender.test")
            smtp.rcpt("postmaster")
            code, text = smtp.data(MESSAGE)
            assert code == 250, text
            ids.append(text.decode().rsplit(" ", 1)[-1])
    return ids


@contextmanager
def paused(pid: int) -> Iterator[None]:
    """SIGSTOP ``pid`` (it cannot accept) for the block: the other worker must serve."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def delivered(maildir: Path) -> list[str]:
    return sorted(p.name for p in (maildir / "new").iterdir())


def names_by_pid(maildir: Path) -> dict[int, int]:
    counts: dict[int, int] = {}
    for name in delivered(maildir):
        match = re.search(r"P(\d+)Q", name)
        assert match is not None, name
        counts[int(match.group(1))] = counts.get(int(match.group(1)), 0) + 1
    return counts


def test_both_workers_serve_one_port_with_unique_ids(tmp_path: Path) -> None:
    """With one worker paused the other serves the same port, and the other way round; every
    queue id and Maildir name is distinct across the two processes."""
    maildir = tmp_path / "Maildir"
    with running_twistd(twistd_argv(maildir, "--workers", "2")) as twistd:
        pids = ready_pids(twistd)
        assert len(set(pids.values())) == 2 and twistd.pid not in pids.values()
        with paused(pids[1]):
            ids = send(twistd.port, 3)
        with paused(pids[2]):
            ids += send(twistd.port, 3)
    assert names_by_pid(maildir) == {pids[1]: 3, pids[2]: 3}
    assert len(set(ids)) == 6
    records = list(read_envelopes(str(maildir)).values())
    assert sorted(r["queue_id"] for r in records) == sorted(ids)
    assert len({r["maildir_name"] for r in records}) == 6
    # Each worker's transaction lines reach the parent's log, marked with the worker.
    for slot in (1, 2):
        assert re.search(
            rf"\[worker-{slot} slimta_tx.factory.SmtpEdge#info\] 127.0.0.1 helo=", twistd.output
        )


def test_a_killed_worker_is_restarted_and_serves(tmp_path: Path) -> None:
    maildir = tmp_path / "Maildir"
    with running_twistd(twistd_argv(maildir, "--workers", "2")) as twistd:
        pids = ready_pids(twistd)
        os.kill(pids[1], signal.SIGKILL)
        twistd.wait_for_line(
            re.compile(
                rf"worker 1 \(pid {pids[1]}\) ended unexpectedly: killed by signal 9 "
                r"\(SIGKILL\); restarting in 0.5 s"
            )
        )
        line = twistd.wait_for_line(re.compile(rf"worker 1 ready \(pid (?!{pids[1]}\))\d+\)"))
        match = _READY.search(line)
        assert match is not None
        new_pid = int(match.group(2))
        with paused(pids[2]):
            send(twistd.port, 2)
    assert names_by_pid(maildir) == {new_pid: 2}


def test_a_crash_loop_stops_the_service_with_exit_status_1(tmp_path: Path) -> None:
    """--worker-restarts 1/60: the second failure of worker 1 within a minute ends the whole
    service; the other worker drains and exits cleanly; the reason is the last line."""
    maildir = tmp_path / "Maildir"
    twistd = Twistd(twistd_argv(maildir, "--workers", "2", "--worker-restarts", "1/60"))
    try:
        twistd.wait_ready()
        pids = ready_pids(twistd)
        os.kill(pids[1], signal.SIGKILL)
        line = twistd.wait_for_line(re.compile(rf"worker 1 ready \(pid (?!{pids[1]}\))\d+\)"))
        match = _READY.search(line)
        assert match is not None
        os.kill(int(match.group(2)), signal.SIGKILL)
        assert twistd.wait(30) == 1
    finally:
        twistd.stop()
    reason = (
        "worker 1 failed 2 times in 60 s (last: killed by signal 9 (SIGKILL)); "
        "more than --worker-restarts 1/60 allows"
    )
    assert f"{reason}; stopping the service" in twistd.output
    assert twistd.output.splitlines()[-2] == f"slimta: stopped: {reason}"
    assert re.search(rf"worker 2 \(pid {pids[2]}\) stopped: exit status 0", twistd.output)


def test_workers_that_cannot_start_are_a_crash_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bus that fails in every worker (here: its constructor raises) is not retried forever:
    the parent gives up after the allowed restarts and exits 1, and the worker's error is in
    the log."""
    (tmp_path / "broken_bus.py").write_text(
        textwrap.dedent(
            """
            class Broken:
                def __init__(self):
                    raise RuntimeError("no broker today")
            """
        )
    )
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    argv = twistd_argv(tmp_path / "Maildir", "--workers", "2", "--worker-restarts", "1/60")
    argv += ["--bus", "broken_bus:Broken"]
    twistd = Twistd(argv)
    try:
        assert twistd.wait(60) == 1
    finally:
        twistd.stop()
    assert "RuntimeError: no broker today" in twistd.output
    assert "slimta: stopped: worker " in twistd.output.splitlines()[-2]
    assert "exit status 78" in twistd.output.splitlines()[-2]


def test_sigterm_drains_every_worker_and_loses_nothing_acknowledged(tmp_path: Path) -> None:
    """A message whose DATA is under way when the parent gets SIGTERM is still taken (250)
    and stored; the service then exits with the workers' drain complete."""
    maildir = tmp_path / "Maildir"
    twistd = Twistd(twistd_argv(maildir, "--workers", "2", "--shutdown-grace", "20"))
    try:
        twistd.wait_ready()
        ready_pids(twistd)
        with socket.create_connection(("127.0.0.1", twistd.port), timeout=10) as sock:
            reader = sock.makefile("rb")
            assert reader.readline().startswith(b"220")
            for command, code in (
                (b"EHLO client.test", b"250 "),
                (b"MAIL FROM:<a@sender.test>", b"250 "),
                (b"RCPT TO:<postmaster>", b"250 "),
                (b"DATA", b"354"),
            ):
                sock.sendall(command + b"\r\n")
                line = reader.readline()
                while line[3:4] == b"-":
                    line = reader.readline()
                assert line.startswith(code), (command, line)
            sock.sendall(b"Subject: in flight\r\n\r\nfirst half\r\n")
            twistd.kill(signal.SIGTERM)
            for slot in (1, 2):
                twistd.wait_for_line(re.compile(rf"worker {slot}: SIGTERM; draining"))
            refused_soon(twistd.port)
            sock.sendall(b"second half\r\n.\r\n")
            reply = reader.readline()
            assert reply.startswith(b"250 2.6.0"), reply
            sock.sendall(b"QUIT\r\n")
            assert reader.readline()[:3] in (b"221", b"421", b"")
        assert twistd.wait(30) in (0, -signal.SIGTERM)
    finally:
        twistd.stop()
    [name] = delivered(maildir)
    assert (maildir / "new" / name).read_bytes().endswith(b"first half\r\nsecond half\r\n")
    assert len(re.findall(r"worker \d \(pid \d+\) stopped: exit status 0", twistd.output)) == 2


def refused_soon(port: int) -> None:
    """New connections are refused once the drain has begun. The workers log that they drain
    just before their reactors stop and close the listening socket, so on a loaded machine a
    connection may still slip in right after the line: retry, bounded by time."""
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
        except OSError:
            return
        assert time.monotonic() < deadline, "still accepting connections 10 s into the drain"
        time.sleep(0.01)  # retry interval of the bounded connect loop


def mail_from(port: int, sender: str) -> int:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
        smtp.ehlo("client.test")
        return smtp.mail(sender)[0]


def test_sighup_reloads_certificates_and_lists_in_every_worker_with_tls_listen(
    tmp_path: Path,
) -> None:
    """One SIGHUP to the parent: each worker (asked in turn, the other one paused) presents
    the new certificate on the --tls-listen port and applies the new sender list."""
    certs = make_certs(tmp_path)
    cert = certs.leaf("localhost", "127.0.0.1", stem="server", combined=False)
    senders = tmp_path / "senders"
    senders.write_text("spam@sender.test OK\n")
    argv = twistd_argv(
        tmp_path / "Maildir",
        "--workers",
        "2",
        "--tls-cert",
        str(cert),
        "--tls-key",
        str(cert.with_suffix(".key")),
        "--tls-listen",
        "tcp:0:interface=127.0.0.1",
        "--sender-list",
        str(senders),
    )
    ctx = ssl.create_default_context(cafile=str(certs.ca_file))
    tls_port = re.compile(r"SmtpEdge \(TLS\) starting on (\d+)")
    with running_twistd(argv) as twistd:
        pids = ready_pids(twistd)
        match = tls_port.search(twistd.wait_for_line(tls_port))
        assert match is not None
        port = int(match.group(1))
        before = {}
        for slot, other in ((1, 2), (2, 1)):
            with paused(pids[other]):
                before[slot] = serial_of(port, ctx)
                assert mail_from(twistd.port, "spam@sender.test") == 250
        certs.leaf("localhost", "127.0.0.1", stem="server", combined=False)
        senders.write_text("spam@sender.test REJECT\n")
        twistd.kill(signal.SIGHUP)
        for slot in (1, 2):
            twistd.wait_for_line(
                re.compile(rf"\[worker-{slot} slimta_tx.cli.tls#info\] TLS certificates reloaded")
            )
            twistd.wait_for_line(re.compile(rf"\[worker-{slot} .*\] reloaded .*: 1 rules"))
        for slot, other in ((1, 2), (2, 1)):
            with paused(pids[other]):
                assert serial_of(port, ctx) != before[slot]
                assert mail_from(twistd.port, "spam@sender.test") >= 500
        assert "ended unexpectedly" not in twistd.output


LAUNCHER = """
import os, socket, sys
sock = socket.socket()
sock.bind(("127.0.0.1", 0))
sock.listen(16)
if sock.fileno() != 3:
    os.dup2(sock.fileno(), 3)
os.set_inheritable(3, True)
open(sys.argv[1], "w").write(str(sock.getsockname()[1]))
os.environ.update(LISTEN_FDS="1", LISTEN_FDNAMES="smtp", LISTEN_PID=str(os.getpid()))
os.execv(sys.argv[2], sys.argv[2:])
"""


def test_systemd_socket_activation_with_workers(tmp_path: Path) -> None:
    """As systemd does it: the socket is descriptor 3, LISTEN_FDS/LISTEN_PID/LISTEN_FDNAMES
    name it, and `--listen systemd:domain=INET:index=0` serves it from both workers."""
    port_file = tmp_path / "port"
    argv = [
        sys.executable,
        "-c",
        LAUNCHER,
        str(port_file),
        TWISTD,
        "-n",
        "--pidfile=",
        "slimta",
        "--listen",
        "systemd:domain=INET:index=0",
        "--maildir",
        str(tmp_path / "Maildir"),
        "--hostname",
        "mx.test",
        "--workers",
        "2",
    ]
    with running_twistd(argv) as twistd:
        assert twistd.port == int(port_file.read_text())
        pids = ready_pids(twistd)
        with paused(pids[1]):
            send(twistd.port)
        with paused(pids[2]):
            send(twistd.port)
    assert names_by_pid(tmp_path / "Maildir") == {pids[1]: 1, pids[2]: 1}


def privileged_free_port() -> int:
    """A port below 1024 on 127.0.0.1 that nothing uses right now."""
    for port in range(1023, 600, -1):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    pytest.fail("no free privileged port on 127.0.0.1")


def uids(pid: int) -> tuple[int, int]:
    """(real uid, real gid) of ``pid``."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.split()
    return int(fields["Uid"][0]), int(fields["Gid"][0])


def python_for(user: str) -> str:
    """An interpreter ``user`` can run that can import what this one imports: this one, or
    the system's of the same version (a pyenv build under /root is out of reach of nobody)."""
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    for candidate in (os.path.realpath(sys.executable), f"/usr/bin/{version}"):
        if not os.path.exists(candidate):
            continue
        try:
            probe = subprocess.run(
                [candidate, "-c", "import sys; print(sys.version_info[:2])"],
                user=user,
                capture_output=True,
                text=True,
                timeout=30,
            )
        except PermissionError:
            continue
        if probe.returncode == 0 and probe.stdout.strip() == str(tuple(sys.version_info[:2])):
            return candidate
    pytest.fail(f"no {version} that {user} may run")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to bind a port below 1024")
def test_privileged_port_and_uid_gid_with_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    """As root with --uid/--gid: the parent binds a port below 1024, then every process runs as
    nobody:nogroup and the workers still serve that port."""
    import grp
    import pwd
    import site

    nobody, nogroup = pwd.getpwnam("nobody").pw_uid, grp.getgrnam("nogroup").gr_gid
    python = python_for("nobody")
    # The same packages for that interpreter (and the processes it runs as nobody).
    root = Path(__file__).resolve().parent.parent
    path = os.pathsep.join([str(root), *site.getsitepackages()])
    monkeypatch.setenv("PYTHONPATH", path)
    probe = subprocess.run(
        [python, "-c", "import slimta_tx.worker, twisted.scripts.twistd"],
        user="nobody",
        env={"PYTHONPATH": path},
        capture_output=True,
        text=True,
        timeout=60,
    )
    if probe.returncode != 0:
        pytest.skip(f"this checkout is not readable by nobody: {probe.stderr.strip()[-200:]}")
    base = Path(tempfile.mkdtemp(prefix="slimta-uid-", dir="/tmp"))
    try:
        base.chmod(0o755)
        maildir = base / "Maildir"
        maildir.mkdir()
        os.chown(maildir, nobody, nogroup)
        port = privileged_free_port()
        argv = [
            python,
            "-c",
            "import sys; from twisted.scripts.twistd import run; sys.exit(run())",
            "-n",
            "--pidfile=",
            "--uid",
            "nobody",
            "--gid",
            "nogroup",
            "slimta",
            "--listen",
            f"tcp:{port}:interface=127.0.0.1",
            "--maildir",
            str(maildir),
            "--hostname",
            "mx.test",
            "--workers",
            "2",
        ]
        with running_twistd(argv, cwd=str(base)) as twistd:
            assert twistd.port == port
            pids = ready_pids(twistd)
            assert uids(twistd.pid) == (nobody, nogroup)
            for pid in pids.values():
                assert uids(pid) == (nobody, nogroup)
            with paused(pids[1]):
                send(port)
            with paused(pids[2]):
                send(port)
        assert len(delivered(maildir)) == 2
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_workers_do_not_outlive_a_killed_parent(tmp_path: Path) -> None:
    """SIGKILL of the parent (no chance to stop anything): each worker reads end of file on
    its stdin, drains and exits instead of serving on unsupervised."""
    twistd = Twistd(twistd_argv(tmp_path / "Maildir", "--workers", "2"))
    try:
        twistd.wait_ready()
        pids = ready_pids(twistd)
        twistd.kill(signal.SIGKILL)
        twistd.wait()
        deadline = time.monotonic() + 20
        while any(Path(f"/proc/{pid}").exists() for pid in pids.values()):
            assert time.monotonic() < deadline, f"workers {pids} still running"
            time.sleep(0.05)  # poll interval of a bounded wait for other processes
    finally:
        twistd.stop()


def test_with_a_logfile_workers_log_through_the_parent(tmp_path: Path) -> None:
    """With --logfile (twistd rotates it) workers send their events to the parent, which
    writes them to that file, each marked with its worker."""
    logfile = tmp_path / "slimta.log"
    argv = twistd_argv(tmp_path / "Maildir", "--workers", "2")
    argv.insert(argv.index("slimta"), f"--logfile={logfile}")
    twistd = Twistd(argv)
    try:
        deadline = time.monotonic() + 30
        text = ""
        while not all(f"worker {n} ready" in text for n in (1, 2)):
            assert twistd.proc.poll() is None and time.monotonic() < deadline, text
            time.sleep(0.05)  # poll interval of a bounded wait for another process
            text = logfile.read_text() if logfile.exists() else ""
        match = re.search(r"SmtpEdge starting on (\d+)", text)
        assert match is not None
        pids = {int(m.group(1)): int(m.group(2)) for m in _READY.finditer(text)}
        for slot, other in ((1, 2), (2, 1)):
            with paused(pids[other]):
                [queue_id] = send(int(match.group(1)))
            deadline = time.monotonic() + 10
            while f"id={queue_id} result=250 2.6.0" not in logfile.read_text():
                assert time.monotonic() < deadline
                time.sleep(0.05)  # poll interval of a bounded wait for the log line
            line = next(ln for ln in logfile.read_text().splitlines() if f"id={queue_id}" in ln)
            assert f"[worker-{slot} slimta_tx.factory.SmtpEdge#info] 127.0.0.1 helo=" in line
        assert twistd.output == ""  # nothing on stdout: everything went to the file
    finally:
        twistd.stop()


def test_a_haproxy_listener_is_shared_by_the_workers(tmp_path: Path) -> None:
    """`--listen haproxy:tcp:...`: the parent binds the TCP part, each worker wraps its
    inherited socket the same way (haproxy:systemd:...), so a PROXY header is read first."""
    argv = twistd_argv(tmp_path / "Maildir", "--workers", "2")
    argv[argv.index("tcp:0:interface=127.0.0.1")] = "haproxy:tcp:0:interface=127.0.0.1"
    twistd = Twistd(argv)
    try:
        pids = ready_pids(twistd)
        match = re.search(r"SharedListener starting on (\d+)", twistd.output)
        assert match is not None
        port = int(match.group(1))
        for other in (2, 1):
            with paused(pids[other]), socket.create_connection(("127.0.0.1", port), 10) as sock:
                reader = sock.makefile("rb")
                sock.sendall(b"PROXY TCP4 203.0.113.9 127.0.0.1 40000 25\r\n")
                assert reader.readline().startswith(b"220 mx.test")
                sock.sendall(b"QUIT\r\n")
                assert reader.readline().startswith(b"221")
        assert len(re.findall(rf"\[worker-\d.*\] .* starting on {port}", twistd.output)) == 2
    finally:
        twistd.stop()


def test_lmtp_listeners_are_bound_by_the_parent_and_served_by_every_worker(
    tmp_path: Path,
) -> None:
    """--lmtp-listen with --workers: one socket, bound once by the parent (a worker binding it
    itself would find the port taken), and each worker answers LMTP on it."""
    from support.process import free_port

    maildir = tmp_path / "Maildir"
    lmtp_port = free_port()
    argv = twistd_argv(
        maildir, "--workers", "2", "--lmtp-listen", f"tcp:{lmtp_port}:interface=127.0.0.1"
    )
    with running_twistd(argv) as twistd:
        pids = ready_pids(twistd)
        for other in (2, 1):  # worker 1 serves, then worker 2
            with paused(pids[other]), smtplib.LMTP("127.0.0.1", lmtp_port, timeout=10) as lmtp:
                code, _ = lmtp.ehlo("client.test")  # smtplib's LMTP sends LHLO here
                assert code == 250
                lmtp.mail("a@sender.test")
                lmtp.rcpt("postmaster")
                code, text = lmtp.data(MESSAGE)
                assert code == 250, text
        assert "Address already in use" not in twistd.output
    assert names_by_pid(maildir) == {pids[1]: 1, pids[2]: 1}


def test_workers_honour_the_log_format_and_level(tmp_path: Path) -> None:
    """--log-format json and --log-level reach the workers, which write their own lines to
    the stdout they share with the parent (-n): a transaction is one JSON object naming its
    worker, and nothing below info is written."""
    maildir = tmp_path / "Maildir"
    argv = twistd_argv(maildir, "--workers", "2", "--log-format", "json")
    with running_twistd(argv) as twistd:
        ready_pids(twistd)
        [queue_id] = send(twistd.port)
        line = twistd.wait_for_line(re.compile(rf'"queue_id":"{queue_id}"'))
        record = json.loads(line)
        assert record["event"] == "smtp.transaction" and record["code"] == "250"
        assert record["worker"] in (1, 2)
        records = [json.loads(x) for x in twistd.output.splitlines() if x.startswith("{")]
        assert records and all(r["level"] != "debug" for r in records)

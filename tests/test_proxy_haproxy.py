"""A real HAProxy (Debian ``haproxy``) in front of ``twistd slimta`` processes: ``send-proxy`` and
``send-proxy-v2`` with ``option smtpchk`` health checks; the client's address (not HAProxy's) in
Received: and in the relay decision, over IPv4 and IPv6; a backend killed in the middle of a load
is taken out of rotation and the clients' retries land on the other one.

The relay tests tell clients apart by their source address on loopback: 127.0.0.3 is the only
trusted network (``--trusted-network 127.0.0.3/32``), so HAProxy itself (127.0.0.1) may not
relay, a client from 127.0.0.3 may, and one from 127.0.0.2 or ::1 may not.
"""

from __future__ import annotations

import re
import smtplib
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support.haproxy import Server, require_haproxy, running_haproxy
from tests.support.mailbox import stored_messages
from tests.support.process import Twistd, running_twistd, twistd_argv

pytestmark = pytest.mark.slow

_PROXY_PORT = re.compile(r"SmtpEdge \(PROXY\) starting on (\d+)")
TIMEOUT = 10


def message(subject: str) -> bytes:
    return f"From: a@b.org\r\nTo: c@example.com\r\nSubject: {subject}\r\n\r\nhello\r\n".encode()


@contextmanager
def backend(maildir: Path, name: str = "mx") -> Iterator[tuple[Twistd, int]]:
    """``twistd slimta`` on a ``haproxy:`` listener (loopback proxies trusted, by default),
    greeting with ``name``."""
    argv = twistd_argv(
        maildir,
        "--banner",
        f"{name} ESMTP",
        "--listen",
        "haproxy:tcp:0:interface=127.0.0.1",
        "--accept-domain",
        "example.com",
        "--trusted-network",
        "127.0.0.3/32",
        "--log-level",
        "debug",  # the PROXY layer's LOCAL connections are debug events
    )
    with running_twistd(argv) as twistd:
        match = _PROXY_PORT.search(twistd.wait_for_line(_PROXY_PORT))
        assert match is not None
        yield twistd, int(match.group(1))


def has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


def relay_attempt(host: str, port: int, source: str, subject: str) -> tuple[int, int]:
    """From ``source``: RCPT to a foreign domain (relay) and to an accepted one; the codes."""
    with smtplib.SMTP(host, port, timeout=TIMEOUT, source_address=(source, 0)) as smtp:
        smtp.ehlo("client.test")
        smtp.mail("a@b.org")
        foreign = smtp.rcpt("x@example.net")[0]
        local = smtp.rcpt("c@example.com")[0]
        smtp.data(message(subject))
        return foreign, local


@pytest.mark.parametrize("send_proxy", ["v1", "v2"])
def test_haproxy_send_proxy_with_smtpchk(tmp_path: Path, send_proxy: str) -> None:
    """HAProxy's smtpchk health checks pass through the PROXY listener (v2: as LOCAL
    connections); each client is known by its own address: 127.0.0.3 may relay, 127.0.0.2 and
    ::1 may not, and Received: names each of them."""
    require_haproxy()
    ipv6 = has_ipv6_loopback()
    hosts = ("127.0.0.1", "::1") if ipv6 else ("127.0.0.1",)
    with ExitStack() as stack:
        twistd, port = stack.enter_context(backend(tmp_path / "md"))
        proxy = stack.enter_context(
            running_haproxy(
                [Server("a", port)], tmp_path / "haproxy", send_proxy, frontend_hosts=hosts
            )
        )
        # wait_ready saw the server UP: smtpchk (banner, EHLO, 2xx) passed through the listener.
        assert proxy.status() == {"a": "UP"}
        results = {
            "127.0.0.2": relay_attempt("127.0.0.1", proxy.port, "127.0.0.2", "from-2"),
            "127.0.0.3": relay_attempt("127.0.0.1", proxy.port, "127.0.0.3", "from-3"),
        }
        if ipv6:
            results["::1"] = relay_attempt("::1", proxy.frontends[1][1], "::1", "from-v6")
        if send_proxy == "v2":
            twistd.wait_for_line(re.compile(r"PROXY v2 LOCAL"))
    assert results["127.0.0.2"] == (554, 250)
    assert results["127.0.0.3"] == (250, 250)
    if ipv6:
        assert results["::1"] == (554, 250)
    messages = stored_messages(tmp_path / "md")
    stored = {s.envelope["client"]["ip"]: s for s in messages if s.envelope}
    assert b"(unknown [127.0.0.2])" in stored["127.0.0.2"].trace
    assert b"(unknown [127.0.0.3])" in stored["127.0.0.3"].trace
    if ipv6:
        assert b"(unknown [IPv6:::1])" in stored["::1"].trace
    assert "127.0.0.1" not in stored  # never the proxy's address


@dataclass
class Load:
    """Messages sent through HAProxy by a few client threads, each retried until a 250; until
    :meth:`stop` or ``limit`` messages."""

    host: str
    port: int
    limit: int = 3000
    threads: int = 4
    acked: dict[str, float] = field(default_factory=dict)  # subject -> time of its 250
    retries: int = 0
    failures: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    started: int = 0
    stopping: threading.Event = field(default_factory=threading.Event)

    def stop(self) -> None:
        self.stopping.set()

    def _next(self) -> int | None:
        with self.lock:
            if self.stopping.is_set() or self.started >= self.limit:
                return None
            self.started += 1
            return self.started - 1

    def run(self) -> None:
        workers = [
            threading.Thread(target=self._client, args=(i,), daemon=True)
            for i in range(self.threads)
        ]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(120)
        assert not any(w.is_alive() for w in workers), "load clients did not finish"

    def _client(self, index: int) -> None:
        while (number := self._next()) is not None:
            subject = f"load-{number:04d}"
            for attempt in range(20):
                try:
                    with smtplib.SMTP(self.host, self.port, timeout=TIMEOUT) as smtp:
                        smtp.sendmail("a@b.org", ["c@example.com"], message(subject))
                except (OSError, smtplib.SMTPException) as e:
                    with self.lock:
                        self.retries += 1
                        if attempt == 19:
                            self.failures.append(f"{subject}: {e!r}")
                    time.sleep(0.05 * (attempt + 1))  # client retry backoff, bounded
                    continue
                with self.lock:
                    self.acked[subject] = time.monotonic()
                break

    def count(self) -> int:
        with self.lock:
            return len(self.acked)


def hold_a_transaction_on(port: int, banner: str) -> socket.socket:
    """Connect through HAProxy until ``banner``'s backend answers; leave that session in the
    middle of DATA (half the message sent). Bounded attempts."""
    for _ in range(50):
        sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        reader = sock.makefile("rb")
        greeting = reader.readline().decode()
        if banner not in greeting:
            sock.close()
            continue
        for line in ("EHLO client.test", "MAIL FROM:<a@b.org>", "RCPT TO:<c@example.com>"):
            sock.sendall(line.encode() + b"\r\n")
            while (reply := reader.readline())[3:4] == b"-":
                pass
            assert reply.startswith(b"250"), reply
        sock.sendall(b"DATA\r\n")
        assert reader.readline().startswith(b"354")
        sock.sendall(message("held-0001")[:20])
        return sock
    raise AssertionError(f"no connection reached {banner} in 50 tries")


def finish_or_retry(sock: socket.socket, port: int) -> tuple[str, int]:
    """Finish the held message; if its backend is gone, send it again from the start."""
    try:
        sock.sendall(message("held-0001")[20:] + b".\r\n")
        reply = sock.makefile("rb").readline()
        if reply:
            return "finished", int(reply[:3])
    except OSError:
        pass
    finally:
        sock.close()
    with smtplib.SMTP("127.0.0.1", port, timeout=TIMEOUT) as smtp:
        smtp.sendmail("a@b.org", ["c@example.com"], message("held-0001"))
    return "retried", 250


def wait_for_acks(load: Load, count: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while load.count() < count and time.monotonic() < deadline and not load.failures:
        time.sleep(0.01)  # polls the load's progress (bounded by the deadline)
    assert load.count() >= count, load.failures


def subjects(maildir: Path) -> list[str]:
    found = []
    for stored in stored_messages(maildir):
        match = re.search(rb"Subject: ((?:load|held)-\d+)", stored.body)
        assert match is not None
        found.append(match.group(1).decode())
    return found


def test_backend_killed_mid_load_is_taken_out_and_clients_retry(tmp_path: Path) -> None:
    """Two backends behind HAProxy (send-proxy-v2, smtpchk every 200 ms); SIGKILL one while
    clients send. HAProxy marks it DOWN; every message that got a 250 is in a Maildir; the rest
    of the load lands on the surviving backend."""
    require_haproxy()
    with ExitStack() as stack:
        twistd_a, port_a = stack.enter_context(backend(tmp_path / "a", "mx-a"))
        _, port_b = stack.enter_context(backend(tmp_path / "b", "mx-b"))
        proxy = stack.enter_context(
            running_haproxy([Server("a", port_a), Server("b", port_b)], tmp_path / "haproxy")
        )
        load = Load("127.0.0.1", proxy.port)
        runner = threading.Thread(target=load.run, daemon=True)
        runner.start()
        wait_for_acks(load, 60)
        held = hold_a_transaction_on(proxy.port, "mx-a")
        twistd_a.kill()
        killed_at = time.monotonic()
        proxy.wait_status({"a": "DOWN", "b": "UP"}, timeout=10)
        down_at = time.monotonic()
        sessions_a_at_down = int(proxy.stat("stot")["a"])
        held_result = finish_or_retry(held, proxy.port)
        wait_for_acks(load, load.count() + 200)
        load.stop()
        runner.join(120)
        assert not runner.is_alive()
        twistd_a.wait(10)
        sessions = {name: int(n) for name, n in proxy.stat("stot").items()}
    in_a, in_b = subjects(tmp_path / "a"), subjects(tmp_path / "b")
    print(
        f"\nhaproxy failover: {len(load.acked)} acknowledged of {load.started}; stored "
        f"a={len(in_a)} b={len(in_b)}; client retries={load.retries}; marked DOWN "
        f"{down_at - killed_at:.2f} s after SIGKILL; haproxy sessions {sessions}"
    )
    assert load.failures == []
    assert len(load.acked) == load.started
    stored = set(in_a) | set(in_b)
    assert set(load.acked) <= stored  # a 250 means stored (fsync) by the backend that said it
    assert in_a and in_b
    # Out of rotation: once DOWN, HAProxy sent the dead backend no more connections, and the
    # messages acknowledged since all came from the other one.
    assert sessions["a"] == sessions_a_at_down
    after_down = [s for s, t in load.acked.items() if t > down_at]
    assert len(after_down) >= 200 and set(after_down) <= set(in_b)
    # A transaction cut by the SIGKILL in the middle of DATA: its client retried, through
    # HAProxy, and the other backend took the message.
    assert held_result == ("retried", 250)
    assert subjects(tmp_path / "b").count("held-0001") == 1
    assert "held-0001" not in in_a
    # Duplicates only where the dead backend stored a message but its 250 never arrived.
    duplicates = {s for s in in_b if in_b.count(s) > 1} | (set(in_a) & set(in_b))
    assert len(duplicates) <= load.threads


def test_missing_haproxy_fails_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under CI=true a missing haproxy is a failure, never a skip."""
    import os
    import shutil

    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setattr(os.path, "exists", lambda path: False)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="haproxy is not installed"):
        require_haproxy()
    monkeypatch.setenv("CI", "false")
    with pytest.raises(pytest.skip.Exception, match=r"\.ci/services"):
        require_haproxy()

"""``twistd slimta --metrics`` as a real process: real SMTP sessions (accepted, refused relay,
oversized, AUTH failure, STARTTLS, implicit TLS, a failed handshake), then exact counter values
in a scrape parsed by prometheus_client's parser and checked by ``promtool check metrics``;
10,000 distinct HELO names leave the label sets as they were; /healthz says 200, then 503
when the Maildir goes away, the relay's next hop or the broker is down; ``--workers 2``: one
scrape gives the totals of both workers."""

from __future__ import annotations

import os
import re
import shutil
import signal
import smtplib
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from slimta_tx.metrics.sink import metric_names
from tests.support.process import Twistd, free_port, running_twistd, twistd_argv
from tests.test_tls_helpers import make_certs

pytestmark = pytest.mark.slow

_METRICS_PORT = re.compile(r"MetricsSite starting on (\d+)")
_TLS_PORT = re.compile(r"SmtpEdge \(TLS\) starting on (\d+)")
MESSAGE = b"Subject: t\r\n\r\nbody\r\n"


def metrics_port(twistd: Twistd) -> int:
    match = _METRICS_PORT.search(twistd.wait_for_line(_METRICS_PORT))
    assert match is not None
    return int(match.group(1))


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(port: int) -> Samples:
    """{(sample name, sorted labels): value} of one scrape, through prometheus_client's parser."""
    status, text = get(port, "/metrics")
    assert status == 200
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return float(samples.get((name, tuple(sorted(labels.items()))), 0.0))


def settled(port: int, name: str, expected: float, **labels: str) -> float:
    """The value of ``name`` once it is ``expected``, or at the deadline: what happens when a
    connection ends (close, a failed handshake) reaches the server a moment after the client
    saw its last reply."""
    end = time.monotonic() + 10.0
    while True:
        found = value(scrape(port), name, **labels)
        if found == expected or time.monotonic() > end:
            return found
        time.sleep(0.05)  # retry interval of a bounded poll


def open_connections(port: int) -> float:
    return settled(port, "slimta_tx_connections_open", 0)


def slimta_series(samples: Samples) -> set[tuple[str, tuple[tuple[str, str], ...]]]:
    return {key for key in samples if key[0].startswith("slimta_tx_")}


def promtool_check(text: str) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        if os.environ.get("CI") == "true":
            pytest.fail("promtool is missing (Debian's prometheus; make services installs it)")
        return
    result = subprocess.run(
        [promtool, "check", "metrics"], input=text.encode(), capture_output=True, timeout=30
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_counters_after_real_sessions(tmp_path: Path) -> None:
    certs = make_certs(tmp_path)
    cert = certs.leaf("localhost", "127.0.0.1", stem="server", combined=False)
    maildir = tmp_path / "Maildir"
    argv = twistd_argv(
        maildir,
        "--metrics",
        "tcp:0:interface=127.0.0.1",
        # Loopback may not relay: only example.com is local.
        "--trusted-network",
        "192.0.2.0/24",
        "--accept-domain",
        "example.com",
        "--max-size",
        "1000",
        "--auth",
        "memory:alice:secret",
        "--allow-insecure-auth",
        "--auth-failure-delay",
        "0",
        "--tls-cert",
        str(cert),
        "--tls-key",
        str(cert.with_suffix(".key")),
        "--tls-listen",
        "tcp:0:interface=127.0.0.1",
    )
    ctx = ssl.create_default_context(cafile=str(certs.ca_file))
    with running_twistd(argv) as twistd:
        port = metrics_port(twistd)
        match = _TLS_PORT.search(twistd.wait_for_line(_TLS_PORT))
        assert match is not None
        tls_port = int(match.group(1))
        # Accepted.
        with smtplib.SMTP("127.0.0.1", twistd.port, timeout=10) as smtp:
            smtp.ehlo("client.test")
            smtp.sendmail("a@sender.test", ["u@example.com", "v@example.com"], MESSAGE)
        # Refused relay.
        with smtplib.SMTP("127.0.0.1", twistd.port, timeout=10) as smtp:
            smtp.ehlo("client.test")
            assert smtp.mail("a@sender.test")[0] == 250
            assert smtp.rcpt("someone@elsewhere.test")[0] == 554
        # Oversized (no SIZE= on MAIL: refused after the body).
        with smtplib.SMTP("127.0.0.1", twistd.port, timeout=10) as smtp:
            smtp.ehlo("client.test")
            assert smtp.mail("a@sender.test")[0] == 250
            assert smtp.rcpt("u@example.com")[0] == 250
            assert smtp.data(b"Subject: big\r\n\r\n" + b"x" * 2000 + b"\r\n")[0] == 552
        # AUTH: one failure, then success, both PLAIN.
        with smtplib.SMTP("127.0.0.1", twistd.port, timeout=10) as smtp:
            smtp.ehlo("client.test")
            smtp.user, smtp.password = "alice", "wrong"
            with pytest.raises(smtplib.SMTPAuthenticationError):
                smtp.auth("PLAIN", smtp.auth_plain)
            smtp.user, smtp.password = "alice", "secret"
            assert smtp.auth("PLAIN", smtp.auth_plain)[0] == 235
        # STARTTLS.
        with smtplib.SMTP("127.0.0.1", twistd.port, timeout=10) as smtp:
            smtp.ehlo("client.test")
            smtp.starttls(context=ctx)
            assert smtp.ehlo("client.test")[0] == 250
        # Implicit TLS, and a handshake that fails.
        with socket.create_connection(("127.0.0.1", tls_port), timeout=10) as raw:
            with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
                assert tls.makefile("rb").readline().startswith(b"220 mx.test")
                tls.sendall(b"QUIT\r\n")
                tls.makefile("rb").readline()
        with socket.create_connection(("127.0.0.1", tls_port), timeout=10) as raw:
            raw.sendall(b"EHLO not-tls\r\n")
            raw.recv(1024)  # the server's TLS alert, or the end
        failed = {"result": "failed", "version": "none"}
        assert settled(port, "slimta_tx_tls_handshakes_total", 1, **failed) == 1
        assert open_connections(port) == 0
        status, text = get(port, "/metrics")
        assert status == 200
        promtool_check(text)
        samples = scrape(port)

        # wait_ready's banner check is a connection too.
        assert value(samples, "slimta_tx_connections_total", listener="smtp", tls="none") == 6
        assert value(samples, "slimta_tx_connections_total", listener="smtp", tls="implicit") == 2
        assert value(samples, "slimta_tx_messages_total", result="accepted") == 1
        assert value(samples, "slimta_tx_messages_total", result="rejected") == 1
        assert value(samples, "slimta_tx_messages_total", result="tempfailed") == 0
        assert value(samples, "slimta_tx_recipients_total", result="accepted") == 2
        assert value(samples, "slimta_tx_recipients_total", result="rejected") == 1
        assert value(samples, "slimta_tx_message_size_bytes_count") == 1
        assert value(samples, "slimta_tx_message_size_bytes_sum") == len(MESSAGE)
        assert value(samples, "slimta_tx_bus_seconds_count", bus="maildir") == 1
        assert value(samples, "slimta_tx_rejections_total", reason="relay") == 1
        assert value(samples, "slimta_tx_rejections_total", reason="size") == 1
        assert value(samples, "slimta_tx_replies_total", code="2.6.x") == 1
        assert value(samples, "slimta_tx_replies_total", code="5.7.x") == 0  # not a message's
        assert value(samples, "slimta_tx_replies_total", code="5.3.x") == 1
        assert value(samples, "slimta_tx_auth_total", mechanism="PLAIN", result="failed") == 1
        assert value(samples, "slimta_tx_auth_total", mechanism="PLAIN", result="ok") == 1
        assert (
            value(samples, "slimta_tx_tls_handshakes_total", result="ok", version="TLSv1.3") == 2
        )
        assert (
            value(samples, "slimta_tx_tls_handshakes_total", result="failed", version="none") == 1
        )
        assert value(samples, "slimta_tx_bus_ready") == 1
        assert value(samples, "process_cpu_seconds_total") > 0  # the library's collectors
        assert value(samples, "python_info", **python_info_labels(samples)) == 1
        families = {f.name for f in text_string_to_metric_families(text)}
        assert {name.removesuffix("_total") for name in metric_names()} <= families

        # 10,000 distinct HELO names (and junk in commands) make no new series.
        before = slimta_series(scrape(port))
        with socket.create_connection(("127.0.0.1", twistd.port), timeout=30) as sock:
            reader = sock.makefile("rb")
            reader.readline()
            for i in range(10_000):
                sock.sendall(f"EHLO helo-{i}.client.test\r\n".encode())
                line = reader.readline()
                while line[3:4] == b"-":
                    line = reader.readline()
                assert line.startswith(b"250 "), line
            sock.sendall(b"QUIT\r\n")
            reader.readline()
        after = scrape(port)
        assert slimta_series(after) == before
        assert not any("helo-" in v for _, labels in after for _, v in labels)
        assert open_connections(port) == 0

        # /healthz: ready; the Maildir gone is a 503 with the reason; back, ready again.
        assert get(port, "/healthz") == (200, "ok\n")
        maildir.rename(tmp_path / "elsewhere")
        status, reason = get(port, "/healthz")
        assert status == 503
        assert reason.startswith("maildir not writable")
        (tmp_path / "elsewhere").rename(maildir)
        assert get(port, "/healthz") == (200, "ok\n")


def python_info_labels(samples: Samples) -> dict[str, str]:
    (labels,) = [dict(labels) for name, labels in samples if name == "python_info"]
    return labels


def test_healthz_when_the_next_hop_is_down(tmp_path: Path) -> None:
    argv = twistd_argv(
        tmp_path / "Maildir",
        "--metrics",
        "tcp:0:interface=127.0.0.1",
        "--relay",
        f"127.0.0.1:{free_port()}",
    )
    with running_twistd(argv) as twistd:
        status, reason = get(metrics_port(twistd), "/healthz")
    assert status == 503
    assert "unreachable" in reason


def test_healthz_when_the_broker_is_down(tmp_path: Path) -> None:
    pytest.importorskip("pika")
    argv = twistd_argv(
        tmp_path / "Maildir",
        "--metrics",
        "tcp:0:interface=127.0.0.1",
        "--amqp",
        f"amqp://guest:guest@127.0.0.1:{free_port()}/%2F",
        "--amqp-queue",
        "metrics-test",
    )
    with running_twistd(argv) as twistd:
        status, reason = get(metrics_port(twistd), "/healthz")
    assert status == 503
    assert reason.startswith("broker not connected")


def test_workers_one_scrape_gives_the_totals(tmp_path: Path) -> None:
    argv = twistd_argv(
        tmp_path / "Maildir", "--metrics", "tcp:0:interface=127.0.0.1", "--workers", "2"
    )
    twistd = Twistd(argv, new_session=True)
    try:
        twistd.wait_ready()
        port = metrics_port(twistd)
        directory = re.search(
            r"workers' metrics in (\S+)", twistd.wait_for_line(re.compile("workers' metrics in"))
        )
        assert directory is not None
        for _ in range(2):
            twistd.wait_for_line(re.compile(r"worker \d ready"))
        for _ in range(6):
            with smtplib.SMTP("127.0.0.1", twistd.port, timeout=10) as smtp:
                smtp.sendmail("a@sender.test", ["postmaster"], MESSAGE)
        # A worker's counts reach its files every second.
        assert settled(port, "slimta_tx_messages_total", 6, result="accepted") == 6
        samples = scrape(port)
        assert open_connections(port) == 0
        assert value(samples, "slimta_tx_bus_ready") == 1
        assert get(port, "/healthz") == (200, "ok\n")
        promtool_check(get(port, "/metrics")[1])
        twistd.kill(signal.SIGTERM)
        assert twistd.wait(30) in (0, -signal.SIGTERM)
        assert not Path(directory.group(1)).exists()
    finally:
        if twistd.proc.poll() is None:
            os.killpg(twistd.pid, signal.SIGKILL)
        twistd.stop()

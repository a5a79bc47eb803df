"""``twistd slimta`` behind a proxy: ``haproxy:`` listeners, --proxy-from, --proxy-timeout; the
options as parsed and the service they build, then real ``twistd`` processes (the issue's own
reproduction among them)."""

from __future__ import annotations

import re
import smtplib
import socket
import ssl
import time
from pathlib import Path
from typing import Any

import pytest
from test_tls_helpers import make_certs
from twisted.application.internet import StreamServerEndpointService
from twisted.internet.testing import MemoryReactorClock
from twisted.python import usage

from slimta_tx.policy import DEFAULT_TRUSTED_NETWORKS, parse_network
from slimta_tx.proxy import ProxyFactory
from slimta_tx.proxy_header import v1_header, v2_header
from slimta_tx.tap import Options, makeService
from tests.support.mailbox import stored_messages
from tests.support.process import Twistd, running_twistd, twistd_argv
from tests.support.proxied import ProxiedSMTP, ProxiedSMTP_SSL

CLIENT = ("203.0.113.9", 40000)
LISTENER = ("127.0.0.1", 25)
MESSAGE = b"From: a@b.org\r\nSubject: behind a proxy\r\n\r\nhello\r\n"


def parse(*args: str) -> Options:
    config = Options()
    config.parseOptions(list(args))
    return config


def test_defaults_trust_loopback_proxies_for_10_seconds() -> None:
    config = parse("--listen", "haproxy:tcp:2526")
    assert config["policy"].trusted_proxies == DEFAULT_TRUSTED_NETWORKS
    assert config["policy"].proxy_timeout == 10.0


def test_options_set_the_policy() -> None:
    config = parse(
        "--listen",
        "haproxy:tcp:2526",
        "--proxy-from",
        "10.0.0.0/8",
        "--proxy-from",
        "fd00::1",
        "--proxy-timeout",
        "2.5",
    )
    assert config["policy"].trusted_proxies == (
        parse_network("10.0.0.0/8"),
        parse_network("fd00::1"),
    )
    assert config["policy"].proxy_timeout == 2.5


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--proxy-from", "10.0.0.0/8"], "--proxy-from only matters with a haproxy: listener"),
        (["--proxy-timeout", "3"], "--proxy-timeout only matters with a haproxy: listener"),
        (["--listen", "haproxy:tcp:1", "--proxy-from", "10/99"], "not a network in CIDR"),
        (["--listen", "haproxy:tcp:1", "--proxy-timeout", "0"], "must be more than 0"),
        (["--listen", "haproxy:ssl:465"], "the PROXY header comes in clear, before TLS"),
        (["--listen", "haproxy:haproxy:tcp:1"], "'haproxy:' twice"),
        (["--listen", "haproxy:"], "nothing to listen on"),
    ],
)
def test_bad_values_are_one_line_usage_errors(args: list[str], message: str) -> None:
    with pytest.raises(usage.UsageError) as caught:
        parse(*args)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_haproxy_listeners_get_slimta_tx_s_proxy_layer(tmp_path: Path) -> None:
    """``haproxy:`` in --listen and --tls-listen: the endpoint after the prefix, served through
    ProxyFactory (TLS inside it for --tls-listen); plain listeners stay as they were."""
    certs = make_certs(tmp_path)
    config = parse(
        "--maildir",
        str(tmp_path / "md"),
        "--listen",
        "tcp:2525:interface=127.0.0.1",
        "--listen",
        "haproxy:tcp:2526:interface=127.0.0.1",
        "--tls-cert",
        str(certs.leaf("mx.test")),
        "--tls-listen",
        "haproxy:tcp:4650:interface=127.0.0.1",
    )
    service: Any = makeService(config, reactor=MemoryReactorClock())
    listeners = [s for s in service if isinstance(s, StreamServerEndpointService)]
    factories = [s.factory for s in listeners]
    assert factories[0] is service.edge
    assert isinstance(factories[1], ProxyFactory)
    assert factories[1].wrappedFactory is service.edge
    assert isinstance(factories[2], ProxyFactory)
    assert type(factories[2].wrappedFactory).__name__ == "TLSMemoryBIOFactory"
    assert factories[2].wrappedFactory.wrappedFactory is service.edge
    assert [s.endpoint._port for s in listeners] == [2525, 2526, 4650]  # not Twisted's wrapper


# -- twistd ------------------------------------------------------------------------------------

_PROXY_PORT = re.compile(r"SmtpEdge \(PROXY\) starting on (\d+)")
_TLS_PROXY_PORT = re.compile(r"SmtpEdge \(TLS\) \(PROXY\) starting on (\d+)")


def proxy_port(twistd: Twistd, pattern: re.Pattern[str] = _PROXY_PORT) -> int:
    match = pattern.search(twistd.wait_for_line(pattern))
    assert match is not None
    return int(match.group(1))


def read_until_closed(port: int, send: bytes = b"", timeout: float = 10) -> tuple[bytes, float]:
    """What the server sent before it closed, and how long that took (bounded)."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        if send:
            sock.sendall(send)
        received = b""
        while True:
            try:
                chunk = sock.recv(4096)
            except ConnectionResetError:
                break
            if not chunk:
                break
            received += chunk
    return received, time.monotonic() - started


@pytest.mark.slow
def test_twistd_behind_a_proxy_as_the_issue_tried_it(tmp_path: Path) -> None:
    """Issue 10, step by step: ``--listen haproxy:tcp:...``, the v1 header of 203.0.113.9,
    EHLO, MAIL, RCPT to a domain not accepted: 554 5.7.1 (it was 250). A local recipient is
    delivered with the client in Received: and the envelope. A connection without a header
    gets no banner."""
    maildir = tmp_path / "Maildir"
    argv = twistd_argv(
        maildir,
        "--listen",
        "haproxy:tcp:0:interface=127.0.0.1",
        "--accept-domain",
        "example.com",
    )
    with running_twistd(argv) as twistd:
        port = proxy_port(twistd)
        with ProxiedSMTP(v1_header(CLIENT, LISTENER), "127.0.0.1", port, timeout=10) as smtp:
            assert smtp.ehlo("client.test")[0] == 250
            assert smtp.mail("a@b.org")[0] == 250
            refused = smtp.rcpt("c@example.net")
            assert refused == (554, b"5.7.1 <c@example.net>: Relay access denied")
            assert smtp.rcpt("c@example.com")[0] == 250
            assert smtp.data(MESSAGE)[0] == 250
        assert read_until_closed(port, b"EHLO client.test\r\n")[0] == b""
        twistd.wait_for_line(re.compile(r"malformed PROXY header"))
    [stored] = stored_messages(maildir)
    assert b"(unknown [203.0.113.9])" in stored.trace
    assert stored.envelope is not None and stored.envelope["client"]["ip"] == CLIENT[0]


@pytest.mark.slow
def test_twistd_proxy_from_and_proxy_timeout(tmp_path: Path) -> None:
    """--proxy-from without loopback: a loopback connection is closed unread and logged.
    --proxy-timeout 0.5: a silent connection from a trusted proxy is closed after about that,
    without a banner."""
    base = ["--listen", "haproxy:tcp:0:interface=127.0.0.1"]
    argv = twistd_argv(tmp_path / "md", *base, "--proxy-from", "192.0.2.0/24")
    with running_twistd(argv) as twistd:
        port = proxy_port(twistd)
        assert read_until_closed(port, v2_header(CLIENT, LISTENER))[0] == b""
        twistd.wait_for_line(re.compile(r"127\.0\.0\.1:\d+: not a trusted proxy"))
    argv = twistd_argv(tmp_path / "md", *base, "--proxy-timeout", "0.5")
    with running_twistd(argv) as twistd:
        port = proxy_port(twistd)
        received, took = read_until_closed(port)
        assert received == b""
        assert 0.4 < took < 5
        twistd.wait_for_line(re.compile(r"no PROXY header within 0.5 s"))


@pytest.mark.slow
def test_twistd_tls_listen_behind_a_proxy(tmp_path: Path) -> None:
    """``--tls-listen haproxy:tcp:...``: the header in clear, then TLS from the first byte."""
    certs = make_certs(tmp_path)
    cert = certs.leaf("localhost", "127.0.0.1", stem="server")
    maildir = tmp_path / "Maildir"
    argv = twistd_argv(
        maildir,
        "--tls-cert",
        str(cert),
        "--tls-listen",
        "haproxy:tcp:0:interface=127.0.0.1",
        "--accept-domain",
        "example.com",
    )
    ctx = ssl.create_default_context(cafile=str(certs.ca_file))
    with running_twistd(argv) as twistd:
        port = proxy_port(twistd, _TLS_PROXY_PORT)
        header = v2_header(("2001:db8::9", 40000), ("2001:db8::25", 465))
        with ProxiedSMTP_SSL(header, "localhost", port, timeout=10, context=ctx) as smtp:
            smtp.ehlo("client.test")
            with pytest.raises(smtplib.SMTPRecipientsRefused):
                smtp.sendmail("a@b.org", ["c@example.net"], MESSAGE)
            assert smtp.sendmail("a@b.org", ["c@example.com"], MESSAGE) == {}
    [stored] = stored_messages(maildir)
    assert b"[IPv6:2001:db8::9]" in stored.trace and b"with ESMTPS" in stored.trace

"""``twistd slimta`` with TLS options, as a real process (issue 3): STARTTLS plus a --tls-listen
port, --require-tls, and SIGHUP reloading the certificate while a connection stays open."""

from __future__ import annotations

import re
import signal
import smtplib
import socket
import ssl
from pathlib import Path

import pytest
from support.process import running_twistd, twistd_argv
from test_tls_helpers import make_certs

pytestmark = pytest.mark.slow

_TLS_PORT = re.compile(r"SmtpEdge \(TLS\) starting on (\d+)")
MESSAGE = b"Subject: t\r\n\r\nbody\r\n"


def serial_of(port: int, ctx: ssl.SSLContext) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            assert tls.makefile("rb").readline().startswith(b"220 mx.test")
            return int(tls.getpeercert()["serialNumber"], 16)  # type: ignore[index]


def test_twistd_tls_listen_require_tls_and_sighup_reload(tmp_path: Path) -> None:
    """Plaintext MAIL gets 530 5.7.0 (--require-tls), STARTTLS then delivers; the
    --tls-listen port speaks TLS at once; after new files and SIGHUP new connections get the
    new certificate while an open session keeps working."""
    certs = make_certs(tmp_path)
    cert = certs.leaf("localhost", "127.0.0.1", stem="server", combined=False)
    argv = twistd_argv(
        tmp_path / "Maildir",
        "--tls-cert",
        str(cert),
        "--tls-key",
        str(cert.with_suffix(".key")),
        "--tls-listen",
        "tcp:0:interface=127.0.0.1",
        "--require-tls",
    )
    ctx = ssl.create_default_context(cafile=str(certs.ca_file))
    with running_twistd(argv) as twistd:
        match = _TLS_PORT.search(twistd.wait_for_line(_TLS_PORT))
        assert match is not None
        tls_port = int(match.group(1))
        with smtplib.SMTP("127.0.0.1", twistd.port, timeout=10) as smtp:
            smtp.ehlo("client.test")
            assert smtp.mail("a@sender.test") == (
                530,
                b"5.7.0 Must issue a STARTTLS command first",
            )
            smtp.starttls(context=ctx)
            smtp.sendmail("a@sender.test", ["postmaster"], MESSAGE)
            before = serial_of(tls_port, ctx)
            certs.leaf("localhost", "127.0.0.1", stem="server", combined=False)
            twistd.kill(signal.SIGHUP)
            twistd.wait_for_line(re.compile("TLS certificates reloaded"))
            after = serial_of(tls_port, ctx)
            assert smtp.noop()[0] == 250  # the session opened before the reload goes on
        assert before != after
        assert len(list((tmp_path / "Maildir" / "new").iterdir())) == 1


_WORKER_READY = re.compile(r"worker 2 ready \(pid")


@pytest.mark.parametrize("layer", ["stdlib", "twisted"])
def test_twistd_workers_starttls(tmp_path: Path, layer: str) -> None:
    """``--workers 2`` with STARTTLS, on either TLS layer: the workers' sessions start TLS and
    deliver (Received: says ESMTPS); the transaction lines carry the TLS version."""
    certs = make_certs(tmp_path)
    cert = certs.leaf("localhost", "127.0.0.1", stem="server")
    maildir = tmp_path / "Maildir"
    argv = twistd_argv(maildir, "--tls-cert", str(cert), "--workers", "2", "--tls-layer", layer)
    ctx = ssl.create_default_context(cafile=str(certs.ca_file))
    with running_twistd(argv) as twistd:
        twistd.wait_for_line(_WORKER_READY)
        for _ in range(4):
            with smtplib.SMTP("127.0.0.1", twistd.port, timeout=10) as smtp:
                smtp.starttls(context=ctx)
                smtp.sendmail("a@sender.test", ["postmaster"], MESSAGE)
        output = twistd.output
    messages = [p.read_bytes() for p in (maildir / "new").iterdir()]
    assert len(messages) == 4
    assert all(b"with ESMTPS" in m for m in messages)
    assert "TLSv1.3" in output

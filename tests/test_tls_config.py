"""Loading certificates and the TLS options of ``twistd slimta`` (issue 3): what works, and
the one-line error a user gets for what does not."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import pytest
import trustme
from cryptography.hazmat.primitives.serialization import (
    BestAvailableEncryption,
    Encoding,
    PrivateFormat,
    load_pem_private_key,
)
from test_tls_helpers import Certs, make_certs
from twisted.python import usage

from slimta_tx import ServerTLS, TLSConfigError
from slimta_tx.cli import tls as tls_options
from slimta_tx.service import SighupReload
from slimta_tx.tap import Options, makeService
from slimta_tx.tls import load_identity


@pytest.fixture
def certs(tmp_path: Path) -> Certs:
    return make_certs(tmp_path)


def one_line(error: BaseException) -> str:
    text = str(error)
    assert "\n" not in text and "Traceback" not in text, text
    return text


def test_combined_pem_with_chain(certs: Certs) -> None:
    """One PEM with key, certificate and intermediate loads; the chain is kept in order."""
    intermediate = certs.ca.create_child_ca()
    issued = intermediate.issue_cert("mx.example.com")
    path = certs.directory / "combined.pem"
    path.write_bytes(
        issued.private_key_pem.bytes() + b"".join(b.bytes() for b in issued.cert_chain_pems)
    )
    identity = load_identity(str(path))
    assert identity.names == ["mx.example.com"]
    assert len(identity.chain) == 1


def test_separate_key_and_chain_files(certs: Certs) -> None:
    """--tls-cert, --tls-key and --tls-chain as three files make one identity."""
    intermediate = certs.ca.create_child_ca()
    issued = intermediate.issue_cert("mx.example.com")
    cert, key, chain = (certs.directory / n for n in ("c.pem", "k.pem", "chain.pem"))
    cert.write_bytes(issued.cert_chain_pems[0].bytes())
    key.write_bytes(issued.private_key_pem.bytes())
    chain.write_bytes(issued.cert_chain_pems[1].bytes())
    identity = load_identity(str(cert), str(key), str(chain))
    assert len(identity.chain) == 1
    assert ServerTLS(str(cert), str(key), str(chain)).default.names == ["mx.example.com"]


def test_mismatched_key_is_refused(certs: Certs) -> None:
    """A key that belongs to another certificate is a clear one-line error."""
    cert = certs.leaf("mx.example.com", combined=False)
    other = certs.leaf("other.example.com", combined=False)
    with pytest.raises(TLSConfigError) as info:
        ServerTLS(str(cert), str(other.with_suffix(".key")))
    assert "does not match the certificate" in one_line(info.value)


def test_unreadable_and_malformed_files(certs: Certs) -> None:
    """Missing files, non-PEM data and a certificate without a key each say what is wrong."""
    missing = certs.directory / "nope.pem"
    with pytest.raises(TLSConfigError, match=r"cannot read certificate .*nope\.pem"):
        ServerTLS(str(missing))
    junk = certs.directory / "junk.pem"
    junk.write_text("hello\n")
    with pytest.raises(TLSConfigError, match="holds no PEM certificate"):
        ServerTLS(str(junk))
    cert_only = certs.leaf("mx.example.com", combined=False)
    with pytest.raises(TLSConfigError, match="holds no private key"):
        ServerTLS(str(cert_only))


def test_encrypted_key_is_refused(certs: Certs) -> None:
    """A passphrase-protected key cannot be used unattended: say so."""
    cert = certs.leaf("mx.example.com", combined=False)
    key_path = cert.with_suffix(".key")
    key = load_pem_private_key(key_path.read_bytes(), None)
    key_path.write_bytes(
        key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, BestAvailableEncryption(b"secret"))
    )
    with pytest.raises(TLSConfigError, match="is encrypted"):
        ServerTLS(str(cert), str(key_path))


def test_policy_values_are_checked(certs: Certs) -> None:
    """An unknown minimum version or a cipher list that matches nothing is refused."""
    cert = certs.leaf("mx.example.com")
    with pytest.raises(TLSConfigError, match=r"1\.2, 1\.3"):
        ServerTLS(str(cert), min_version="1.0")
    with pytest.raises(TLSConfigError, match="no cipher matches"):
        ServerTLS(str(cert), ciphers="NOT-A-CIPHER")


def test_certificate_dir_default_and_errors(certs: Certs, tmp_path: Path) -> None:
    """Without --tls-cert the directory's default.pem serves unknown names; an empty
    directory is an error."""
    directory = tmp_path / "dir"
    directory.mkdir()
    with pytest.raises(TLSConfigError, match=r"has no NAME\.pem file"):
        ServerTLS(None, certificate_dir=str(directory))
    by_name = Certs(certs.ca, directory, certs.ca_file)
    by_name.leaf("a.example.com")
    by_name.leaf("fallback.example.com", stem="default")
    context = ServerTLS(None, certificate_dir=str(directory))
    assert context.default.names == ["fallback.example.com"]
    assert context.context_for_name("A.Example.COM.") is not None
    assert context.context_for_name("b.example.com") is None


def test_reload_failure_keeps_the_old_configuration(certs: Certs) -> None:
    """reload() with a broken file raises and changes nothing; fixed files load."""
    cert = certs.leaf("mx.example.com", combined=False)
    context = ServerTLS(str(cert), str(cert.with_suffix(".key")))
    before = context.default.certificate
    cert.write_text("garbage")
    with pytest.raises(TLSConfigError):
        context.reload()
    assert context.default.certificate == before
    assert tls_options.reload_certificates(context) is False
    certs.leaf("mx.example.com", combined=False)
    assert tls_options.reload_certificates(context) is True
    assert context.default.certificate != before


# -- the command line --------------------------------------------------------------------------


def parse(*argv: str) -> Options:
    options = Options()
    options.parseOptions(["--maildir", "/tmp/unused-maildir", *argv])
    return options


def test_cli_bad_certificate_is_a_one_line_usage_error(certs: Certs) -> None:
    """twistd slimta --tls-cert with a mismatched key: one line naming the problem."""
    cert = certs.leaf("mx.example.com", combined=False)
    other = certs.leaf("x.example.com", combined=False)
    with pytest.raises(usage.UsageError) as info:
        parse("--tls-cert", str(cert), "--tls-key", str(other.with_suffix(".key")))
    message = one_line(info.value)
    assert message.startswith("TLS: private key")
    assert "does not match" in message


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--tls-listen", "tcp:465"], "--tls-listen needs --tls-cert"),
        (["--require-tls"], "--require-tls needs --tls-cert"),
        (["--tls-key", "k.pem"], "--tls-key needs --tls-cert"),
        (["--tls-min-version", "1.3"], "--tls-min-version needs --tls-cert"),
    ],
)
def test_cli_options_that_need_a_certificate(argv: list[str], message: str) -> None:
    """TLS options without a certificate are refused rather than silently ignored."""
    with pytest.raises(usage.UsageError, match=message):
        parse(*argv)


def test_cli_min_version_is_checked(certs: Certs) -> None:
    """--tls-min-version accepts 1.2 and 1.3 only."""
    with pytest.raises(usage.UsageError, match=r"--tls-min-version must be one of 1\.2, 1\.3"):
        parse("--tls-cert", str(certs.leaf("mx.example.com")), "--tls-min-version", "1.1")


def test_cli_builds_tls_listeners_and_enables_starttls(certs: Certs, tmp_path: Path) -> None:
    """--tls-cert turns on STARTTLS; each --tls-listen adds a listener; --require-tls is set."""
    from twisted.internet.task import Clock

    class FakeReactor(Clock):
        def __init__(self) -> None:
            super().__init__()
            self.triggers: list[tuple[str, str, Any]] = []

        def addSystemEventTrigger(self, phase: str, event: str, f: Any, *a: Any) -> None:
            self.triggers.append((phase, event, f))

    options = Options()
    options.parseOptions(
        [
            "--maildir",
            str(tmp_path / "md"),
            "--tls-cert",
            str(certs.leaf("mx.example.com")),
            "--tls-listen",
            "tcp:0:interface=127.0.0.1",
            "--tls-listen",
            "tcp:0:interface=127.0.0.1",
            "--require-tls",
        ]
    )
    fake = FakeReactor()
    service = makeService(options, reactor=fake)
    edge = service.edge  # type: ignore[attr-defined]
    assert edge.tls_context is options["tls"]
    assert edge.require_tls is True
    assert "STARTTLS" in edge.extra_commands
    tls_factories = [
        s.factory  # type: ignore[attr-defined]
        for s in service  # type: ignore[attr-defined]
        if type(getattr(s, "factory", None)).__name__ == "TLSMemoryBIOFactory"
    ]
    assert len(tls_factories) == 2
    assert all(f.wrappedFactory is edge for f in tls_factories)
    # SIGHUP reloads the certificates through the edge's one reload service.
    assert service.reloads is not None  # type: ignore[attr-defined]
    assert len(service.reloads.callbacks) == 1  # type: ignore[attr-defined]


def test_sighup_handler_reloads_in_the_reactor(certs: Certs) -> None:
    """The SIGHUP handler does not reload inside the signal handler: it schedules the reload
    in the reactor thread, which then picks up the new certificate."""
    cert = certs.leaf("mx.example.com")
    context = ServerTLS(str(cert))
    before = context.default.certificate
    scheduled: list[Any] = []

    class FakeReactor:
        def callWhenRunning(self, f: Any) -> None:
            f()

        def callFromThread(self, f: Any, *args: Any) -> None:
            scheduled.append((f, args))

    reloads = SighupReload(FakeReactor())
    reloads.add(lambda: tls_options.reload_certificates(context))
    reloads.startService()
    try:
        handler = signal.getsignal(signal.SIGHUP)
        assert callable(handler)
        certs.leaf("mx.example.com")  # new files on disk
        handler(signal.SIGHUP, None)
        assert context.default.certificate == before  # nothing happened inside the handler
        [(f, args)] = scheduled
        f(*args)
        assert context.default.certificate != before
    finally:
        reloads.stopService()


def test_trustme_ca_issued_names_are_reported(certs: Certs) -> None:
    """Identity.names lists the certificate's DNS names (used in logs and for SNI)."""
    issued = trustme.CA().issue_cert("a.example.com", "b.example.com")
    path = certs.directory / "two.pem"
    path.write_bytes(
        issued.private_key_pem.bytes() + b"".join(b.bytes() for b in issued.cert_chain_pems)
    )
    assert load_identity(str(path)).names == ["a.example.com", "b.example.com"]

"""PEM files -> a TLS server configuration; the TLS facts a session records.

:class:`ServerTLS` is what :meth:`slimta_tx.factory.SmtpEdge.enable_tls` usually gets. It reads
a certificate, its key and chain (one combined PEM or separate files) with ``cryptography``,
checks that the key matches the certificate, and builds Twisted ``CertificateOptions`` with
TLS 1.2 as the lowest version. Optionally:

- a directory of certificates, one PEM per server name (``mail.example.com.pem``, or
  ``*.example.com.pem`` for a wildcard), chosen by the name the client asks for (SNI);
- a CA file to verify client certificates against (asked for, never required: the result is
  recorded in :class:`~slimta_tx.envelope.TLSInfo` for validators to decide);
- a higher minimum version and a narrower OpenSSL cipher list.

:meth:`ServerTLS.reload` reads everything again: connections already open keep their
certificate, new connections get the new one; if anything is wrong the old configuration
stays and :class:`TLSConfigError` says why in one line.
"""

from __future__ import annotations

import os
import ssl
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, cast

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
    load_pem_private_key,
)
from OpenSSL import SSL
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.internet.ssl import AcceptableCiphers, CertificateOptions, TLSVersion
from twisted.logger import Logger
from zope.interface import implementer

from slimta_tx.envelope import TLSInfo

__all__ = [
    "LAYERS",
    "MIN_VERSIONS",
    "Identity",
    "ServerTLS",
    "TLSConfigError",
    "load_identity",
    "tls_info",
]

#: ``--tls-min-version`` values.
MIN_VERSIONS = {"1.2": TLSVersion.TLSv1_2, "1.3": TLSVersion.TLSv1_3}
_STDLIB_MIN_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}

#: ``--tls-layer`` values: which TLS implementation serves STARTTLS (see slimta_tx.tlslayer).
LAYERS = ("stdlib", "twisted")

_PRIVATE_KEY_MARKER = b"PRIVATE KEY-----"

# Client certificates that did not verify: the connection is kept (the handshake succeeds, as
# with Postfix), the fact is recorded here and reported as client_certificate_verified=False.
_VERIFY_FAILED: weakref.WeakKeyDictionary[SSL.Connection, int] = weakref.WeakKeyDictionary()


class TLSConfigError(ValueError):
    """A certificate, key, CA file or TLS setting that cannot be used; the message is one line."""


@dataclass(frozen=True)
class Identity:
    """A private key, its certificate and the intermediate certificates that follow it."""

    key: Any
    certificate: x509.Certificate
    chain: tuple[x509.Certificate, ...] = ()
    source: str = ""

    @property
    def names(self) -> list[str]:
        """The DNS names of the certificate (subject alternative names, else the CN)."""
        try:
            san = self.certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
            return [str(name) for name in san.value.get_values_for_type(x509.DNSName)]
        except x509.ExtensionNotFound:
            return [
                str(attribute.value)
                for attribute in self.certificate.subject.get_attributes_for_oid(
                    x509.NameOID.COMMON_NAME
                )
            ]

    @property
    def expires(self) -> datetime:
        return self.certificate.not_valid_after_utc


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise TLSConfigError(f"cannot read {what} {path}: {e.strerror or e}") from None


def _certificates(data: bytes, path: str, what: str) -> list[x509.Certificate]:
    try:
        certificates = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise TLSConfigError(f"{what} {path} holds no PEM certificate") from None
    return certificates


def _private_key(data: bytes, path: str) -> Any:
    try:
        return load_pem_private_key(data, password=None)
    except TypeError:
        raise TLSConfigError(
            f"private key {path} is encrypted; give an unencrypted key (readable by this user "
            "only)"
        ) from None
    except (ValueError, UnsupportedAlgorithm) as e:
        raise TLSConfigError(f"cannot load the private key in {path}: {_first_line(e)}") from None


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _public_der(key: Any) -> bytes:
    return cast(bytes, key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo))


def load_identity(certificate: str, key: str | None = None, chain: str | None = None) -> Identity:
    """Read a certificate (with any chain after it) and its key.

    ``key`` may be omitted when the certificate file also holds the key (a combined PEM);
    ``chain`` adds intermediate certificates. Raises :class:`TLSConfigError`.
    """
    certificate_data = _read(certificate, "certificate")
    certificates = _certificates(certificate_data, certificate, "certificate")
    if key is None:
        if _PRIVATE_KEY_MARKER not in certificate_data:
            raise TLSConfigError(
                f"certificate {certificate} holds no private key; give the key file too"
            )
        private_key = _private_key(certificate_data, certificate)
        key_path = certificate
    else:
        private_key = _private_key(_read(key, "private key"), key)
        key_path = key
    leaf, extra = certificates[0], certificates[1:]
    if chain is not None:
        extra += _certificates(_read(chain, "certificate chain"), chain, "certificate chain")
    try:
        matches = _public_der(leaf.public_key()) == _public_der(private_key.public_key())
    except Exception:  # an unusual key type: let OpenSSL's check below decide
        matches = True
    if not matches:
        raise TLSConfigError(
            f"private key {key_path} does not match the certificate in {certificate}"
        )
    return Identity(private_key, leaf, tuple(extra), certificate)


def _identities_in(directory: str) -> dict[str, Identity]:
    """``name.pem`` files (key, certificate and chain in each) keyed by lower-case name."""
    try:
        entries = sorted(os.listdir(directory))
    except OSError as e:
        raise TLSConfigError(
            f"cannot read certificate directory {directory}: {e.strerror or e}"
        ) from None
    identities: dict[str, Identity] = {}
    for entry in entries:
        if not entry.endswith(".pem") or entry.startswith("."):
            continue
        name = entry[: -len(".pem")].lower().rstrip(".")
        identities[name] = load_identity(os.path.join(directory, entry))
    if not identities:
        raise TLSConfigError(f"certificate directory {directory} has no NAME.pem file")
    return identities


def _parse_ciphers(ciphers: str | None) -> Any:
    if ciphers is None:
        return None
    try:
        SSL.Context(SSL.TLS_SERVER_METHOD).set_cipher_list(ciphers.encode("ascii"))
    except (SSL.Error, UnicodeEncodeError):
        raise TLSConfigError(f"no cipher matches {ciphers!r}") from None
    return AcceptableCiphers.fromOpenSSLCipherString(ciphers)


def _record_verification(
    connection: SSL.Connection, certificate: Any, error: int, depth: int, ok: int
) -> bool:
    if not ok:
        _VERIFY_FAILED.setdefault(connection, error)
    return True  # never fail the handshake: validators decide what an unverified client gets


@implementer(IOpenSSLServerConnectionCreator)
class ServerTLS:
    """Certificates and TLS policy for a server; give it to ``SmtpEdge.enable_tls``.

    :param certificate: PEM with the certificate (and chain; and key when ``key`` is None).
        May be None when ``certificate_dir`` is given.
    :param key: PEM with the private key.
    :param chain: PEM with intermediate certificates.
    :param certificate_dir: a directory of ``NAME.pem`` files chosen by SNI. Without
        ``certificate``, ``default.pem`` there (else the first file) serves clients that send
        no name or an unknown one.
    :param client_ca: PEM with the CAs client certificates are verified against; when given,
        clients are asked for a certificate (optional for them).
    :param min_version: ``"1.2"`` (the default) or ``"1.3"``.
    :param ciphers: an OpenSSL cipher list for TLS 1.2 (TLS 1.3 suites are always safe).
    """

    log = Logger()

    def __init__(
        self,
        certificate: str | None,
        key: str | None = None,
        chain: str | None = None,
        *,
        certificate_dir: str | None = None,
        client_ca: str | None = None,
        min_version: str = "1.2",
        ciphers: str | None = None,
        layer: str = "stdlib",
    ) -> None:
        if certificate is None and certificate_dir is None:
            raise TLSConfigError("a certificate or a certificate directory is needed")
        if certificate is None and (key is not None or chain is not None):
            raise TLSConfigError("a key or chain needs the certificate it belongs to")
        if min_version not in MIN_VERSIONS:
            raise TLSConfigError(
                f"minimum TLS version must be one of {', '.join(MIN_VERSIONS)}, "
                f"not {min_version!r}"
            )
        self.certificate = certificate
        self.key = key
        self.chain = chain
        self.certificate_dir = certificate_dir
        self.client_ca = client_ca
        if layer not in LAYERS:
            raise TLSConfigError(f"TLS layer must be one of {', '.join(LAYERS)}, not {layer!r}")
        self.min_version = min_version
        self.ciphers = ciphers
        self.layer = layer
        self.default: Identity
        self.identities: dict[str, Identity] = {}
        self._context: SSL.Context
        self._by_name: dict[str, SSL.Context] = {}
        self._stdlib: ssl.SSLContext | None = None
        self._stdlib_by_name: dict[str, ssl.SSLContext] = {}
        self.reload()

    # -- loading -----------------------------------------------------------------------------

    def reload(self) -> None:
        """Read every file again and use the result for new connections.

        Open connections are not touched. On any error the previous configuration stays in
        use and :class:`TLSConfigError` is raised.
        """
        acceptable = _parse_ciphers(self.ciphers)
        identities = _identities_in(self.certificate_dir) if self.certificate_dir else {}
        if self.certificate is not None:
            default = load_identity(self.certificate, self.key, self.chain)
        else:
            default = identities.get("default") or next(iter(identities.values()))
        client_cas: list[x509.Certificate] = []
        if self.client_ca is not None:
            client_cas = _certificates(
                _read(self.client_ca, "client CA file"), self.client_ca, "client CA file"
            )
        context = self._build(default, acceptable, client_cas, sni=bool(identities))
        by_name = {
            name: self._build(identity, acceptable, client_cas, sni=False)
            for name, identity in identities.items()
        }
        stdlib: ssl.SSLContext | None = None
        stdlib_by_name: dict[str, ssl.SSLContext] = {}
        if self.layer == "stdlib" and not client_cas and _memory_files():
            stdlib = self._build_stdlib(default, context)
            stdlib_by_name = {
                name: self._build_stdlib(identity, by_name[name])
                for name, identity in identities.items()
            }
            stdlib.sni_callback = self._stdlib_sni
        # Swap only when everything loaded: a bad file never leaves a half-built state.
        self.default, self.identities = default, identities
        self._context, self._by_name = context, by_name
        self._stdlib, self._stdlib_by_name = stdlib, stdlib_by_name
        for identity in [default, *identities.values()]:
            if identity.expires < datetime.now(timezone.utc):
                self.log.warn(
                    "TLS certificate {source} for {names} expired on {expires}",
                    source=identity.source,
                    names=",".join(identity.names),
                    expires=identity.expires.isoformat(),
                )

    def _build(
        self,
        identity: Identity,
        acceptable: Any,
        client_cas: Sequence[x509.Certificate],
        sni: bool,
    ) -> SSL.Context:
        # CertificateOptions takes cryptography objects as they are (pyOpenSSL's own X509 and
        # PKey wrappers are deprecated); its annotations lag behind.
        options = CertificateOptions(
            privateKey=cast(Any, identity.key),
            certificate=cast(Any, identity.certificate),
            extraCertChain=cast(Any, list(identity.chain)) or None,
            raiseMinimumTo=MIN_VERSIONS[self.min_version],
            acceptableCiphers=acceptable,
            contextForServerName=self._context_for_name if sni else None,
        )
        try:
            context = options.getContext()
        except (SSL.Error, ValueError) as e:
            raise TLSConfigError(f"{identity.source}: {_first_line(e)}") from None
        if client_cas:
            assert self.client_ca is not None
            context.load_verify_locations(self.client_ca)
            for ca in client_cas:
                context.add_client_ca(ca)
            context.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_CLIENT_ONCE, _record_verification)
        return context

    def _build_stdlib(self, identity: Identity, twin: SSL.Context) -> ssl.SSLContext:
        """The standard-library context serving ``identity`` as ``twin`` does (same versions,
        same TLS 1.2 ciphers in the same order, no session tickets)."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = _STDLIB_MIN_VERSIONS[self.min_version]
        context.options |= ssl.OP_NO_TICKET | ssl.OP_NO_COMPRESSION
        context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
        # TLS 1.2 renegotiation: a CPU cost a client can make the server pay at will; no MTA
        # needs it (TLS 1.3 has none).
        context.options |= getattr(ssl, "OP_NO_RENEGOTIATION", 0)
        names = SSL.Connection(twin, None).get_cipher_list()
        tls12 = [name for name in names if not name.startswith("TLS_")]
        try:
            if tls12:
                context.set_ciphers(":".join(tls12))
        except ssl.SSLError as e:
            raise TLSConfigError(f"{identity.source}: {_first_line(e)}") from None
        pem = identity.key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
        for certificate in (identity.certificate, *identity.chain):
            pem += certificate.public_bytes(Encoding.PEM)
        # From memory (a memfd, never on disk): the same key and certificates pyOpenSSL got.
        fd = os.memfd_create("slimta-tls", os.MFD_CLOEXEC)
        try:
            os.write(fd, pem)
            path = f"/proc/self/fd/{fd}"
            context.load_cert_chain(path, path)
        except (ssl.SSLError, OSError) as e:
            raise TLSConfigError(f"{identity.source}: {_first_line(e)}") from None
        finally:
            os.close(fd)
        return context

    def stdlib_context(self) -> ssl.SSLContext | None:
        """The standard-library context for new connections, or None when this configuration
        needs pyOpenSSL (client certificates, ``layer="twisted"``, no ``memfd_create``)."""
        return self._stdlib

    def _stdlib_sni(self, tls: ssl.SSLObject, server_name: str | None, context: Any) -> None:
        if server_name:
            _SERVER_NAMES[tls] = server_name
            chosen = self._stdlib_context_for_name(server_name)
            if chosen is not None:
                tls.context = chosen

    def _stdlib_context_for_name(self, server_name: str) -> ssl.SSLContext | None:
        name = server_name.lower().rstrip(".")
        found = self._stdlib_by_name.get(name)
        if found is None and "." in name:
            found = self._stdlib_by_name.get("*." + name.split(".", 1)[1])
        return found

    # -- SNI ----------------------------------------------------------------------------------

    def context_for_name(self, server_name: str | None) -> SSL.Context | None:
        """The context of the certificate for ``server_name`` (exact, then wildcard), if any."""
        if not server_name:
            return None
        name = server_name.lower().rstrip(".")
        found = self._by_name.get(name)
        if found is None and "." in name:
            found = self._by_name.get("*." + name.split(".", 1)[1])
        return found

    def _context_for_name(self, server_name: bytes | None) -> SSL.Context | None:
        if server_name is None:
            return None
        return self.context_for_name(server_name.decode("ascii", "replace"))

    # -- IOpenSSLServerConnectionCreator ------------------------------------------------------

    def serverConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        return SSL.Connection(self._context, None)

    def getContext(self) -> SSL.Context:
        """The current default context (for APIs that want a context factory)."""
        return self._context


def _memory_files() -> bool:
    return hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd")


# The name each standard-library connection asked for (SNI), for tls_info.
_SERVER_NAMES: weakref.WeakKeyDictionary[ssl.SSLObject, str] = weakref.WeakKeyDictionary()


def tls_info(connection: SSL.Connection | ssl.SSLObject) -> TLSInfo:
    """What a session records once its handshake is complete."""
    if isinstance(connection, ssl.SSLObject):
        cipher = connection.cipher()
        return TLSInfo(
            version=connection.version() or "",
            cipher=cipher[0] if cipher else "",
            client_certificate=False,  # never asked for: client CAs use pyOpenSSL's layer
            client_certificate_verified=False,
            client_subject=None,
            server_name=_SERVER_NAMES.get(connection),
        )
    peer = connection.get_peer_certificate(as_cryptography=True)
    subject = peer.subject.rfc4514_string() if peer is not None else None
    server_name = connection.get_servername()
    return TLSInfo(
        version=connection.get_protocol_version_name(),
        cipher=connection.get_cipher_name() or "",
        client_certificate=peer is not None,
        client_certificate_verified=peer is not None and connection not in _VERIFY_FAILED,
        client_subject=subject,
        server_name=server_name.decode("ascii", "replace") if server_name else None,
    )

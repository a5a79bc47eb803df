"""TLS options of ``twistd slimta``: certificates, implicit-TLS listeners, policy, reload.

``--tls-cert`` (with ``--tls-key`` and ``--tls-chain``, or one combined PEM) turns on
STARTTLS on every ``--listen`` port; ``--tls-listen`` adds listeners that speak TLS from the
first byte (port 465) with the same certificates. SIGHUP reads the certificates again.
"""

from __future__ import annotations

from typing import Any

from twisted.logger import Logger
from twisted.python import usage

from slimta_tx.cli.startup import check_listener
from slimta_tx.proxy import listener_service
from slimta_tx.tls import MIN_VERSIONS, ServerTLS, TLSConfigError

log = Logger(namespace="slimta_tx.cli.tls")


class OptionGroup:
    optParameters: list[list[Any]] = [
        [
            "tls-cert",
            None,
            None,
            "PEM certificate (and chain; and key if --tls-key is not given).",
        ],
        ["tls-key", None, None, "PEM private key for --tls-cert."],
        ["tls-chain", None, None, "PEM intermediate certificates for --tls-cert."],
        [
            "tls-cert-dir",
            None,
            None,
            "Directory of NAME.pem files (key + certificate + chain) chosen by SNI.",
        ],
        [
            "tls-client-ca",
            None,
            None,
            "PEM CAs to verify client certificates against (asked for, never required).",
        ],
        ["tls-min-version", None, "1.2", "Lowest TLS version: 1.2 or 1.3."],
        ["tls-ciphers", None, None, "OpenSSL cipher list for TLS 1.2 (default: Twisted's)."],
    ]
    optFlags: list[list[Any]] = [
        ["require-tls", None, "Refuse MAIL and AUTH before STARTTLS (530 5.7.0; submission)."],
    ]

    def opt_tls_listen(self, description: str) -> None:
        """Listen with TLS from the first byte, e.g. tcp:465 (repeatable; needs --tls-cert)"""
        self["tls-listen"].append(description)  # type: ignore[index]


def defaults(config: Any) -> None:
    config["tls-listen"] = []
    config["tls"] = None


def validate(config: Any) -> None:
    certificate, directory = config["tls-cert"], config["tls-cert-dir"]
    if certificate is None and directory is None:
        for option in ("tls-key", "tls-chain", "tls-client-ca", "tls-ciphers"):
            if config[option]:
                raise usage.UsageError(f"--{option} needs --tls-cert or --tls-cert-dir")
        if config["tls-min-version"] != "1.2":
            raise usage.UsageError("--tls-min-version needs --tls-cert or --tls-cert-dir")
        if config["tls-listen"]:
            raise usage.UsageError("--tls-listen needs --tls-cert or --tls-cert-dir")
        if config["require-tls"]:
            raise usage.UsageError("--require-tls needs --tls-cert or --tls-cert-dir")
        return
    for description in config["tls-listen"]:
        check_listener("tls-listen", description)
    if config["tls-min-version"] not in MIN_VERSIONS:
        raise usage.UsageError(
            f"--tls-min-version must be one of {', '.join(MIN_VERSIONS)}, "
            f"not {config['tls-min-version']!r}"
        )
    try:
        config["tls"] = ServerTLS(
            certificate,
            config["tls-key"],
            config["tls-chain"],
            certificate_dir=directory,
            client_ca=config["tls-client-ca"],
            min_version=config["tls-min-version"],
            ciphers=config["tls-ciphers"],
        )
    except TLSConfigError as e:
        raise usage.UsageError(f"TLS: {e}") from None


def configure(config: Any, edge: Any, service: Any, reactor: Any) -> None:
    from slimta_tx.starttls import wrap_implicit

    context: ServerTLS | None = config["tls"]
    if context is None:
        return
    edge.enable_tls(context, require_tls=bool(config["require-tls"]))
    for description in config["tls-listen"]:
        factory = wrap_implicit(edge, context)
        # haproxy:...: the PROXY header in clear first, then TLS (slimta_tx/proxy.py).
        listener_service(description, edge, reactor, factory).setServiceParent(service)
    service.on_reload(lambda: reload_certificates(context))


def reload_certificates(context: ServerTLS) -> bool:
    """Read the certificates again (what SIGHUP does); on error keep the old ones and log."""
    try:
        context.reload()
    except TLSConfigError as e:
        log.error("TLS reload failed, still using the previous certificates: {error}", error=e)
        return False
    log.info(
        "TLS certificates reloaded: {names}",
        names=", ".join(context.default.names + sorted(context.identities)),
    )
    return True

"""``twistd slimta`` options of the relay bus: checked once, then turned into a RelayBus.

Kept apart from :mod:`slimta_tx.cli.buses` so that file only lists the options.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from twisted.python import usage

from slimta_tx.bus.relay import TLS_MODES, RelayBus, next_hop_endpoint, parse_next_hop

__all__ = ["make_relay_bus", "read_credentials", "validate_relay_options"]


def read_credentials(value: str) -> tuple[str, str]:
    """``USER:PASSWORD`` or ``file:PATH`` (first line of the file is ``USER:PASSWORD``)."""
    if value.startswith("file:"):
        path = value[5:]
        try:
            with open(path, encoding="utf-8") as f:
                value = f.readline().rstrip("\r\n")
        except OSError as e:
            raise ValueError(f"cannot read {path}: {e.strerror}") from None
    user, sep, password = value.partition(":")
    if not sep or not user:
        raise ValueError("expected USER:PASSWORD (or file:PATH holding USER:PASSWORD)")
    return user, password


def _is_local(target: tuple[str, int] | str) -> bool:
    if isinstance(target, str):
        return True  # a unix socket
    host = target[0]
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def validate_relay_options(config: Any) -> None:
    address = config.get("relay") or config.get("relay-lmtp")
    if config.get("relay") and config.get("relay-lmtp"):
        raise usage.UsageError("choose one of --relay and --relay-lmtp")
    if not address:
        return
    option = "--relay" if config.get("relay") else "--relay-lmtp"
    try:
        target = parse_next_hop(address)
    except ValueError as e:
        raise usage.UsageError(f"{option}: {e}") from None
    if option == "--relay" and isinstance(target, str):
        raise usage.UsageError("--relay: unix sockets are for --relay-lmtp")
    mode = config["relay-tls"]
    if mode not in TLS_MODES:
        raise usage.UsageError(f"--relay-tls must be one of: {', '.join(TLS_MODES)}")
    config["relay-tls-options"] = None
    if mode != "none":
        config["relay-tls-options"] = _tls_options(config, target)
    config["relay-credentials"] = None
    if config["relay-auth"]:
        try:
            config["relay-credentials"] = read_credentials(config["relay-auth"])
        except ValueError as e:
            raise usage.UsageError(f"--relay-auth: {e}") from None
    config["relay-local"] = _is_local(target)


def _tls_options(config: Any, target: tuple[str, int] | str) -> Any:
    from twisted.internet.ssl import Certificate, CertificateOptions, optionsForClientTLS

    name = config["relay-tls-name"] or (target[0] if isinstance(target, tuple) else None)
    ca_path = config["relay-tls-ca"]
    if config["relay-tls"] == "opportunistic" and not ca_path:
        return CertificateOptions()  # encrypt; check nothing (RFC 7435)
    if not name:
        raise usage.UsageError("--relay-tls-name is needed to check a unix socket's certificate")
    trust = None
    if ca_path:
        try:
            with open(ca_path, "rb") as f:
                trust = Certificate.loadPEM(f.read())
        except Exception as e:
            raise usage.UsageError(f"--relay-tls-ca: cannot load {ca_path}: {e}") from None
    return optionsForClientTLS(name, trustRoot=trust)


def make_relay_bus(config: Any, reactor: Any) -> RelayBus:
    lmtp = not config.get("relay")
    address = config["relay-lmtp"] if lmtp else config["relay"]
    timeout = config["relay-timeout"]
    return RelayBus(
        next_hop_endpoint(reactor, address, timeout=timeout),
        reactor,
        hostname=config["hostname"],
        lmtp=lmtp,
        tls=config["relay-tls"],
        tls_options=config["relay-tls-options"],
        credentials=config["relay-credentials"],
        allow_plaintext_auth=config["relay-local"],
        pool_size=config["relay-pool"],
        timeout=timeout,
        name=("lmtp " if lmtp else "smtp ") + address,
    )

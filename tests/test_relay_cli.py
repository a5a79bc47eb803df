"""``twistd slimta --relay ...``: the options build the relay bus; mistakes are one-line errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from twisted.internet.endpoints import HostnameEndpoint, UNIXClientEndpoint
from twisted.internet.testing import MemoryReactorClock
from twisted.python import usage

from slimta_tx.bus.relay import RelayBus
from slimta_tx.tap import Options, makeService


def build(*args: str) -> RelayBus:
    config = Options()
    config.parseOptions(["--hostname", "edge.test", *args])
    service: Any = makeService(config, reactor=MemoryReactorClock())
    bus = service.edge.bus
    assert isinstance(bus, RelayBus)
    return bus


def test_relay_options_reach_the_bus(tmp_path: Path) -> None:
    """--relay, --relay-tls, --relay-auth file:, --relay-pool, --relay-timeout configure it."""
    secret = tmp_path / "relay-auth"
    secret.write_text("mailer:pa:ss\n")
    bus = build(
        "--relay",
        "127.0.0.1:2526",
        "--relay-tls",
        "none",
        "--relay-auth",
        f"file:{secret}",
        "--relay-pool",
        "7",
        "--relay-timeout",
        "9",
    )
    assert isinstance(bus.endpoint, HostnameEndpoint)
    assert (bus.lmtp, bus.tls, bus.hostname) == (False, "none", "edge.test")
    assert bus.credentials == ("mailer", "pa:ss")
    assert bus.allow_plaintext_auth  # a loopback next hop
    assert (bus.pool.max_size, bus.timeout) == (7, 9.0)


def test_relay_lmtp_unix_socket() -> None:
    """--relay-lmtp unix:PATH speaks LMTP over a unix socket; TLS opportunistic by default."""
    bus = build("--relay-lmtp", "unix:/run/dovecot/lmtp")
    assert isinstance(bus.endpoint, UNIXClientEndpoint)
    assert bus.lmtp and bus.tls == "opportunistic"


def test_required_tls_checks_the_next_hop_name() -> None:
    """--relay-tls required builds certificate-checking options for the next hop's name."""
    bus = build("--relay", "mx.example.net:25", "--relay-tls", "required")
    assert bus.tls == "required" and bus.tls_options is not None
    assert not bus.allow_plaintext_auth


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--relay", "nohost"], "--relay: not HOST:PORT"),
        (["--relay", "mx:99999"], "--relay: port out of range"),
        (["--relay", "unix:/x"], "--relay: unix sockets are for --relay-lmtp"),
        (["--relay", "mx:25", "--relay-tls", "maybe"], "--relay-tls must be one of"),
        (["--relay", "mx:25", "--relay-auth", "nocolon"], "--relay-auth: expected USER:PASSWORD"),
        (["--relay", "mx:25", "--relay-auth", "file:/nonexistent"], "--relay-auth: cannot read"),
        (["--relay", "mx:25", "--relay-pool", "0"], "--relay-pool must be at least 1"),
        (
            ["--relay", "mx:25", "--relay-tls", "required", "--relay-tls-ca", "/nonexistent"],
            "--relay-tls-ca: cannot load",
        ),
    ],
)
def test_bad_relay_options_are_usage_errors(args: list[str], message: str) -> None:
    """Each mistake is a UsageError naming the option, never a traceback."""
    with pytest.raises(usage.UsageError, match=message.replace("(", r"\(")):
        Options().parseOptions(args)


def test_auth_password_never_in_the_error() -> None:
    """A malformed --relay-auth does not echo what was typed (it may be a password)."""
    with pytest.raises(usage.UsageError) as caught:
        Options().parseOptions(["--relay", "mx:25", "--relay-auth", "s3cretpassword"])
    assert "s3cretpassword" not in str(caught.value)

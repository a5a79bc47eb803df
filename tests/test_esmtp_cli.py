"""``twistd slimta`` options of the ESMTP features (slimta_tx/cli/esmtp.py)."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.python import usage

from slimta_tx.data import NulPolicy
from slimta_tx.policy import Policy
from slimta_tx.tap import Options


def parse(*args: str) -> Options:
    config = Options()
    config.parseOptions(["--hostname", "mx.test", *args])
    return config


def test_defaults() -> None:
    """Pipelining discipline on, NUL refused, DSN, REQUIRETLS and BINARYMIME offered."""
    policy = parse()["policy"]
    assert policy == Policy(hostname="mx.test")
    assert (
        policy.forbid_improper_pipelining,
        policy.nul,
        policy.dsn,
        policy.requiretls,
        policy.binarymime,
    ) == (True, NulPolicy.REJECT, True, True, True)


@pytest.mark.parametrize(
    ("args", "changes"),
    [
        (["--allow-improper-pipelining"], {"forbid_improper_pipelining": False}),
        (["--nul", "strip"], {"nul": NulPolicy.STRIP}),
        (["--nul", "accept"], {"nul": NulPolicy.ACCEPT}),
        (["--no-dsn"], {"dsn": False}),
        (["--no-requiretls"], {"requiretls": False}),
        (["--no-binarymime"], {"binarymime": False}),
    ],
)
def test_each_option(args: list[str], changes: dict[str, Any]) -> None:
    assert parse(*args)["policy"] == Policy(hostname="mx.test", **changes)


def test_a_bad_nul_policy_is_a_one_line_error() -> None:
    with pytest.raises(usage.UsageError) as caught:
        parse("--nul", "keep")
    assert str(caught.value) == (
        "--nul must be 'reject', 'strip' or 'accept' (see 'twistd slimta --help')"
    )


def test_lmtp_listen_adds_lmtp_listeners_beside_smtp(tmp_path: Any) -> None:
    """--lmtp-listen is repeatable; each becomes a listener serving LMTP for the same edge."""
    from twisted.application.internet import StreamServerEndpointService
    from twisted.internet.testing import MemoryReactorClock

    from slimta_tx.lmtp import LmtpFactory
    from slimta_tx.tap import makeService

    config = parse(
        "--maildir",
        str(tmp_path / "md"),
        "--lmtp-listen",
        "tcp:2424:interface=127.0.0.1",
        "--lmtp-listen",
        "unix:" + str(tmp_path / "lmtp.sock"),
    )
    assert config["lmtp-listen"] == [
        "tcp:2424:interface=127.0.0.1",
        "unix:" + str(tmp_path / "lmtp.sock"),
    ]
    service = makeService(config, reactor=MemoryReactorClock())
    listeners = [c for c in service if isinstance(c, StreamServerEndpointService)]
    factories = [listener.factory for listener in listeners]
    assert len(listeners) == 3  # the default SMTP listener and two LMTP ones
    lmtp_factories = [f for f in factories if isinstance(f, LmtpFactory)]
    assert len(lmtp_factories) == 2
    assert all(f.edge is service.edge for f in lmtp_factories)


def test_amqp_per_recipient(tmp_path: Any) -> None:
    from twisted.internet.testing import MemoryReactorClock

    from slimta_tx.bus.amqp import AmqpBus
    from slimta_tx.tap import makeService

    args = ["--amqp", "amqp://guest:guest@127.0.0.1:5672/%2F", "--amqp-exchange", "mail"]
    for extra, expected in (([], False), (["--amqp-per-recipient"], True)):
        service = makeService(parse(*args, *extra), reactor=MemoryReactorClock())
        assert isinstance(service.edge.bus, AmqpBus)
        assert service.edge.bus.per_recipient is expected


def test_amqp_per_recipient_needs_amqp() -> None:
    with pytest.raises(usage.UsageError) as caught:
        parse("--amqp-per-recipient")
    assert "--amqp-per-recipient needs --amqp URL" in str(caught.value)

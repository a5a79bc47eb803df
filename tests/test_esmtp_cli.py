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

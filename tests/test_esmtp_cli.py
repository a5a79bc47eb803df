"""``twistd slimta`` options of the ESMTP features (slimta_tx/cli/esmtp.py)."""

from __future__ import annotations

from slimta_tx.policy import Policy
from slimta_tx.tap import Options


def parse(*args: str) -> Options:
    config = Options()
    config.parseOptions(["--hostname", "mx.test", *args])
    return config


def test_defaults() -> None:
    """Pipelining discipline is on by default."""
    config = parse()
    assert config["policy"] == Policy(hostname="mx.test")
    assert config["policy"].forbid_improper_pipelining is True


def test_allow_improper_pipelining() -> None:
    config = parse("--allow-improper-pipelining")
    assert config["policy"] == Policy(hostname="mx.test", forbid_improper_pipelining=False)

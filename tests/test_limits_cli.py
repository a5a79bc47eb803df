"""``twistd slimta`` options of the limits group (slimta_tx/cli/limits.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from twisted.internet.testing import MemoryReactorClock
from twisted.python import usage

from slimta_tx.capacity import ConnectionGate
from slimta_tx.cli.limits import DescriptorLimits
from slimta_tx.tap import Options, makeService


def parse(*args: str) -> Options:
    config = Options()
    config.parseOptions(list(args))
    return config


def test_defaults() -> None:
    """Safe without tuning: 600 s bodies, 500 bytes/s after 30 s, one-hour sessions, no
    connection limit of its own (descriptors decide), the reserve computed at start-up."""
    config = parse()
    policy = config["policy"]
    assert (
        policy.data_deadline,
        policy.min_data_rate,
        policy.data_rate_grace,
        policy.session_deadline,
    ) == (600.0, 500, 30.0, 3600.0)
    assert config["max-connections"] is None
    assert config["descriptor-reserve"] is None


@pytest.mark.parametrize(
    ("args", "changes"),
    [
        (["--data-deadline", "120"], {"data_deadline": 120.0}),
        (["--data-deadline", "0"], {"data_deadline": 0.0}),
        (["--min-data-rate", "2000"], {"min_data_rate": 2000}),
        (["--min-data-rate", "0"], {"min_data_rate": 0}),
        (["--data-rate-grace", "5"], {"data_rate_grace": 5.0}),
        (["--session-deadline", "0"], {"session_deadline": 0.0}),
        (["--session-deadline", "7200"], {"session_deadline": 7200.0}),
    ],
)
def test_each_option_sets_the_policy(args: list[str], changes: dict[str, Any]) -> None:
    config = parse(*args)
    for name, value in changes.items():
        assert getattr(config["policy"], name) == value


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--data-deadline", "soon"], "--data-deadline takes a number of seconds, not 'soon'"),
        (["--session-deadline", "-1"], "--session-deadline must be 0 (no limit) or more"),
        (["--min-data-rate", "fast"], "--min-data-rate takes a whole number, not 'fast'"),
        (["--max-connections", "0"], "--max-connections must be at least 1"),
        (["--descriptor-reserve", "-5"], "--descriptor-reserve must be at least 0"),
    ],
)
def test_bad_values_are_one_line_usage_errors(args: list[str], message: str) -> None:
    with pytest.raises(usage.UsageError) as caught:
        parse(*args)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_the_service_installs_the_gate_and_sets_descriptors_at_start(tmp_path: Path) -> None:
    """The gate is on the edge from the start; the descriptor limit is read (and raised)
    when the service starts, not when options are parsed."""
    config = parse("--maildir", str(tmp_path / "md"), "--max-connections", "50")
    reactor = MemoryReactorClock()
    service = makeService(config, reactor=reactor)
    [limits] = [child for child in service if isinstance(child, DescriptorLimits)]
    edge: Any = service.edge  # type: ignore[attr-defined]
    gate = edge.connection_gate
    assert isinstance(gate, ConnectionGate)
    assert gate.max_connections == 50
    assert gate.descriptor_ceiling is None
    service.privilegedStartService()
    try:
        assert gate.descriptor_limit is not None
        assert gate.descriptor_ceiling == gate.descriptor_limit - gate.reserve
        assert limits.gate is gate
    finally:
        service.stopService()


def test_a_reserve_as_large_as_the_limit_stops_start_up(tmp_path: Path) -> None:
    config = parse("--maildir", str(tmp_path / "md"), "--descriptor-reserve", "100000000")
    service = makeService(config, reactor=MemoryReactorClock())
    with pytest.raises(SystemExit, match="--descriptor-reserve: the descriptor reserve"):
        service.privilegedStartService()

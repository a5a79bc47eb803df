"""Each bus's readiness (IReadiness, what /healthz and slimta_tx_bus_ready ask): the Maildir
takes a file, the relay's next hop accepts a connection, the AMQP bus is connected, a
composed bus is as ready as its required members; the --workers parent's check."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from slimta_tx.bus.compose import ChainBus, optional
from slimta_tx.bus.maildir import MaildirBus
from slimta_tx.bus.relay import RelayBus
from slimta_tx.interfaces import IReadiness
from slimta_tx.testing import RecordingBus


def answer(d: Any) -> Any:
    if not isinstance(d, Deferred):
        return d
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "no answer yet"
    return results[0]


def test_a_maildir_is_ready_while_its_tmp_is_writable(tmp_path: Path) -> None:
    bus = MaildirBus(str(tmp_path / "Maildir"), reactor=Clock())
    assert IReadiness.providedBy(bus)
    assert bus.ready() is None
    assert list((tmp_path / "Maildir" / "tmp").iterdir()) == []  # nothing written
    shutil.rmtree(tmp_path / "Maildir")
    assert bus.ready() == "maildir not writable: No such file or directory"


class Endpoint:
    def __init__(self, refuse: bool) -> None:
        self.refuse = refuse
        self.transports: list[StringTransport] = []

    def connect(self, factory: Any) -> Deferred[Any]:
        if self.refuse:
            return fail(ConnectionRefusedError())
        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        self.transports.append(transport)
        return succeed(protocol)


def test_a_relay_is_ready_when_its_next_hop_accepts_a_connection() -> None:
    endpoint = Endpoint(refuse=False)
    clock = Clock()
    bus = RelayBus(endpoint, clock, name="127.0.0.1:2526")  # type: ignore[arg-type]
    assert answer(bus.ready()) is None
    assert endpoint.transports[0].disconnecting  # the probe is closed at once
    endpoint.refuse = True
    assert answer(bus.ready()) is None  # the last answer, for a few seconds
    assert len(endpoint.transports) == 1
    clock.advance(5)
    assert answer(bus.ready()).startswith(
        "next hop 127.0.0.1:2526 unreachable: Connection was refused"
    )


def test_an_amqp_bus_is_ready_only_while_connected() -> None:
    pytest.importorskip("pika")
    from slimta_tx.bus.amqp import AmqpBus

    bus = AmqpBus("amqp://guest:guest@127.0.0.1:1/%2F", queue="q", reactor=Clock())
    assert bus.ready() == "broker not connected"
    bus.last_error = "Connection refused"
    assert bus.ready() == "broker not connected: Connection refused"


class Unready(RecordingBus):
    def ready(self) -> str:
        return "disk full"


def test_a_composed_bus_is_as_ready_as_its_required_members() -> None:
    assert answer(ChainBus([RecordingBus(), optional(Unready())]).ready()) is None
    assert answer(ChainBus([RecordingBus(), Unready()]).ready()) == "Unready: disk full"


class Pool:
    def __init__(self, running: int, count: int = 2) -> None:
        self.workers = dict.fromkeys(range(running))
        self.count = count
        self.stopping = False


class Workers:
    def __init__(self, running: int) -> None:
        self.running = True
        self.bound = ["a port"]
        self.pool = Pool(running)


class Directory:
    def __init__(self, ready: float | None) -> None:
        self.ready = ready

    def bus_ready(self) -> float | None:
        return self.ready


@pytest.mark.parametrize(
    ("running", "ready", "expected"),
    [
        (2, 1.0, None),
        (1, 1.0, "1 of 2 workers running"),
        (2, None, "bus readiness not reported yet"),
        (2, 0.0, "bus not ready in a worker"),
    ],
)
def test_the_workers_parent_check(running: int, ready: float | None, expected: str | None) -> None:
    from slimta_tx.metrics.workers import workers_readiness

    check = workers_readiness(Workers(running), Directory(ready))  # type: ignore[arg-type]
    assert answer(check()) == expected

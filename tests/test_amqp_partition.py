"""A silent partition between the edge and RabbitMQ (no RST, no answers), made with a TCP relay
that turns into a black hole (tests/support/blackhole.py). Real broker on 127.0.0.1:5672:
under ``CI=true`` a missing one fails the test, elsewhere it skips."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.mail.smtp import SMTPDeliveryError

from slimta_tx.bus.amqp import AmqpBus
from tests.support.blackhole import BlackholeRelay
from tests.test_amqp_rabbitmq import HOW_TO_START, Admin, broker_listening, serve, smtp_send, until

BODY = b"Subject: partition\n\nhello\n"


@pytest.fixture
def rabbit() -> Iterator[Admin]:
    if not broker_listening():
        if os.environ.get("CI") == "true":
            pytest.fail(HOW_TO_START)
        pytest.skip(HOW_TO_START)
    admin = Admin()
    try:
        yield admin
    finally:
        admin.close()


async def refused_code(port: int) -> tuple[int, float]:
    """Send one message that must be refused: (its code, seconds the client waited)."""
    start = reactor.seconds()
    with pytest.raises(SMTPDeliveryError) as refused:
        await smtp_send(port, BODY)
    return refused.value.code, reactor.seconds() - start


@pytest_twisted.ensureDeferred
async def test_silent_partition_new_clients_get_a_quick_451(rabbit: Admin) -> None:
    """Before the stall is known, a client waits for the confirm timeout (6 s here); once
    nothing has been confirmed for the stall timeout (2 s), new clients get 451 at once; the
    stalled connection is dropped after the confirm timeout, and after the partition heals
    mail flows again."""
    queue = rabbit.name("q")
    relay = BlackholeRelay(reactor, 5672)
    relay_port = await relay.start()
    bus = AmqpBus(
        f"amqp://guest:guest@127.0.0.1:{relay_port}/%2F",
        queue=queue,
        reactor=reactor,
        timeout=6.0,
        stall_timeout=2.0,
        connect_timeout=3.0,
        initial_backoff=0.2,
        max_backoff=0.5,
    )
    edge, port = await serve(bus)
    try:
        await smtp_send(port, BODY)  # through the relay: 250
        relay.partition()
        first = smtp_send(port, BODY)  # published into the void: waits for its confirm
        await until(lambda: bus.link is not None and bus.link.unconfirmed_for() >= 2.0)
        code, waited = await refused_code(port)
        assert code == 451
        assert waited < 1.5, f"a new client waited {waited:.1f}s during a known stall"
        with pytest.raises(SMTPDeliveryError) as timed_out:
            await first
        assert timed_out.value.code == 451
        relay.heal()  # the old connection stays dead: its bytes were lost
        await refused_code(port)  # finds the stall past the timeout: drops the connection
        await until(lambda: bus.connected, seconds=20)
        await smtp_send(port, BODY)
        assert len(rabbit.drain(queue)) >= 2
    finally:
        await edge.close()
        await bus.stop()
        await relay.stop()
